//! Async tests and the blocking kit: run blocking kit code (process
//! control, Sentinel polling, the HTTP getter) without stalling the
//! runtime's other tasks, and bound an await by a deadline so that a hang
//! fails the test instead of stalling the suite.

use std::future::Future;
use std::time::Duration;

/// Run blocking kit code from an async test without stalling the runtime's
/// other tasks: background clients keep running meanwhile. Needs the
/// multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Await `fut`, failing the test if it takes longer than `limit`: the way
/// tests tell an answer (even an error reply) apart from a hang.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

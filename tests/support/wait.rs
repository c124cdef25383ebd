//! Deadline-bounded polling: the only sanctioned way for tests to wait for
//! something to become true.

use std::future::Future;
use std::time::{Duration, Instant};

use super::POLL;

/// Poll the async predicate `f` every 20 ms until it returns true; panic with
/// `what` if `timeout` passes first. The predicate is always evaluated at
/// least once, and once more at the deadline, so a slow first poll cannot
/// cause a spurious failure.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_chance = Instant::now() >= deadline;
        if f().await {
            return;
        }
        if last_chance {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Blocking twin of [`wait_until`] for sync tests and helpers. Do not call it
/// from inside an async test: it blocks the runtime thread.
pub fn wait_until_sync<F>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_chance = Instant::now() >= deadline;
        if f() {
            return;
        }
        if last_chance {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(POLL);
    }
}

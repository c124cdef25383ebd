//! A client's output meter and kill switch.
//!
//! The meter counts reply bytes delivered for a client but not yet written to
//! its socket. Upstream readers add to it as replies complete; the client's
//! writer subtracts once the bytes are written. A client that stops reading
//! makes the meter climb past its bound and is cut off, as Redis's
//! client-output-buffer-limit does, instead of keyward holding its replies.
//!
//! Cutting a client off aborts its reader and writer tasks. Aborting (rather
//! than a cancellation future in every `select!`) keeps the per-request path
//! free of waiter registration; cleanup happens in `Drop`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::task::AbortHandle;

#[derive(Debug)]
pub struct Meter {
    client: u64,
    bytes: AtomicUsize,
    limit: usize,
    over: AtomicBool,
    killed: AtomicBool,
    tasks: OnceLock<[AbortHandle; 2]>,
}

impl Meter {
    pub fn new(client: u64, limit: usize) -> Self {
        Meter {
            client,
            bytes: AtomicUsize::new(0),
            limit,
            over: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            tasks: OnceLock::new(),
        }
    }

    /// The client's reader and writer tasks, aborted by `kill`.
    pub fn set_tasks(&self, reader: AbortHandle, writer: AbortHandle) {
        let _ = self.tasks.set([reader, writer]);
        if self.is_killed() {
            self.abort();
        }
    }

    #[inline]
    pub fn add(&self, n: usize) {
        let now = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.limit && !self.over.swap(true, Ordering::AcqRel) {
            crate::metrics::Limit::MaxReplyBytes.reached();
            tracing::warn!(
                client = self.client,
                limit = self.limit,
                "client disconnected: replies waiting exceeded server.max_reply_bytes"
            );
            self.kill();
        }
    }

    #[inline]
    pub fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    /// The client went over its output limit.
    pub fn exceeded(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// Drop the client at once: its replies are no longer wanted.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.abort();
    }

    #[inline]
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    fn abort(&self) {
        if let Some(tasks) = self.tasks.get() {
            for t in tasks {
                t.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_the_limit_kills_once() {
        let m = Meter::new(1, 10);
        m.add(6);
        m.sub(6);
        m.add(10);
        assert!(!m.exceeded() && !m.is_killed());
        m.add(1);
        assert!(m.exceeded() && m.is_killed());
    }
}

//! A client's output meter: reply bytes delivered for a client but not yet
//! written to its socket.
//!
//! Upstream readers add to it as they hand replies over; the client's writer
//! subtracts once the bytes are written. A client that stops reading makes the
//! meter climb past its bound and is cut off, as Redis's
//! client-output-buffer-limit does, instead of holding replies forever.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Meter {
    bytes: AtomicUsize,
    limit: usize,
    /// Cancelled when the limit is crossed; the client's tasks watch it.
    pub over: CancellationToken,
}

impl Meter {
    pub fn new(limit: usize, over: CancellationToken) -> Self {
        Meter {
            bytes: AtomicUsize::new(0),
            limit,
            over,
        }
    }

    #[inline]
    pub fn add(&self, n: usize) {
        let now = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.limit {
            self.over.cancel();
        }
    }

    #[inline]
    pub fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn exceeded(&self) -> bool {
        self.over.is_cancelled() && self.bytes() > self.limit
    }
}

//! `KEYWARD SLOWLOG`: requests slower than a threshold, measured at the
//! proxy from the read of the request to the write of its reply (so it
//! includes queueing, holds during a failover and Redis's own time).
//!
//! Kept like Redis's SLOWLOG: newest first, bounded length
//! (`admin.slowlog_max_len`), arguments cut to 32 per entry and 128 bytes
//! per argument, with the same "... (N more arguments)" and
//! "... (N more bytes)" markers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::resp::reply;

const MAX_ARGS: usize = 32;
const MAX_ARG_BYTES: usize = 128;

#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u64,
    /// Unix time in seconds.
    pub time: u64,
    pub duration_us: u64,
    pub args: Vec<Bytes>,
    pub addr: String,
}

#[derive(Debug)]
pub struct SlowLog {
    /// Requests at least this slow are logged; negative disables.
    pub slower_than_us: i64,
    max_len: usize,
    next_id: AtomicU64,
    entries: Mutex<VecDeque<Entry>>,
}

impl SlowLog {
    pub fn new(slower_than_us: i64, max_len: usize) -> Self {
        SlowLog {
            slower_than_us,
            max_len,
            next_id: AtomicU64::new(0),
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// Is a request of `us` microseconds slow?
    #[inline]
    pub fn is_slow(&self, us: u64) -> bool {
        self.slower_than_us >= 0 && us >= self.slower_than_us as u64 && self.max_len > 0
    }

    /// Log one request (its arguments as sent).
    pub fn add<'a>(&self, args: impl ExactSizeIterator<Item = &'a [u8]>, us: u64, addr: &str) {
        let argc = args.len();
        let mut kept: Vec<Bytes> = Vec::with_capacity(argc.min(MAX_ARGS));
        for (i, a) in args.enumerate() {
            if argc > MAX_ARGS && i == MAX_ARGS - 1 {
                kept.push(Bytes::from(format!(
                    "... ({} more arguments)",
                    argc - MAX_ARGS + 1
                )));
                break;
            }
            if a.len() > MAX_ARG_BYTES {
                let mut b = BytesMut::from(&a[..MAX_ARG_BYTES]);
                b.extend_from_slice(
                    format!("... ({} more bytes)", a.len() - MAX_ARG_BYTES).as_bytes(),
                );
                kept.push(b.freeze());
            } else {
                kept.push(Bytes::copy_from_slice(a));
            }
        }
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            time: crate::topology::now_ms() / 1000,
            duration_us: us,
            args: kept,
            addr: addr.to_string(),
        };
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.push_front(entry);
        e.truncate(self.max_len);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The newest `count` entries.
    pub fn get(&self, count: usize) -> Vec<Entry> {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.iter().take(count).cloned().collect()
    }

    /// `SLOWLOG GET`'s reply shape: per entry id, time, duration, arguments,
    /// client address and client name (keyward knows no names: empty).
    pub fn reply(&self, out: &mut BytesMut, count: usize) {
        let entries = self.get(count);
        reply::array(out, entries.len());
        for e in entries {
            reply::array(out, 6);
            reply::int(out, e.id as i64);
            reply::int(out, e.time as i64);
            reply::int(out, e.duration_us as i64);
            reply::array(out, e.args.len());
            for a in &e.args {
                reply::bulk(out, a);
            }
            reply::bulk(out, e.addr.as_bytes());
            reply::bulk(out, b"");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_newest_first_and_truncated() {
        let s = SlowLog::new(0, 2);
        assert!(s.is_slow(0));
        let long = vec![b'x'; 200];
        s.add([b"GET".as_slice(), b"a"].into_iter(), 5, "c:1");
        s.add([b"SET".as_slice(), b"b", &long].into_iter(), 6, "c:1");
        let many: Vec<&[u8]> = (0..40).map(|_| b"a".as_slice()).collect();
        s.add(many.into_iter(), 7, "c:2");
        assert_eq!(s.len(), 2);
        let e = s.get(10);
        assert_eq!((e[0].id, e[1].id), (2, 1));
        assert_eq!(e[0].args.len(), 32);
        assert_eq!(e[0].args[31].as_ref(), b"... (9 more arguments)");
        assert_eq!(e[1].args[2].len(), 128 + "... (72 more bytes)".len());
        s.reset();
        assert!(s.is_empty());
        assert!(!SlowLog::new(-1, 10).is_slow(1_000_000));
    }
}

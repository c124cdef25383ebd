//! What a client's writes change in the near cache.
//!
//! A write drops its keys before it is forwarded and again when its reply
//! arrives, before the client can see that reply: a fill that read the key
//! between the two (fills travel on the tracking connection, writes on
//! another) cannot outlive the acknowledgement, and the invalidation push
//! Redis sends for the write may still be in flight on the tracking link.
//! FLUSHALL, FLUSHDB and SWAPDB change keys they do not name, so they drop
//! the whole cache the same two times.

use bytes::Bytes;

use super::store::{FlushReason, Store};

/// Keys written by requests not yet answered (and whether one of them
/// changed whole databases).
#[derive(Debug, Default)]
pub struct Written {
    keys: Vec<Bytes>,
    all: bool,
}

/// Requests that change keys without naming them: FLUSHALL, FLUSHDB,
/// SWAPDB, and DEBUG RELOAD / LOADAOF / POPULATE. (A script that runs one
/// of them is not recognised; SWAPDB sends no invalidation, so its entries
/// then live out `cache.max_ttl_ms`.)
pub fn changes_databases(args: &[&[u8]]) -> bool {
    let Some(name) = args.first() else {
        return false;
    };
    let is = |a: &[u8], b: &[u8]| a.eq_ignore_ascii_case(b);
    is(name, b"flushall")
        || is(name, b"flushdb")
        || is(name, b"swapdb")
        || (is(name, b"debug")
            && args
                .get(1)
                .is_some_and(|s| is(s, b"reload") || is(s, b"loadaof") || is(s, b"populate")))
}

impl Written {
    /// A request writes `key`: drop it now and remember it.
    pub fn key(&mut self, store: &Store, key: &[u8]) {
        store.invalidate(key);
        self.keys.push(Bytes::copy_from_slice(key));
    }

    /// A request changes whole databases: drop everything now and remember.
    pub fn everything(&mut self, store: &Store) {
        store.flush(FlushReason::Command);
        self.all = true;
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.all
    }

    /// Add `other`'s writes to these.
    pub fn append(&mut self, mut other: Written) {
        self.keys.append(&mut other.keys);
        self.all |= other.all;
    }

    /// The replies have arrived: drop the keys again (the second time).
    pub fn replied(&self, store: &Store) {
        if self.all {
            store.flush(FlushReason::Command);
        }
        for k in &self.keys {
            store.invalidate(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_commands() {
        let yes: [&[&[u8]]; 5] = [
            &[b"FLUSHALL"],
            &[b"flushdb", b"async"],
            &[b"SwapDb", b"0", b"1"],
            &[b"debug", b"RELOAD"],
            &[b"DEBUG", b"populate", b"10"],
        ];
        for args in yes {
            assert!(changes_databases(args), "{args:?}");
        }
        let no: [&[&[u8]]; 5] = [
            &[b"flush"],
            &[b"del", b"k"],
            &[b"swapdbx"],
            &[],
            &[b"debug", b"sleep", b"0"],
        ];
        for args in no {
            assert!(!changes_databases(args), "{args:?}");
        }
    }

    #[test]
    fn append_keeps_keys_and_the_flush() {
        let store = Store::new(1 << 20);
        let mut a = Written::default();
        assert!(a.is_empty());
        a.key(&store, b"k1");
        let mut b = Written::default();
        b.everything(&store);
        a.append(b);
        assert!(a.all && a.keys.len() == 1 && !a.is_empty());
        let before =
            store.flushes[FlushReason::Command as usize].load(std::sync::atomic::Ordering::Relaxed);
        a.replied(&store);
        let after =
            store.flushes[FlushReason::Command as usize].load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after, before + 1);
    }
}

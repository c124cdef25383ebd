//! The near cache's store: replies by exact request bytes, indexed by key,
//! within a byte budget.
//!
//! Coherence rests on two counters. Each key has a sequence number bumped by
//! every invalidation (a write through keyward, a Redis invalidation push);
//! the store has an epoch bumped by every flush. A fill records both when it
//! starts and lands only if neither moved, so a fill that raced a write or a
//! flush is dropped instead of resurrecting an old value.
//!
//! The bookkeeping is bounded by what is cached and in flight: a key's
//! record goes once it has no entry and no fill in flight (its sequence
//! matters only to a fill), and the eviction order is compacted when
//! invalidated entries have left more stale positions than live ones.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::resp::Proto;

/// Per-entry bookkeeping counted against the budget, on top of the bytes.
const OVERHEAD: usize = 128;

struct Entry {
    key: Bytes,
    resp3: Bytes,
    /// `None` when the reply has no faithful RESP2 form.
    resp2: Option<Bytes>,
    expires: Instant,
    size: usize,
    /// Its position in `order` (a request cached again gets a new one).
    stamp: u64,
    /// When its fill began: it read the key no earlier.
    begun: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Bytes, Entry, ahash::RandomState>,
    /// Requests cached per key, and the key's invalidation sequence.
    keys: HashMap<Bytes, (u64, Vec<Bytes>), ahash::RandomState>,
    /// Insertion order, for eviction (oldest first): (request, stamp);
    /// positions whose entry is gone or newer are skipped.
    order: VecDeque<(Bytes, u64)>,
    next_stamp: u64,
    bytes: usize,
    epoch: u64,
    /// Requests with a fill in flight (single flight).
    inflight: HashMap<Bytes, Flight, ahash::RandomState>,
    /// Fills in flight per key.
    inflight_keys: HashMap<Bytes, u32, ahash::RandomState>,
}

/// A fill in flight.
struct Flight {
    /// The ticket's number: only that fill ends it (one begun before a
    /// flush may end after a new one of the same request began).
    id: u64,
    key: Bytes,
    /// What Redis answered a client's read of the same request meanwhile.
    seen: Seen,
}

enum Seen {
    Nothing,
    Reply(Proto, Bytes),
    /// Two different replies: the value changed during the fill.
    Differing,
}

impl Inner {
    /// The fill of `request` with ticket number `id` ended (landed,
    /// voided or abandoned).
    fn end_fill(&mut self, request: &[u8], id: u64) -> Option<Flight> {
        if self.inflight.get(request).is_none_or(|f| f.id != id) {
            return None;
        }
        let flight = self.inflight.remove(request)?;
        if let Some(n) = self.inflight_keys.get_mut(&flight.key) {
            *n -= 1;
            if *n == 0 {
                self.inflight_keys.remove(&flight.key);
            }
        }
        self.forget_if_unused(&flight.key);
        Some(flight)
    }

    /// Drop `key`'s record when it has no entry and no fill in flight.
    fn forget_if_unused(&mut self, key: &[u8]) {
        if self.inflight_keys.contains_key(key) {
            return;
        }
        if self.keys.get(key).is_some_and(|(_, r)| r.is_empty()) {
            self.keys.remove(key);
        }
    }

    /// Rebuild `order` from the live entries once most of it is stale.
    fn compact_order(&mut self) {
        if self.order.len() <= 2 * self.entries.len() + 64 {
            return;
        }
        let entries = &self.entries;
        self.order
            .retain(|(r, stamp)| entries.get(r).is_some_and(|e| e.stamp == *stamp));
    }
}

/// A fill's view of the store when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    seq: u64,
    epoch: u64,
    /// When the fill began (before it was sent).
    begun: Instant,
    id: u64,
}

pub struct Store {
    inner: Mutex<Inner>,
    budget: usize,
    /// Entries plus fills in flight: zero means writes need not look.
    active: AtomicUsize,
    pub hits: AtomicUsize,
    pub misses: AtomicUsize,
    /// Fills that landed, and fills dropped because the key changed (or
    /// the cache was flushed) while they were in flight.
    pub fills: AtomicUsize,
    pub fills_voided: AtomicUsize,
    /// Keys invalidated (by writes through keyward or Redis pushes).
    pub invalidations: AtomicUsize,
    /// Flushes, by reason (see `FlushReason`).
    pub flushes: [AtomicUsize; FlushReason::COUNT],
    /// Nanoseconds after `base` at which the latest request on the
    /// tracking connection whose reply has been handled was sent: every
    /// invalidation Redis queued for writes before then has been applied
    /// (Redis sends them to that connection ahead of the reply).
    synced_ns: AtomicU64,
    base: Instant,
    next_ticket: AtomicU64,
}

/// Why the whole cache was dropped (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// The tracking link went down, missed a pong, or broke its redirect.
    Link,
    /// Redis sent a null invalidation (FLUSHALL / FLUSHDB).
    Flushall,
    /// No verified master, or a new one.
    Topology,
    /// A new tracking link (invalidations may have been missed before it).
    Start,
    /// FLUSHALL, FLUSHDB, SWAPDB or DEBUG RELOAD|LOADAOF|POPULATE sent
    /// through keyward (see `written`).
    Command,
}

impl FlushReason {
    pub const COUNT: usize = 5;
    pub const ALL: [FlushReason; 5] = [
        FlushReason::Link,
        FlushReason::Flushall,
        FlushReason::Topology,
        FlushReason::Start,
        FlushReason::Command,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FlushReason::Link => "link",
            FlushReason::Flushall => "flushall",
            FlushReason::Topology => "topology",
            FlushReason::Start => "start",
            FlushReason::Command => "command",
        }
    }
}

impl Store {
    pub fn new(budget: usize) -> Self {
        Store {
            inner: Mutex::new(Inner::default()),
            budget,
            active: AtomicUsize::new(0),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
            fills: AtomicUsize::new(0),
            fills_voided: AtomicUsize::new(0),
            invalidations: AtomicUsize::new(0),
            flushes: Default::default(),
            synced_ns: AtomicU64::new(0),
            base: Instant::now(),
            next_ticket: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refresh_active(&self, inner: &Inner) {
        self.active.store(
            inner.entries.len() + inner.inflight.len(),
            Ordering::Release,
        );
    }

    /// Anything cached or being filled?
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append the cached reply to `request` in `proto` to `out` if it is
    /// fresh at `now` (copied under the lock: no reference count traffic
    /// on the hit path).
    pub fn get_into(&self, request: &[u8], proto: Proto, now: Instant, out: &mut BytesMut) -> bool {
        self.get_into_after(request, proto, now, None, out)
    }

    /// The reply to a request sent on the tracking connection at `sent`
    /// has been handled.
    pub fn synced(&self, sent: Instant) {
        let ns = sent.saturating_duration_since(self.base).as_nanos() as u64;
        self.synced_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Has the tracking connection handled a reply to a request sent
    /// after `t`?
    pub fn synced_after(&self, t: Instant) -> bool {
        let ns = t.saturating_duration_since(self.base).as_nanos() as u64;
        self.synced_ns.load(Ordering::Acquire) > ns
    }

    /// `get_into`, but not a reply whose fill began before `seen` (when
    /// the client got a reply from Redis that read the key: that fill may
    /// have read an older value) unless the tracking connection has synced
    /// since (any invalidation that older value would get has been applied).
    pub fn get_into_after(
        &self,
        request: &[u8],
        proto: Proto,
        now: Instant,
        seen: Option<Instant>,
        out: &mut BytesMut,
    ) -> bool {
        let mut inner = self.lock();
        let Some(e) = inner.entries.get(request) else {
            return false;
        };
        if seen.is_some_and(|s| e.begun <= s && !self.synced_after(s)) {
            return false;
        }
        if e.expires <= now {
            let key = e.key.clone();
            remove(&mut inner, request, &key);
            self.refresh_active(&inner);
            return false;
        }
        let reply = match proto {
            Proto::Resp3 => Some(&e.resp3),
            Proto::Resp2 => e.resp2.as_ref(),
        };
        match reply {
            Some(r) => {
                out.extend_from_slice(r);
                true
            }
            None => false,
        }
    }

    /// Start a fill of `request` (on `key`) unless one is in flight.
    pub fn begin_fill(&self, key: &Bytes, request: &Bytes) -> Option<Ticket> {
        let mut inner = self.lock();
        if inner.inflight.contains_key(request) || inner.entries.contains_key(request) {
            return None;
        }
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        inner.inflight.insert(
            request.clone(),
            Flight {
                id,
                key: key.clone(),
                seen: Seen::Nothing,
            },
        );
        *inner.inflight_keys.entry(key.clone()).or_insert(0) += 1;
        let seq = inner.keys.get(key).map(|k| k.0).unwrap_or(0);
        let ticket = Ticket {
            seq,
            epoch: inner.epoch,
            begun: Instant::now(),
            id,
        };
        self.refresh_active(&inner);
        Some(ticket)
    }

    /// A fill ended without a reply to store.
    pub fn abandon_fill(&self, request: &[u8], ticket: Ticket) {
        let mut inner = self.lock();
        inner.end_fill(request, ticket.id);
        self.refresh_active(&inner);
    }

    /// A fill's reply: stored only if nothing invalidated the key or
    /// flushed the store since the fill began. Returns whether it landed.
    pub fn complete_fill(
        &self,
        key: Bytes,
        request: Bytes,
        ticket: Ticket,
        resp3: Bytes,
        ttl: Duration,
    ) -> bool {
        let mut inner = self.lock();
        let seq = inner.keys.get(&key).map(|k| k.0).unwrap_or(0);
        let seen = inner.end_fill(&request, ticket.id).map(|f| f.seen);
        let resp2 = super::resp3::to_resp2(&resp3);
        // A client read the request on Redis during the fill and got
        // another reply: one of the two is older, maybe the fill's.
        let differs = match &seen {
            Some(Seen::Differing) => true,
            Some(Seen::Reply(Proto::Resp3, r)) => *r != resp3,
            Some(Seen::Reply(Proto::Resp2, r)) => resp2.as_ref().is_some_and(|r2| r2 != r),
            _ => false,
        };
        if seq != ticket.seq || inner.epoch != ticket.epoch || ttl.is_zero() || differs {
            self.fills_voided.fetch_add(1, Ordering::Relaxed);
            self.refresh_active(&inner);
            return false;
        }
        let size = OVERHEAD
            + request.len()
            + key.len()
            + resp3.len()
            + resp2.as_ref().map_or(0, |r| r.len());
        if size > self.budget {
            self.refresh_active(&inner);
            return false;
        }
        // Make room, oldest first.
        while inner.bytes + size > self.budget {
            let Some((old, stamp)) = inner.order.pop_front() else {
                break;
            };
            let live = inner.entries.get(&old).filter(|e| e.stamp == stamp);
            if let Some(k) = live.map(|e| e.key.clone()) {
                remove(&mut inner, &old, &k);
                crate::metrics::Limit::CacheMaxMb.reached();
            }
        }
        inner.bytes += size;
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        inner.order.push_back((request.clone(), stamp));
        inner.compact_order();
        inner
            .keys
            .entry(key.clone())
            .or_insert((seq, Vec::new()))
            .1
            .push(request.clone());
        inner.entries.insert(
            request,
            Entry {
                key,
                resp3,
                resp2,
                expires: Instant::now() + ttl,
                size,
                stamp,
                begun: ticket.begun,
            },
        );
        self.fills.fetch_add(1, Ordering::Relaxed);
        self.refresh_active(&inner);
        true
    }

    /// Redis answered `reply` (in `proto`) to a client's read of `request`
    /// (see `NearCache::observe`): a cached reply that differs is dropped,
    /// and a fill in flight lands only if it read the same.
    pub fn observed(&self, request: &[u8], proto: Proto, reply: &[u8]) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get(request) {
            let cached = match proto {
                Proto::Resp3 => Some(&e.resp3),
                // No RESP2 form: RESP2 clients are never served this entry.
                Proto::Resp2 => e.resp2.as_ref(),
            };
            if cached.is_some_and(|c| c.as_ref() != reply) {
                let key = e.key.clone();
                remove(&mut inner, request, &key);
                self.invalidations.fetch_add(1, Ordering::Relaxed);
                self.refresh_active(&inner);
            }
        }
        if let Some(f) = inner.inflight.get_mut(request) {
            f.seen = match std::mem::replace(&mut f.seen, Seen::Nothing) {
                Seen::Nothing => Seen::Reply(proto, Bytes::copy_from_slice(reply)),
                Seen::Reply(p, r) if p == proto && r == reply => Seen::Reply(p, r),
                // Replies in two protocols are not compared: void to be safe.
                _ => Seen::Differing,
            };
        }
    }

    /// `key` changed: drop its replies and void fills in flight for it.
    pub fn invalidate(&self, key: &[u8]) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let requests = match inner.keys.get_mut(key) {
            Some((seq, requests)) => {
                *seq += 1;
                std::mem::take(requests)
            }
            None => {
                if inner.inflight_keys.contains_key(key) {
                    // A fill is in flight for it: remember the bump.
                    inner
                        .keys
                        .insert(Bytes::copy_from_slice(key), (1, Vec::new()));
                }
                return;
            }
        };
        for r in requests {
            if let Some(e) = inner.entries.remove(&r) {
                inner.bytes -= e.size;
            }
        }
        inner.forget_if_unused(key);
        inner.compact_order();
        self.refresh_active(&inner);
    }

    /// Drop everything and void every fill in flight (their tickets no
    /// longer match; they may be retried at once).
    pub fn flush(&self, reason: FlushReason) {
        self.flushes[reason as usize].fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.inflight.clear();
        inner.inflight_keys.clear();
        inner.entries.clear();
        inner.keys.clear();
        inner.order.clear();
        inner.bytes = 0;
        self.refresh_active(&inner);
    }

    /// Keys cached now, with their entries' total bytes, largest first.
    pub fn keys(&self) -> Vec<(Bytes, usize, usize)> {
        let inner = self.lock();
        let mut out: Vec<(Bytes, usize, usize)> = inner
            .keys
            .iter()
            .filter(|(_, (_, r))| !r.is_empty())
            .map(|(k, (_, requests))| {
                let bytes = requests
                    .iter()
                    .filter_map(|r| inner.entries.get(r))
                    .map(|e| e.size)
                    .sum();
                (k.clone(), requests.len(), bytes)
            })
            .collect();
        out.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// (key, request) of every entry, for the warm-up list.
    pub fn requests(&self) -> Vec<(Bytes, Bytes)> {
        let inner = self.lock();
        inner
            .entries
            .iter()
            .map(|(r, e)| (e.key.clone(), r.clone()))
            .collect()
    }

    /// Drop the replies of keys for which `keep` is false.
    pub fn retain_keys(&self, keep: impl Fn(&[u8]) -> bool) {
        let mut inner = self.lock();
        let gone: Vec<Bytes> = inner.keys.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            let Some((seq, requests)) = inner.keys.remove(&k) else {
                continue;
            };
            for r in requests {
                if let Some(e) = inner.entries.remove(&r) {
                    inner.bytes -= e.size;
                }
            }
            if inner.inflight_keys.contains_key(&k) {
                // A fill in flight keeps comparing against this sequence.
                inner.keys.insert(k, (seq, Vec::new()));
            }
        }
        inner.compact_order();
        self.refresh_active(&inner);
    }
}

fn remove(inner: &mut Inner, request: &[u8], key: &Bytes) {
    if let Some(e) = inner.entries.remove(request) {
        inner.bytes -= e.size;
    }
    if let Some((_, requests)) = inner.keys.get_mut(key) {
        requests.retain(|r| r.as_ref() != request);
    }
    inner.forget_if_unused(key);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached reply, through the hit path's `get_into`.
    fn get(s: &Store, request: &[u8], proto: Proto, now: Instant) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        s.get_into(request, proto, now, &mut out)
            .then(|| out.to_vec())
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn fill_hit_invalidate() {
        let s = Store::new(1 << 20);
        let (k, r) = (b("k"), b("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
        let t = s.begin_fill(&k, &r).unwrap();
        assert!(s.begin_fill(&k, &r).is_none(), "single flight");
        assert!(s.complete_fill(
            k.clone(),
            r.clone(),
            t,
            b("$1\r\nv\r\n"),
            Duration::from_secs(5)
        ));
        assert_eq!(
            get(&s, &r, Proto::Resp3, Instant::now()).as_deref(),
            Some(&b"$1\r\nv\r\n"[..])
        );
        assert_eq!(
            get(&s, &r, Proto::Resp2, Instant::now()).as_deref(),
            Some(&b"$1\r\nv\r\n"[..])
        );
        let mut out = BytesMut::from(&b"+before\r\n"[..]);
        assert!(s.get_into(&r, Proto::Resp2, Instant::now(), &mut out));
        assert_eq!(&out[..], b"+before\r\n$1\r\nv\r\n", "appended");
        let later = Instant::now() + Duration::from_secs(6);
        assert!(
            !s.get_into(&r, Proto::Resp2, later, &mut out),
            "expired at `now`"
        );
        assert!(
            get(&s, &r, Proto::Resp3, Instant::now()).is_none(),
            "expiry removed it"
        );
        assert!(s.complete_fill(
            k.clone(),
            r.clone(),
            s.begin_fill(&k, &r).unwrap(),
            b("$1\r\nv\r\n"),
            Duration::from_secs(5)
        ));
        s.invalidate(b"k");
        assert!(get(&s, &r, Proto::Resp3, Instant::now()).is_none());
        assert!(!s.active());
    }

    #[test]
    fn fill_racing_a_write_or_flush_is_dropped() {
        let s = Store::new(1 << 20);
        let (k, r) = (b("k"), b("req"));
        let t = s.begin_fill(&k, &r).unwrap();
        s.invalidate(b"k");
        assert!(!s.complete_fill(k.clone(), r.clone(), t, b(":1\r\n"), Duration::from_secs(5)));
        assert!(get(&s, &r, Proto::Resp3, Instant::now()).is_none());
        let t = s.begin_fill(&k, &r).unwrap();
        s.flush(FlushReason::Start);
        assert!(!s.complete_fill(k, r.clone(), t, b(":1\r\n"), Duration::from_secs(5)));
        assert!(get(&s, &r, Proto::Resp3, Instant::now()).is_none());
    }

    /// Invalidated and refilled over and over, written keys never cached:
    /// the bookkeeping stays the size of what is cached.
    #[test]
    fn bookkeeping_stays_bounded() {
        let s = Store::new(1 << 20);
        let (k, r) = (b("k"), b("req"));
        for i in 0..10_000 {
            let t = s.begin_fill(&k, &r).unwrap();
            // Writes to other keys, some while the fill is in flight.
            s.invalidate(format!("other{i}").as_bytes());
            assert!(s.complete_fill(k.clone(), r.clone(), t, b(":1\r\n"), Duration::from_secs(5)));
            s.invalidate(b"k");
        }
        let t = s.begin_fill(&k, &r).unwrap();
        assert!(s.complete_fill(k.clone(), r.clone(), t, b(":1\r\n"), Duration::from_secs(5)));
        let inner = s.lock();
        assert!(
            inner.order.len() <= 2 * inner.entries.len() + 65,
            "order: {}",
            inner.order.len()
        );
        assert_eq!(inner.keys.len(), 1, "only the cached key has a record");
        assert!(inner.inflight.is_empty() && inner.inflight_keys.is_empty());
        drop(inner);
        // A key invalidated while its own fill is in flight keeps its bump.
        let t = s.begin_fill(&b("j"), &b("rj")).unwrap();
        s.invalidate(b"j");
        assert!(!s.complete_fill(b("j"), b("rj"), t, b(":1\r\n"), Duration::from_secs(5)));
        assert_eq!(s.lock().keys.len(), 1, "the voided fill's record is gone");
    }

    /// An entry cached again is evicted by its new position, not the old one.
    #[test]
    fn a_refilled_entry_is_evicted_by_its_new_age() {
        let s = Store::new(2 * (OVERHEAD + 40));
        let fill = |k: &str, r: &str| {
            let t = s.begin_fill(&b(k), &b(r)).unwrap();
            assert!(s.complete_fill(b(k), b(r), t, b(":1\r\n"), Duration::from_secs(5)));
        };
        fill("a", "ra");
        fill("b", "rb");
        s.invalidate(b"a");
        fill("a", "ra");
        // Full: the oldest live entry is b, not the refilled a.
        fill("c", "rc");
        assert!(
            get(&s, b"ra", Proto::Resp3, Instant::now()).is_some(),
            "a kept"
        );
        assert!(
            get(&s, b"rb", Proto::Resp3, Instant::now()).is_none(),
            "b evicted"
        );
        assert!(
            get(&s, b"rc", Proto::Resp3, Instant::now()).is_some(),
            "c kept"
        );
    }

    /// A fill begun before a flush ends after a new fill of the same
    /// request began: it does not end the new one, which still sees a
    /// write made meanwhile.
    #[test]
    fn an_old_fill_does_not_end_a_newer_one() {
        let s = Store::new(1 << 20);
        let (k, r) = (b("k"), b("req"));
        let t1 = s.begin_fill(&k, &r).unwrap();
        s.flush(FlushReason::Command);
        let t2 = s.begin_fill(&k, &r).unwrap();
        assert!(!s.complete_fill(
            k.clone(),
            r.clone(),
            t1,
            b(":1\r\n"),
            Duration::from_secs(5)
        ));
        s.invalidate(b"k");
        assert!(!s.complete_fill(k, r.clone(), t2, b(":1\r\n"), Duration::from_secs(5)));
        assert!(get(&s, &r, Proto::Resp3, Instant::now()).is_none());
    }

    /// A reply a client got from Redis after a fill began hides that
    /// fill's reply from the client, until the tracking connection syncs.
    #[test]
    fn a_fill_older_than_what_a_client_saw_is_not_served_to_it() {
        let s = Store::new(1 << 20);
        let (k, r) = (b("k"), b("req"));
        let before = Instant::now() - Duration::from_micros(1);
        let t = s.begin_fill(&k, &r).unwrap();
        let seen = Instant::now();
        assert!(s.complete_fill(k.clone(), r.clone(), t, b(":1\r\n"), Duration::from_secs(5)));
        let mut out = BytesMut::new();
        assert!(!s.get_into_after(&r, Proto::Resp3, Instant::now(), Some(seen), &mut out));
        assert!(s.get_into_after(&r, Proto::Resp3, Instant::now(), Some(before), &mut out));
        assert!(s.get_into(&r, Proto::Resp3, Instant::now(), &mut out));
        s.synced(Instant::now());
        assert!(s.get_into_after(&r, Proto::Resp3, Instant::now(), Some(seen), &mut out));
    }

    /// A client's read answered by Redis during a fill: the fill lands only
    /// if it read the same; a cached reply that differs is dropped.
    #[test]
    fn a_read_seen_elsewhere_decides_a_fill_and_an_entry() {
        let s = Store::new(1 << 20);
        let (k, r) = (b("k"), b("req"));
        let t = s.begin_fill(&k, &r).unwrap();
        s.observed(&r, Proto::Resp2, b":2\r\n");
        assert!(!s.complete_fill(k.clone(), r.clone(), t, b(":1\r\n"), Duration::from_secs(5)));
        let t = s.begin_fill(&k, &r).unwrap();
        s.observed(&r, Proto::Resp3, b":2\r\n");
        assert!(s.complete_fill(k.clone(), r.clone(), t, b(":2\r\n"), Duration::from_secs(5)));
        s.observed(&r, Proto::Resp2, b":2\r\n");
        assert!(
            get(&s, &r, Proto::Resp3, Instant::now()).is_some(),
            "same reply: kept"
        );
        s.observed(&r, Proto::Resp2, b":3\r\n");
        assert!(
            get(&s, &r, Proto::Resp3, Instant::now()).is_none(),
            "dropped"
        );
        let t = s.begin_fill(&k, &r).unwrap();
        s.observed(&r, Proto::Resp2, b":2\r\n");
        s.observed(&r, Proto::Resp2, b":3\r\n");
        assert!(!s.complete_fill(k, r, t, b(":3\r\n"), Duration::from_secs(5)));
    }

    #[test]
    fn expiry_and_budget() {
        let s = Store::new(2 * (OVERHEAD + 40));
        for i in 0..5 {
            let (k, r) = (b(&format!("k{i}")), b(&format!("req{i}")));
            let t = s.begin_fill(&k, &r).unwrap();
            assert!(s.complete_fill(k, r, t, b(":1\r\n"), Duration::from_secs(5)));
        }
        assert!(
            s.len() <= 2 && s.bytes() <= 2 * (OVERHEAD + 40),
            "over budget"
        );
        assert!(
            get(&s, b"req4", Proto::Resp3, Instant::now()).is_some(),
            "newest kept"
        );
        let (k, r) = (b("x"), b("rx"));
        let t = s.begin_fill(&k, &r).unwrap();
        assert!(s.complete_fill(k, r, t, b(":1\r\n"), Duration::from_millis(1)));
        // Poll until the 1 ms lifetime has run out (deadline: 1 s).
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && get(&s, b"rx", Proto::Resp3, Instant::now()).is_some() {
            std::hint::spin_loop();
        }
        assert!(
            get(&s, b"rx", Proto::Resp3, Instant::now()).is_none(),
            "expired"
        );
    }
}

//! The near cache: replies to read-only single-key commands on hot keys,
//! served by keyward itself and kept coherent with Redis's client-side
//! caching (DESIGN.md decision 7).
//!
//! Only keys the hot-key detector calls hot are cached, in every database
//! (by `store_key`: database and request bytes), for the commands listed in
//! `cacheable`. A miss on a hot key is forwarded as usual
//! and starts one fill (single flight) on the tracking connection; a write
//! through keyward drops the key before it is forwarded, so a client always
//! reads its own writes. Entries live `min(PTTL, cache.max_ttl_ms)`. MGET is
//! answered from the cached GET replies of its keys when all are there.

pub mod resp3;
pub mod store;
pub mod tracking;
pub mod warmup;
pub mod written;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::command::table::lowercase;
use crate::config::CacheConfig;
use crate::hotkey::Detector;
use crate::resp::{reply, Proto};
use store::Store;
use tracking::Fill;

/// What `NearCache::lookup` found for a request.
pub enum Lookup {
    /// Answered from the cache (the reply is in `out`).
    Hit,
    /// A request the cache answers, on a key that is not hot.
    Cold,
    /// A read of hot keys that goes to Redis. Its reply is to be shown to
    /// `NearCache::observe` with these: the store key of the request, or for
    /// MGET each key's GET (as `GET` and `get`, the two spellings cached).
    Miss(Miss),
    /// Not a request the cache answers (or an MGET of keys not all hot).
    Pass,
}

/// How a client asks the cache (see `NearCache::lookup`).
#[derive(Clone, Copy)]
pub struct Ask {
    pub db: i64,
    pub proto: Proto,
    /// When the request was read: entries expire against it, so a hit
    /// costs no clock read.
    pub now: Instant,
    /// False while the client has a write, or a read of these keys, in
    /// flight: nothing is answered or filled, only the miss reported.
    pub serve: bool,
    /// When the client last got a reply from Redis that read these keys
    /// other than through the cache: only fills begun after it are served.
    pub seen: Option<Instant>,
}

/// A forwarded read of hot keys (see `Lookup::Miss`).
pub struct Miss {
    pub requests: Vec<Bytes>,
    pub mget: bool,
}

pub struct NearCache {
    pub config: CacheConfig,
    pub store: Store,
    fills: mpsc::Sender<Fill>,
    /// The tracking link is up (fills can be served).
    pub link_up: std::sync::atomic::AtomicBool,
    /// Warm-up has finished (or there was nothing to warm).
    pub warm: std::sync::atomic::AtomicBool,
    /// A client asked for the tracking link to sync (see `want_sync`).
    pub sync_wanted: std::sync::atomic::AtomicBool,
    pub sync: tokio::sync::Notify,
}

/// Commands whose reply depends only on one key's value (and not on time).
fn cacheable(name: &[u8], argc: usize) -> bool {
    let mut buf = [0u8; 64];
    let Some(n) = lowercase(name, &mut buf) else {
        return false;
    };
    match n {
        b"exists" => argc == 2,
        b"get" | b"getrange" | b"strlen" | b"type" | b"hget" | b"hmget" | b"hgetall"
        | b"hexists" | b"hlen" | b"hstrlen" | b"lrange" | b"llen" | b"lindex" | b"smembers"
        | b"sismember" | b"smismember" | b"scard" | b"zrange" | b"zrevrange" | b"zrangebyscore"
        | b"zrevrangebyscore" | b"zrangebylex" | b"zrevrangebylex" | b"zscore" | b"zmscore"
        | b"zcard" | b"zrank" | b"zrevrank" => argc >= 2,
        _ => false,
    }
}

/// How the store names a request read in database `db`: its bytes in
/// database 0; in another, `SELECT db` followed by them, which is also what
/// the fill sends (and it selects database 0 again after).
pub fn store_key(db: i64, frame: &[u8], out: &mut BytesMut) {
    select_prefix(db, out);
    out.extend_from_slice(frame);
}

/// `store_key` of `name key` (MGET's per-key GET), written at once.
fn get_store_key(db: i64, name: &[u8], key: &[u8], out: &mut BytesMut) {
    select_prefix(db, out);
    reply::command(out, &[name, key]);
}

fn select_prefix(db: i64, out: &mut BytesMut) {
    if db != 0 {
        let mut n = itoa::Buffer::new();
        reply::command(out, &[b"SELECT", n.format(db).as_bytes()]);
    }
}

/// The database of a store key and where its command starts; `None` if
/// the bytes are not one `SELECT n` (n > 0) followed by one request, or
/// one request alone (say, a warm-up list edited by hand).
pub fn split_store_key(request: &[u8]) -> Option<(i64, usize)> {
    use crate::resp::request::{Parsed, RequestParser};
    let limits = crate::resp::Limits {
        max_bulk: request.len(),
        max_request: request.len(),
    };
    let mut parser = RequestParser::new();
    let Ok(Some(Parsed::Request(first))) = parser.parse(request, &limits) else {
        return None;
    };
    let is_select = first.args.len() == 2 && first.arg(request, 0) == b"SELECT";
    let (db, at) = match is_select {
        true => {
            let n = std::str::from_utf8(first.arg(request, 1))
                .ok()?
                .parse::<i64>()
                .ok()?;
            (n, first.consumed)
        }
        false => (0, 0),
    };
    if is_select && db <= 0 {
        return None;
    }
    let rest = &request[at..];
    let mut parser = RequestParser::new();
    match parser.parse(rest, &limits) {
        Ok(Some(Parsed::Request(r)))
            if r.consumed == rest.len() && cacheable(r.arg(rest, 0), r.args.len()) =>
        {
            Some((db, at))
        }
        _ => None,
    }
}

impl NearCache {
    /// The cache and the receiving end of its fill queue (for the tracking task).
    pub fn new(config: CacheConfig) -> (Arc<NearCache>, mpsc::Receiver<Fill>) {
        let (tx, rx) = mpsc::channel(config.max_fills_in_flight);
        let store = Store::new(config.max_mb * 1024 * 1024);
        let cache = NearCache {
            config,
            store,
            fills: tx,
            link_up: std::sync::atomic::AtomicBool::new(false),
            warm: std::sync::atomic::AtomicBool::new(false),
            sync_wanted: std::sync::atomic::AtomicBool::new(false),
            sync: tokio::sync::Notify::new(),
        };
        (Arc::new(cache), rx)
    }

    /// Append the cached reply for this request to `out` if there is one
    /// (`Lookup::Hit`); on a miss for a hot key, a fill starts in the
    /// background (see `Ask` for when neither happens). An entry exists
    /// only for a key that was hot when filled; keys that cool down are
    /// dropped when the hot set changes, so a hit needs no hot-set lookup.
    #[inline]
    pub fn lookup(
        &self,
        hot: &Detector,
        args: &[&[u8]],
        frame: &[u8],
        ask: &Ask,
        out: &mut BytesMut,
    ) -> Lookup {
        use std::sync::atomic::Ordering::Relaxed;
        let Ask {
            db,
            proto,
            now,
            serve,
            seen,
        } = *ask;
        if hot.hot_now.load(Relaxed) == 0 || args.len() < 2 {
            return Lookup::Pass;
        }
        if args[0].eq_ignore_ascii_case(b"mget") {
            return self.lookup_mget(hot, &args[1..], ask, out);
        }
        if !cacheable(args[0], args.len()) {
            return Lookup::Pass;
        }
        let mut named = BytesMut::new();
        let request: &[u8] = if db == 0 {
            frame
        } else {
            store_key(db, frame, &mut named);
            &named
        };
        if serve && self.store.get_into_after(request, proto, now, seen, out) {
            self.store.hits.fetch_add(1, Relaxed);
            return Lookup::Hit;
        }
        if !hot.is_hot(args[1]) {
            return Lookup::Cold;
        }
        let request = Bytes::copy_from_slice(request);
        self.store.misses.fetch_add(1, Relaxed);
        if serve {
            self.fill(Bytes::copy_from_slice(args[1]), request.clone(), db);
        }
        Lookup::Miss(Miss {
            requests: vec![request],
            mget: false,
        })
    }

    /// A reply Redis gave to a read that `lookup` reported as a miss, in
    /// the client's protocol. Redis may have run it after a write whose
    /// invalidation has not reached keyward yet, and the client has seen
    /// it: a cached reply or a fill in flight that differs could be older
    /// and must not be served to the client after it.
    pub fn observe(&self, miss: &Miss, proto: Proto, reply: &[u8]) {
        if !miss.mget {
            if let Some(r) = miss.requests.first() {
                self.store.observed(r, proto, reply);
            }
            return;
        }
        if reply.first() != Some(&b'*') {
            return;
        }
        for (value, pair) in crate::resp::scan::elements(reply).zip(miss.requests.chunks(2)) {
            for r in pair {
                self.store.observed(r, proto, value);
            }
        }
    }

    /// MGET, served per key: when every key is hot and its `GET` reply is
    /// cached, the replies are put together as Redis would (a key holding
    /// another type is a null in MGET, not an error). Otherwise the missing
    /// keys' `GET`s are filled for next time and MGET goes to Redis.
    fn lookup_mget(&self, hot: &Detector, keys: &[&[u8]], ask: &Ask, out: &mut BytesMut) -> Lookup {
        use std::sync::atomic::Ordering::Relaxed;
        let db = ask.db;
        if !keys.iter().all(|k| hot.is_hot(k)) {
            return Lookup::Pass;
        }
        let get_of = |name: &[u8], k: &[u8]| {
            let mut named = BytesMut::new();
            get_store_key(db, name, k, &mut named);
            named.freeze()
        };
        let miss = || {
            Lookup::Miss(Miss {
                requests: keys
                    .iter()
                    .flat_map(|k| [get_of(b"GET", k), get_of(b"get", k)])
                    .collect(),
                mget: true,
            })
        };
        if !ask.serve {
            self.store.misses.fetch_add(1, Relaxed);
            return miss();
        }
        let start = out.len();
        reply::array(out, keys.len());
        let mut frame = BytesMut::with_capacity(64);
        let mut missing: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        for (i, k) in keys.iter().enumerate() {
            // Cached by exact request bytes: clients send GET or get.
            let at = out.len();
            let cached = [b"GET".as_slice(), b"get"].iter().any(|name| {
                frame.clear();
                get_store_key(db, name, k, &mut frame);
                self.store
                    .get_into_after(&frame, ask.proto, ask.now, ask.seen, out)
            });
            if !cached {
                missing.push(i);
            } else if out.get(at) == Some(&b'-') {
                // WRONGTYPE from GET is a null in MGET.
                out.truncate(at);
                match ask.proto {
                    Proto::Resp2 => out.extend_from_slice(b"$-1\r\n"),
                    Proto::Resp3 => out.extend_from_slice(b"_\r\n"),
                }
            }
        }
        if missing.is_empty() {
            self.store.hits.fetch_add(1, Relaxed);
            return Lookup::Hit;
        }
        out.truncate(start);
        self.store.misses.fetch_add(1, Relaxed);
        for i in missing {
            frame.clear();
            get_store_key(db, b"GET", keys[i], &mut frame);
            self.fill(Bytes::copy_from_slice(keys[i]), frame.split().freeze(), db);
        }
        miss()
    }

    /// A client got a reply from Redis reading hot keys, and is served
    /// only fills begun after it until the tracking link has synced: ask
    /// for that sync now (a PING; at most one on its way) rather than at
    /// the next `cache.ping_ms` tick.
    pub fn want_sync(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        if !self.sync_wanted.swap(true, AcqRel) {
            self.sync.notify_one();
        }
    }

    /// Start a fill of `request` (a store key of database `db`) on `key`
    /// unless one is in flight; false if none was started.
    pub fn fill(&self, key: Bytes, request: Bytes, db: i64) -> bool {
        if let Some(ticket) = self.store.begin_fill(&key, &request) {
            let fill = Fill {
                key,
                request: request.clone(),
                selects: db != 0,
                ticket,
            };
            if self.fills.try_send(fill).is_err() {
                // Queue full (cache.max_fills_in_flight): no fill this time.
                crate::metrics::Limit::CacheMaxFillsInFlight.reached();
                self.store.abandon_fill(&request, ticket);
                return false;
            }
            return true;
        }
        false
    }
}

/// What `KEYWARD CACHE` and `GET /cache` show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub enabled: bool,
    pub link_up: bool,
    pub budget_bytes: usize,
    pub bytes: usize,
    pub entries: usize,
    pub hits: usize,
    pub misses: usize,
    pub fills: usize,
    pub fills_voided: usize,
    pub invalidations: usize,
    pub flushes: std::collections::BTreeMap<&'static str, usize>,
    /// Keys cached now: (key, replies cached, bytes), largest first.
    pub keys: Vec<(String, usize, usize)>,
}

impl NearCache {
    pub fn stats(&self, max_keys: usize) -> Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.store;
        Stats {
            enabled: true,
            link_up: self.link_up.load(Relaxed),
            budget_bytes: self.config.max_mb * 1024 * 1024,
            bytes: s.bytes(),
            entries: s.len(),
            hits: s.hits.load(Relaxed),
            misses: s.misses.load(Relaxed),
            fills: s.fills.load(Relaxed),
            fills_voided: s.fills_voided.load(Relaxed),
            invalidations: s.invalidations.load(Relaxed),
            flushes: store::FlushReason::ALL
                .iter()
                .map(|r| (r.name(), s.flushes[*r as usize].load(Relaxed)))
                .collect(),
            keys: s
                .keys()
                .into_iter()
                .take(max_keys)
                .map(|(k, n, b)| (String::from_utf8_lossy(&k).into_owned(), n, b))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cacheable_commands() {
        assert!(cacheable(b"GET", 2));
        assert!(cacheable(b"hgetall", 2));
        assert!(cacheable(b"EXISTS", 2));
        assert!(!cacheable(b"EXISTS", 3));
        assert!(!cacheable(b"TTL", 2));
        assert!(!cacheable(b"SRANDMEMBER", 2));
        assert!(!cacheable(b"SET", 3));
    }

    #[test]
    fn store_keys_name_the_database() {
        let mut get = BytesMut::new();
        reply::command(&mut get, &[b"GET", b"k"]);
        let mut k0 = BytesMut::new();
        store_key(0, &get, &mut k0);
        assert_eq!(k0, get);
        assert_eq!(split_store_key(&k0), Some((0, 0)));
        let mut k3 = BytesMut::new();
        store_key(3, &get, &mut k3);
        assert_eq!(
            &k3[..],
            b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        assert_eq!(split_store_key(&k3), Some((3, 23)));
        // Not what keyward saves: refused, never sent on the tracking link.
        let mut two = k0.clone();
        two.extend_from_slice(&get);
        assert_eq!(split_store_key(&two), None);
        let mut set = BytesMut::new();
        reply::command(&mut set, &[b"SET", b"k", b"v"]);
        assert_eq!(split_store_key(&set), None);
        let mut sel0 = BytesMut::new();
        reply::command(&mut sel0, &[b"SELECT", b"0"]);
        sel0.extend_from_slice(&get);
        assert_eq!(split_store_key(&sel0), None);
        assert_eq!(split_store_key(b"*2\r\n$3\r\nGET"), None);
    }
}

//! One client connection: a reader task that frames requests and routes them,
//! and a writer task that sends replies back in request order.
//!
//! The reader turns the byte stream into an ordered list of entries: replies
//! keyward makes itself, batches sent to the shared pool (a run of
//! consecutive ordinary requests goes upstream as one contiguous slice of the
//! read buffer), and a relay from a pinned connection while the client holds
//! connection state. The writer walks the entries in order, awaiting each, so
//! replies keep the order of requests whatever mix of routes they took.
//!
//! Switching route (pool to pinned, or between the RESP2 and RESP3 pools)
//! waits until every earlier reply is back, because Redis orders commands per
//! connection only: a command sent on another connection could overtake an
//! earlier one still in flight.
//!
//! Metrics: each entry carries when its requests were read, their families
//! (a `Tally`) and the id of its first request; the writer records the
//! batch's latency once its bytes are written (one clock read per write),
//! counts error replies by position, and puts slow pooled batches in the
//! slow log. Requests are numbered per connection (`req` in log lines).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::local;
use super::registry::ClientInfo;
use super::state::SessionState;
use super::{Ctx, Sent};
use crate::cache::written::{changes_databases, Written};
use crate::cache::Lookup;
use crate::command::class::route;
use crate::command::keys::{for_each_key, for_each_written_key};
use crate::command::table::flags;
use crate::command::{Class, Family};
use crate::error::{Error, Kind};
use crate::hotkey::sampler::Sampler;
use crate::metrics::{ErrorKind, Limit, Tally};
use crate::resp::reply;
use crate::resp::request::Args;
use crate::resp::scan::parse_int;
use crate::resp::{Parsed, Proto, Request, RequestParser};
use crate::upstream::{BatchResult, Meter, PinMsg, Pinned, Replies};

/// Local replies are flushed to the writer once this large.
const LOCAL_FLUSH: usize = 64 * 1024;
/// Writer buffer size above which replies are written out.
const WRITE_FLUSH: usize = 64 * 1024;
/// Replies at least this large are written from their own buffer, not copied.
const WRITE_DIRECT: usize = 16 * 1024;

/// What the metrics need of a batch of requests: when they were read,
/// their families, and the number of the first on its connection (the
/// request id in log lines).
struct Batch {
    start: Instant,
    tally: Tally,
    first_seq: u64,
}

/// One step of the reply stream, in request order.
///
/// Boxed payloads keep it two words: the queue allocates its first block of
/// 32 entries with every client, so an idle client costs 0.5 KiB here
/// rather than 5.5 KiB (one small allocation per batch buys that back).
enum Entry {
    Ready(Box<Ready>),
    Pooled(Box<Pooled>),
    /// Everything a pinned connection sends, until it is released.
    Relay(mpsc::Receiver<PinMsg>),
    /// Close the connection once everything before is written.
    Close,
}

/// Replies keyward made itself for `n` requests; `errors` are the indexes
/// of error replies among them.
struct Ready {
    bytes: Bytes,
    n: u32,
    errors: Vec<u32>,
    batch: Batch,
}

/// A batch sent to the shared pool.
struct Pooled {
    rx: oneshot::Receiver<BatchResult>,
    req: Bytes,
    count: u32,
    /// The pool it went to: RESP version and database (a failed read
    /// is retried there).
    route: (Proto, i64),
    /// What the batch writes, dropped from the near cache again when
    /// its reply arrives (see `cache::written`).
    written: Written,
    /// Its reads of hot keys, whose replies the near cache is shown.
    hot: Vec<HotRead>,
    batch: Batch,
}

/// State the reader and writer share.
struct Shared {
    /// Output meter and kill switch: `meter.kill()` aborts both tasks.
    meter: Arc<Meter>,
    /// Entries queued and not yet finished by the writer.
    entries: AtomicUsize,
    drained: Notify,
    /// Requests waiting for replies (server.max_pending_requests).
    permits: Semaphore,
    /// Batches (or pinned requests) sent with writes whose replies have not
    /// arrived. While there are any, this client's reads skip the near
    /// cache: a read sent behind its own write would otherwise start a fill
    /// that may run on the tracking connection before the write does, and
    /// a later read could be answered with what that fill read.
    writes_in_flight: AtomicUsize,
    /// Keys of this client's reads of hot keys sent to Redis whose replies
    /// the writer has not handled yet (`hot_reads_n` of them): its reads
    /// of those keys skip the near cache until then, so it never gets a
    /// cached value older than what Redis has just told it.
    hot_reads: std::sync::Mutex<Vec<Bytes>>,
    hot_reads_n: AtomicUsize,
    /// Hot keys this client has read from Redis other than through the
    /// near cache (a command the cache does not answer, a dedicated
    /// connection), and when the reply came (`seen_n` of them): cached
    /// replies whose fills began before are not served to it.
    seen: std::sync::Mutex<std::collections::HashMap<Bytes, Instant>>,
    seen_n: AtomicUsize,
    /// The reader has ended (the client closed its sending side, QUIT, a
    /// protocol error): from then on a write that makes no progress for
    /// `server.drain_timeout_ms` closes the client.
    reader_gone: AtomicBool,
    gone: Notify,
}

/// Tells the writer the reader has ended, however it ends.
struct ReaderGone(Arc<Shared>);

impl Drop for ReaderGone {
    fn drop(&mut self) {
        self.0.reader_gone.store(true, Ordering::Release);
        self.0.gone.notify_one();
    }
}

impl Shared {
    /// A read of one of `keys` sent to Redis is not answered yet.
    fn hot_reads_busy(&self, keys: &[&[u8]]) -> bool {
        if self.hot_reads_n.load(Ordering::Acquire) == 0 {
            return false;
        }
        let list = self.hot_reads.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter().any(|k| list.iter().any(|h| h.as_ref() == *k))
    }

    fn begin_hot_read(&self, keys: &[Bytes]) {
        let mut list = self.hot_reads.lock().unwrap_or_else(|e| e.into_inner());
        list.extend(keys.iter().cloned());
        self.hot_reads_n.store(list.len(), Ordering::Release);
    }

    /// The latest time one of `keys` was `seen`.
    fn seen_for(&self, keys: &[&[u8]]) -> Option<Instant> {
        if self.seen_n.load(Ordering::Acquire) == 0 {
            return None;
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter().filter_map(|k| seen.get(*k).copied()).max()
    }

    /// Replies reading `keys` came from Redis now: until the tracking link
    /// has synced, fills begun before are not served to this client. Times
    /// older than any cached reply can be are dropped as the map grows.
    fn mark_seen(&self, keys: &[Bytes], cache: &crate::cache::NearCache) {
        if keys.is_empty() {
            return;
        }
        cache.want_sync();
        let keep = seen_keep(cache);
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= 64 {
            seen.retain(|_, at| now.duration_since(*at) < keep);
        }
        for k in keys {
            seen.insert(k.clone(), now);
        }
        self.seen_n.store(seen.len(), Ordering::Release);
    }

    /// A batch's reads of hot keys are answered: their keys are `seen`,
    /// and no longer in flight.
    fn hot_reads_done(&self, hot: &[HotRead], ctx: &Ctx) {
        if hot.is_empty() {
            return;
        }
        let keys: SmallVec<[Bytes; 4]> = hot.iter().flat_map(|h| h.keys.iter().cloned()).collect();
        if let Some(cache) = &ctx.cache {
            self.mark_seen(&keys, cache);
        }
        let mut list = self.hot_reads.lock().unwrap_or_else(|e| e.into_inner());
        for k in &keys {
            if let Some(i) = list.iter().position(|h| h == k) {
                list.swap_remove(i);
            }
        }
        self.hot_reads_n.store(list.len(), Ordering::Release);
    }

    fn finish_entry(&self, requests: u32) {
        if requests > 0 {
            self.permits.add_permits(requests as usize);
        }
        if self.entries.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }
}

/// Decrements the client count and leaves the registry however the reader
/// task ends (including being aborted).
struct ClientSlot(Arc<Ctx>, u64);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        tracing::debug!(conn = self.1, "client disconnected");
        self.0.registry.remove(self.1);
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Start serving one client: the writer goes on `writers` (shutdown waits
/// for it to deliver what is owed), the reader on `readers` (shutdown aborts
/// it, which stops new requests). The client slot is already counted.
pub fn start(
    ctx: Arc<Ctx>,
    stream: TcpStream,
    id: u64,
    peer: std::net::SocketAddr,
    readers: &mut JoinSet<()>,
    writers: &TaskTracker,
) {
    let _ = stream.set_nodelay(true);
    let info = ctx.registry.add(id, peer);
    tracing::debug!(conn = id, %peer, "client connected");
    let (rd, wr) = stream.into_split();
    let shared = Arc::new(Shared {
        meter: Arc::new(Meter::new(id, ctx.config.server.max_reply_bytes)),
        entries: AtomicUsize::new(0),
        drained: Notify::new(),
        permits: Semaphore::new(ctx.config.server.max_pending_requests),
        writes_in_flight: AtomicUsize::new(0),
        hot_reads: Default::default(),
        hot_reads_n: AtomicUsize::new(0),
        seen: Default::default(),
        seen_n: AtomicUsize::new(0),
        reader_gone: AtomicBool::new(false),
        gone: Notify::new(),
    });
    // The client counts (server.max_clients, the clients gauge, the
    // registry) until both halves are done: a client that half-closes
    // still holds its socket and the replies it is owed.
    let slot = Arc::new(ClientSlot(ctx.clone(), id));
    let (tx, rx) = mpsc::unbounded_channel();
    let wfut = {
        let (ctx, shared, info, slot) = (ctx.clone(), shared.clone(), info.clone(), slot.clone());
        async move {
            let _slot = slot;
            write_loop(ctx, shared, rx, wr, id, info).await
        }
    };
    let writer = writers.spawn(wfut);
    let mut reader = Reader {
        ctx: ctx.clone(),
        id,
        shared: shared.clone(),
        entries: tx,
        buf: BytesMut::new(),
        parser: RequestParser::new(),
        proto: Proto::Resp2,
        state: SessionState::default(),
        pinned: None,
        pinned_tx: None,
        local: BytesMut::new(),
        local_n: 0,
        run_count: 0,
        target: Target::Pool(Proto::Resp2, 0, 0),
        closing: false,
        sampler: Sampler::new(id),
        run_replica: false,
        replica_reads: false,
        pending_written: Written::default(),
        multi_written: Written::default(),
        info,
        seq: 0,
        read_at: Instant::now(),
        family: Family::Other,
        run_tally: Tally::default(),
        run_hot: Vec::new(),
        pinned_reads: Vec::new(),
        run_first_seq: 0,
        local_tally: Tally::default(),
        local_errors: Vec::new(),
        local_first_seq: 0,
        last_cmd: SmallVec::new(),
        published_cmd: SmallVec::new(),
        hit_buf: BytesMut::new(),
        rd: None,
        read_ahead: false,
    };
    let gone = ReaderGone(shared.clone());
    let fut = async move {
        let _slot = slot;
        let _gone = gone;
        reader.run(rd).await;
        if let Some(p) = reader.pinned.take() {
            drop(reader);
            p.release().await;
        }
    };
    let reader = readers.spawn(fut);
    shared.meter.set_tasks(reader, writer.abort_handle());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The shared pool of one RESP version and database in one upstream
    /// generation.
    Pool(Proto, i64, u64),
    Pinned,
}

struct Reader {
    ctx: Arc<Ctx>,
    id: u64,
    shared: Arc<Shared>,
    entries: mpsc::UnboundedSender<Entry>,
    buf: BytesMut,
    parser: RequestParser,
    proto: Proto,
    state: SessionState,
    pinned: Option<Pinned>,
    /// The session's handle on the relay channel, for its own replies while
    /// pinned; dropped on release so the relay can end.
    pinned_tx: Option<mpsc::Sender<PinMsg>>,
    /// Local replies not yet handed to the writer, for `local_n` requests.
    local: BytesMut,
    local_n: u32,
    /// Requests in the run at the front of `buf` bound for the pool.
    run_count: u32,
    /// Where the last request went.
    target: Target,
    closing: bool,
    /// Which requests the hot-key detector samples.
    sampler: Sampler,
    /// The run at the front of `buf` goes to a replica.
    run_replica: bool,
    /// Reads were sent to a replica since the last wait for every reply:
    /// the next batch for the master waits for them, so a read never sees
    /// a write the client sent after it.
    replica_reads: bool,
    /// What requests not yet handed on write: dropped from the near cache
    /// when sent and again when their replies arrive (see `cache::written`).
    pending_written: Written,
    /// What the commands queued in this client's MULTI write: they run,
    /// so they are dropped again, when EXEC's reply arrives.
    multi_written: Written,
    /// This client in the registry (KEYWARD CLIENTS).
    info: Arc<ClientInfo>,
    /// Requests read so far; the current one's number is its request id.
    seq: u64,
    /// When the last read returned: where request latency starts.
    read_at: Instant,
    /// The current request's family.
    family: Family,
    /// Families of the run bound for the pool, and its first request id.
    run_tally: Tally,
    /// The run's reads of hot keys that the near cache did not answer.
    run_hot: Vec<HotRead>,
    /// Hot keys read on the pinned connection: `seen` once it is given up
    /// (every reply is in by then).
    pinned_reads: Vec<Bytes>,
    run_first_seq: u64,
    /// Families of the local replies not yet handed to the writer, which
    /// of them are errors, and the first one's request id.
    local_tally: Tally,
    local_errors: Vec<u32>,
    local_first_seq: u64,
    /// The last command name read (KEYWARD CLIENTS shows it), and the one
    /// last published to the registry.
    last_cmd: SmallVec<[u8; 16]>,
    published_cmd: SmallVec<[u8; 16]>,
    /// A cache hit's reply while a run waits to be sent before it.
    hit_buf: BytesMut,
    /// The client's socket, read in `run` (set there).
    rd: Option<OwnedReadHalf>,
    /// Requests were read into `buf` while waiting for a pinned
    /// connection's replies (see `wait_owed`), not yet parsed.
    read_ahead: bool,
}

impl Reader {
    async fn run(&mut self, rd: OwnedReadHalf) {
        self.rd = Some(rd);
        let idle = match self.ctx.config.server.idle_timeout_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        while !self.closing {
            // A client that left its state (EXEC, last UNSUBSCRIBE) and went
            // quiet gives its pinned connection back without waiting for its
            // next request.
            self.maybe_release().await;
            if std::mem::take(&mut self.read_ahead) {
                // Requests read while the release waited: handle them now,
                // not when the client next sends something.
                self.read_at = Instant::now();
                self.process_read().await;
                continue;
            }
            crate::resp::release_if_large(&mut self.buf, 4096);
            crate::resp::make_room(&mut self.buf, self.parser.need(), 4096);
            let Some(rd) = self.rd.as_mut() else { return };
            let buf = &mut self.buf;
            let pinned = &self.pinned;
            // A SUBSCRIBE not yet answered may have been refused: once
            // everything is in, the state may be clean.
            let releasable = pinned.is_some() && (self.state.clean() || self.state.unsettled());
            // As Redis's `timeout`: subscribers and MONITOR are never idle.
            let timed = idle.filter(|_| !self.state.subscribed() && !self.state.monitor);
            // None: quiet for the idle timeout.
            let read = async {
                match timed {
                    Some(t) => tokio::time::timeout(t, rd.read_buf(buf)).await.ok(),
                    None => Some(rd.read_buf(buf).await),
                }
            };
            let became_idle = async {
                match pinned {
                    Some(p) if releasable => p.wait_idle().await,
                    _ => std::future::pending().await,
                }
            };
            let lost = async {
                match pinned {
                    Some(p) => p.wait_lost().await,
                    None => std::future::pending().await,
                }
            };
            let n = tokio::select! {
                biased;
                _ = lost => {
                    Box::pin(self.on_pinned_lost()).await;
                    continue;
                }
                _ = became_idle => continue,
                r = read => r,
            };
            match n {
                // A blocked call (BLPOP) waiting for its answer is not idle.
                None if self.pinned.as_ref().is_some_and(|p| !p.idle()) => continue,
                None => {
                    Limit::IdleTimeout.reached();
                    return;
                }
                Some(Ok(0)) => {
                    // The client is done sending. Redis answers what it has
                    // read first, even what keyward does not count (a
                    // subscription confirmation from an EXEC under CLIENT
                    // REPLY OFF): a request behind it says when that is.
                    if self.pinned.as_ref().is_some_and(|p| !p.blocked()) {
                        self.confirm_silent().await;
                        // And every reply before the connection is given up:
                        // Redis drops what it has not sent yet when its
                        // client closes (within the command timeout).
                        if let Some(p) = &self.pinned {
                            let t = self.ctx.config.command_timeout();
                            let _ = tokio::time::timeout(t, p.wait_idle()).await;
                        }
                    }
                    return;
                }
                Some(Err(_)) => return,
                Some(Ok(n)) => {
                    self.read_at = Instant::now();
                    self.ctx
                        .stats
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            self.process_read().await;
        }
    }

    /// Handle what has been read, and show it in the client registry.
    async fn process_read(&mut self) {
        let before = self.seq;
        self.process().await;
        if self.seq > before {
            self.publish_info(self.seq - before);
        }
    }

    /// Update this client's registry record: `n` more requests, and the
    /// last command's name when it changed (the lock is taken only then).
    fn publish_info(&mut self, n: u64) {
        self.info.active(n, self.read_at);
        if self.published_cmd != self.last_cmd {
            self.info.set_cmd(&self.last_cmd);
            self.published_cmd.clone_from(&self.last_cmd);
        }
        self.info.set_pinned(self.pinned.is_some());
        self.info.set_proto(self.proto.number() as u8);
    }

    /// Handle every complete request in the buffer.
    async fn process(&mut self) {
        // The run of pool-bound requests occupies buf[..off].
        let mut off = 0usize;
        // One snapshot of the command table per read, not per request.
        let table = self.ctx.learned.table.load_full();
        loop {
            if self.closing {
                return;
            }
            let parsed = match self.parser.parse(&self.buf[off..], &self.ctx.limits) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    if let Some(limit) = e.limit() {
                        limit.reached();
                    }
                    self.emit_run(&mut off).await;
                    self.seq += 1;
                    self.family = Family::Other;
                    self.local_error(ErrorKind::ClientProtocol, &format!("ERR {e}"))
                        .await;
                    self.close().await;
                    return;
                }
            };
            let req = match parsed {
                Parsed::Skip(n) => {
                    if self.run_count > 0 {
                        // Redis ignores empty commands too; keep the run contiguous.
                        off += n;
                    } else {
                        self.buf.advance(n);
                    }
                    if self.state.reply_skip {
                        // But it ends a CLIENT REPLY SKIP (it resets the
                        // client after an empty command as after any).
                        self.state.reply_skip = false;
                        if let Some(p) = &mut self.pinned {
                            if p.spend_skip().await.is_err() {
                                self.closing = true;
                                return;
                            }
                        }
                    }
                    continue;
                }
                Parsed::Request(r) => r,
            };
            if !self.take_permit(&mut off).await {
                return;
            }
            self.seq += 1;
            // A near-cache hit's reply goes straight to the local replies
            // when no run is pending before it (the usual case), else to
            // `hit_buf` until the run is sent.
            let mut hit = false;
            let mut hit_error = false;
            let mut hot_read: Option<HotRead> = None;
            let class = {
                let frame: &[u8] = match &req.inline {
                    Some(f) => f,
                    None => &self.buf[off..off + req.consumed],
                };
                let args: SmallVec<[&[u8]; 8]> = ArgView::new(frame, &req.args).collect();
                self.last_cmd.clear();
                self.last_cmd
                    .extend_from_slice(&args[0][..args[0].len().min(32)]);
                let sampled = match &self.ctx.hotkeys {
                    Some(d) => self.sampler.due(d.config.sample_rate),
                    None => false,
                };
                let cache = self.ctx.cache.as_ref();
                let cache_active = cache.is_some_and(|c| c.store.active());
                let routed = route(table.as_deref(), &args);
                let class = routed.class;
                self.family = routed.family;
                // A sampled GET or SET needs no table lookup to find its key.
                let key_is_second = sampled && routed.key_is_second;
                // One command-table lookup, only when something needs it.
                let hot_now = cache.is_some()
                    && self
                        .ctx
                        .hotkeys
                        .as_ref()
                        .is_some_and(|d| d.hot_now.load(Ordering::Relaxed) > 0);
                let info = if (sampled && !key_is_second)
                    || cache_active
                    || hot_now
                    || self.ctx.read_from_replica
                {
                    table.as_deref().and_then(|t| t.get(args[0]))
                } else {
                    None
                };
                if let (Some(d), true) = (&self.ctx.hotkeys, sampled) {
                    if key_is_second {
                        d.record(args[1]);
                    } else if let Some(info) = info {
                        for_each_key(info, args.len(), |i| args[i], |k| d.record(k));
                    }
                }
                // A write drops its keys from the cache before it is
                // forwarded (and again when its reply arrives, see
                // `cache::written`): a client reads its own writes.
                if let (Some(cache), Some(info), true) = (cache, info, cache_active) {
                    let info = info.sub(args.get(1).copied());
                    let written = &mut self.pending_written;
                    if info.writes {
                        for_each_written_key(
                            info,
                            args.len(),
                            |i| args[i],
                            |k| written.key(&cache.store, k),
                        );
                    }
                    // FLUSHALL, FLUSHDB, SWAPDB are writes, DEBUG is admin:
                    // reads skip the name comparisons.
                    if (info.writes || info.has(flags::ADMIN)) && changes_databases(&args) {
                        written.everything(&cache.store);
                    }
                }
                // A hit on a hot key is answered here, in order. Not while
                // the client's own writes, or its reads of the same keys,
                // are in flight: it must not read an older value than
                // they will show it.
                if let (Some(cache), Some(d), true) = (cache, &self.ctx.hotkeys, hot_now) {
                    // Whether the request may read hot keys the lookup did
                    // not account for.
                    let mut other_read = class == Class::Forward;
                    if class == Class::Forward && self.pinned.is_none() && args.len() >= 2 {
                        let keys: &[&[u8]] = if args[0].eq_ignore_ascii_case(b"mget") {
                            &args[1..]
                        } else {
                            &args[1..2]
                        };
                        let ask = crate::cache::Ask {
                            db: self.state.db,
                            proto: self.proto,
                            now: self.read_at,
                            serve: self.pending_written.is_empty()
                                && self.shared.writes_in_flight.load(Ordering::Acquire) == 0
                                && !self.shared.hot_reads_busy(keys),
                            seen: self.shared.seen_for(keys),
                        };
                        let out = if self.run_count == 0 {
                            &mut self.local
                        } else {
                            &mut self.hit_buf
                        };
                        let before = out.len();
                        let looked = cache.lookup(d, &args, frame, &ask, out);
                        other_read = matches!(looked, Lookup::Pass);
                        match looked {
                            Lookup::Hit => {
                                hit = true;
                                // A cached WRONGTYPE is an error reply all the same.
                                hit_error = out.get(before) == Some(&b'-');
                            }
                            Lookup::Miss(miss) => {
                                hot_read = Some(HotRead {
                                    index: 0,
                                    keys: keys.iter().map(|k| Bytes::copy_from_slice(k)).collect(),
                                    miss: Some(miss),
                                });
                            }
                            Lookup::Cold | Lookup::Pass => {}
                        }
                    }
                    // Any other read of hot keys: while it is at Redis this
                    // client's reads of them skip the cache, and once it is
                    // answered, fills begun before are not served to it.
                    if other_read {
                        if let Some(info) = info.map(|i| i.sub(args.get(1).copied())) {
                            if !info.writes {
                                let mut keys: SmallVec<[Bytes; 1]> = SmallVec::new();
                                for_each_key(
                                    info,
                                    args.len(),
                                    |i| args[i],
                                    |k| {
                                        if d.is_hot(k) && !keys.iter().any(|h| h.as_ref() == k) {
                                            keys.push(Bytes::copy_from_slice(k));
                                        }
                                    },
                                );
                                if !keys.is_empty() && self.pinned.is_some() {
                                    for k in &keys {
                                        if !self.pinned_reads.contains(k) {
                                            self.pinned_reads.push(k.clone());
                                        }
                                    }
                                }
                                // A clean pinned connection may be given up
                                // before this request is sent, which then
                                // goes to the shared pool: track it there too.
                                if !keys.is_empty() && (self.pinned.is_none() || self.state.clean())
                                {
                                    hot_read = Some(HotRead {
                                        index: 0,
                                        keys,
                                        miss: None,
                                    });
                                }
                            }
                        }
                    }
                }
                // With read_from = "replica", read-only commands go to a replica.
                let replica = self.ctx.read_from_replica
                    && class == Class::Forward
                    && info
                        .map(|i| i.sub(args.get(1).copied()))
                        .is_some_and(|i| i.has(flags::READONLY) && !i.has(flags::WRITE));
                (class, replica)
            };
            let (class, replica) = class;
            if hit {
                if !self.hit_buf.is_empty() {
                    self.emit_run(&mut off).await;
                    self.local.extend_from_slice(&self.hit_buf);
                    self.hit_buf.clear();
                }
                self.buf.advance(req.consumed);
                self.note_local(1, hit_error);
                continue;
            }
            if self.pinned.is_some() {
                self.maybe_release().await;
            }
            if class == Class::Forward && self.pinned.is_none() && req.inline.is_none() {
                if !self.on_pool() || (self.run_count > 0 && self.run_replica != replica) {
                    // Leaving a pinned connection or the other RESP pool
                    // (send_pool waits for earlier replies), or switching
                    // between master and replica: a new run.
                    self.emit_run(&mut off).await;
                }
                self.run_replica = replica;
                off += req.consumed;
                if self.run_count == 0 {
                    self.run_first_seq = self.seq;
                }
                if let Some(mut h) = hot_read {
                    h.index = self.run_count;
                    self.shared.begin_hot_read(&h.keys);
                    self.run_hot.push(h);
                }
                self.run_count += 1;
                self.run_tally.push(self.family);
                continue;
            }
            self.emit_run(&mut off).await;
            debug_assert_eq!(off, 0);
            let (frame, consumed) = match &req.inline {
                Some(f) => (f.clone(), req.consumed),
                None => (self.buf.split_to(req.consumed).freeze(), 0),
            };
            self.buf.advance(consumed);
            self.dispatch(class, &req, frame).await;
            if let Some(p) = &self.pinned {
                p.set_resubscribe(self.state.carryable());
            }
        }
        self.emit_run(&mut off).await;
        self.flush_local();
    }

    /// One permit per request in flight; waits (stops reading) at the bound.
    async fn take_permit(&mut self, off: &mut usize) -> bool {
        if let Ok(p) = self.shared.permits.try_acquire() {
            p.forget();
            return true;
        }
        Limit::MaxPendingRequests.reached();
        self.emit_run(off).await;
        self.flush_local();
        match self.shared.permits.acquire().await {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Send the pool-bound run at the front of the buffer.
    async fn emit_run(&mut self, off: &mut usize) {
        if self.run_count == 0 {
            return;
        }
        self.flush_local();
        let req = self.buf.split_to(*off).freeze();
        *off = 0;
        let count = std::mem::take(&mut self.run_count);
        let batch = Batch {
            start: self.read_at,
            tally: std::mem::take(&mut self.run_tally),
            first_seq: self.run_first_seq,
        };
        if self.run_replica {
            // Reads may be stale on a replica (that is the point of the
            // option) and need no ordering barrier against the master.
            let meter = Some(self.shared.meter.clone());
            if let Some(rx) = self.ctx.send_replica(
                self.proto,
                self.state.db,
                self.id as usize,
                &req,
                count,
                meter,
            ) {
                self.push_pooled(rx, req, count, batch);
                self.replica_reads = true;
                return;
            }
        }
        if std::mem::take(&mut self.replica_reads) {
            self.barrier().await;
        }
        self.send_pool(req, count, batch).await;
    }

    /// A batch of one: the current request.
    fn one(&self) -> Batch {
        let mut tally = Tally::default();
        tally.push(self.family);
        Batch {
            start: self.read_at,
            tally,
            first_seq: self.seq,
        }
    }

    async fn send_pool(&mut self, req: Bytes, count: u32, batch: Batch) {
        // Held here while a failover is suspected or under way. A batch
        // bound for another connection than the last one (other RESP
        // version, pinned before, a new master) first waits for every
        // earlier reply, so it cannot overtake them.
        let db = self.state.db;
        let mut generation = match self.target {
            Target::Pool(p, d, g) if p == self.proto && d == db => g,
            _ => {
                self.switch_to(Target::Pool(self.proto, db, 0)).await;
                0
            }
        };
        let sent = loop {
            match self
                .ctx
                .send(
                    self.proto,
                    db,
                    self.id as usize,
                    &req,
                    count,
                    Some(&self.shared.meter),
                    generation,
                )
                .await
            {
                Ok(Sent::Queued(g, rx)) => {
                    self.target = Target::Pool(self.proto, db, g);
                    break Ok(rx);
                }
                Ok(Sent::Moved(g)) => {
                    self.switch_to(Target::Pool(self.proto, db, g)).await;
                    generation = g;
                }
                Err(e) => break Err(e),
            }
        };
        let rx = match sent {
            Ok(rx) => rx,
            Err(e) => {
                // The writer turns a failed batch into per-request errors.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(crate::upstream::BatchError {
                    delivered: Bytes::new(),
                    done: 0,
                    sent: false,
                    error: e,
                }));
                rx
            }
        };
        self.push_pooled(rx, req, count, batch);
    }

    /// Wait until the pinned connection owes nothing. False if the client
    /// closed meanwhile behind a blocking call:
    /// the session ends, and with it the pinned connection, instead of
    /// waiting for ever for a reply (a RESET behind a `BLPOP q 0` whose
    /// client left), as Redis drops a blocked client that closes. A client
    /// that only half-closed after its pipeline (`nc`) still gets every
    /// reply: Redis has run those requests, and answers them.
    async fn wait_owed(&mut self) -> bool {
        let (Some(p), Some(rd)) = (&self.pinned, self.rd.as_mut()) else {
            return true;
        };
        let (buf, limit, stats) = (
            &mut self.buf,
            self.ctx.config.server.max_request_bytes,
            &self.ctx.stats,
        );
        let command_timeout = self.ctx.config.command_timeout();
        let mut read_ahead = false;
        let left = async {
            // Read on meanwhile, as Redis reads into its query buffer: a
            // close behind more requests is seen too (up to one request's
            // worth of read-ahead; they are parsed once the wait is over).
            while buf.len() < limit {
                crate::resp::make_room(buf, 0, 4096);
                match rd.read_buf(buf).await {
                    Ok(0) | Err(_) if p.blocked() => return,
                    // Nothing blocks: the replies come, within the command
                    // timeout (a reply that never completes must not keep
                    // a departed client's session and connection for ever).
                    Ok(0) | Err(_) => {
                        tokio::time::sleep(command_timeout).await;
                        return;
                    }
                    Ok(n) => {
                        read_ahead = true;
                        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            std::future::pending::<()>().await
        };
        p.set_awaited(true);
        let idle = tokio::select! {
            biased;
            _ = p.wait_idle() => true,
            _ = left => false,
        };
        p.set_awaited(false);
        self.read_ahead |= read_ahead;
        self.closing |= !idle;
        idle
    }

    /// Queue a batch sent to a pool, with the keys it writes.
    fn push_pooled(
        &mut self,
        rx: oneshot::Receiver<BatchResult>,
        req: Bytes,
        count: u32,
        batch: Batch,
    ) {
        let written = std::mem::take(&mut self.pending_written);
        if !written.is_empty() {
            self.shared.writes_in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let hot = std::mem::take(&mut self.run_hot);
        self.push(Entry::Pooled(Box::new(Pooled {
            rx,
            req,
            count,
            route: (self.proto, self.state.db),
            written,
            hot,
            batch,
        })));
    }

    /// Is the last batch's route the shared pool for the current protocol
    /// and database?
    fn on_pool(&self) -> bool {
        matches!(self.target, Target::Pool(p, d, _) if p == self.proto && d == self.state.db)
    }

    fn push(&mut self, e: Entry) {
        self.shared.entries.fetch_add(1, Ordering::AcqRel);
        if self.entries.send(e).is_err() {
            self.shared.entries.fetch_sub(1, Ordering::AcqRel);
            self.closing = true;
        }
    }

    fn flush_local(&mut self) {
        if self.local.is_empty() && self.local_n == 0 {
            return;
        }
        let bytes = self.local.split().freeze();
        let n = std::mem::take(&mut self.local_n);
        self.shared.meter.add(bytes.len());
        let batch = Batch {
            start: self.read_at,
            tally: std::mem::take(&mut self.local_tally),
            first_seq: self.local_first_seq,
        };
        let errors = std::mem::take(&mut self.local_errors);
        self.push(Entry::Ready(Box::new(Ready {
            bytes,
            n,
            errors,
            batch,
        })));
    }

    /// A reply keyward makes itself for the current request, in order with
    /// everything before it.
    async fn local_reply(&mut self, bytes: Bytes, requests: u32) {
        let error = bytes.first() == Some(&b'-');
        if self.pinned.is_some() && self.pinned_tx.is_some() {
            // Behind the pinned connection's replies: wait until they are
            // all queued, then queue this one on the same relay, unless
            // CLIENT REPLY OFF or SKIP silences it, as it does Redis's.
            if !self.wait_owed().await {
                return;
            }
            if let (true, Some(p)) = (self.state.reply_skip, &mut self.pinned) {
                if p.spend_skip().await.is_err() {
                    self.closing = true;
                    return;
                }
            }
            let Some(tx) = &self.pinned_tx else { return };
            if self.state.replies_for_next() > 0 {
                self.shared.meter.add(bytes.len());
                let _ = tx.send(PinMsg::Data(bytes)).await;
            }
            self.shared.permits.add_permits(requests as usize);
            let errors: &[u32] = if error { &[0] } else { &[] };
            let us = self.read_at.elapsed().as_micros() as u64;
            self.ctx.stats.finish(&self.one().tally, errors, us);
            return;
        }
        self.local.extend_from_slice(&bytes);
        self.note_local(requests, error);
    }

    /// `requests` more replies were put in `local` for the current request.
    fn note_local(&mut self, requests: u32, error: bool) {
        if self.local_n == 0 {
            self.local_first_seq = self.seq;
        }
        if error {
            self.local_errors.push(self.local_n);
        }
        for _ in 0..requests {
            self.local_tally.push(self.family);
        }
        self.local_n += requests;
        if self.local.len() >= LOCAL_FLUSH {
            self.flush_local();
        }
    }

    /// An error reply keyward makes itself: counted and logged with the
    /// connection and request ids.
    async fn local_error(&mut self, kind: ErrorKind, text: impl AsRef<[u8]>) {
        let text = text.as_ref();
        self.ctx.stats.error(kind);
        self.ctx.error_lines.log(
            self.id,
            self.seq,
            kind.name(),
            &String::from_utf8_lossy(text),
        );
        let mut out = BytesMut::new();
        reply::error(&mut out, text);
        self.local_reply(out.freeze(), 1).await;
    }

    async fn close(&mut self) {
        self.flush_local();
        if let Some(p) = self.pinned.take() {
            self.pinned_tx = None;
            p.release().await;
        }
        self.push(Entry::Close);
        self.closing = true;
    }

    /// Wait for every earlier reply before sending on another connection.
    async fn switch_to(&mut self, target: Target) {
        if self.target == target {
            return;
        }
        self.barrier().await;
        self.target = target;
    }

    /// Queue the local replies made so far and wait until every earlier
    /// reply is back.
    async fn barrier(&mut self) {
        self.flush_local();
        loop {
            let notified = self.shared.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.entries.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
    }

    /// The pinned connection is given up, its replies all in (or lost):
    /// the hot keys read on it are `seen` now.
    fn pinned_reads_seen(&mut self) {
        if self.pinned_reads.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.pinned_reads);
        if let Some(cache) = &self.ctx.cache {
            self.shared.mark_seen(&keys, cache);
        }
    }

    /// Apply Redis's answers to the SUBSCRIBEs sent so far (see
    /// `SessionState::settle`).
    fn settle_subscriptions(&mut self) {
        if !self.state.unsettled() {
            return;
        }
        match &self.pinned {
            Some(p) => {
                // Idle first: the relay reports a group before it counts its
                // replies in, so every answer is taken below.
                let idle = p.idle();
                let settled = p.take_settled();
                if !settled.is_empty() {
                    self.state.settle(&settled);
                }
                if idle && self.state.unsettled() {
                    // Everything owed is in, yet one is unanswered (replies
                    // miscounted): take it as accepted rather than wait.
                    self.state.settle(&[(u64::MAX, false)]);
                }
            }
            // Nothing more will answer them.
            None => self.state.settle(&[(u64::MAX, false)]),
        }
    }

    /// Give the pinned connection back when nothing ties the client to it.
    async fn maybe_release(&mut self) {
        self.settle_subscriptions();
        let Some(p) = &self.pinned else { return };
        if !(p.idle() && self.state.clean()) {
            return;
        }
        if !self.confirm_silent().await {
            return;
        }
        let p = self.pinned.take().expect("checked");
        self.pinned_tx = None;
        p.release().await;
        self.pinned_reads_seen();
        tracing::trace!(conn = self.id, "pinned connection released");
    }

    /// Before the pinned connection is given up: requests CLIENT REPLY
    /// OFF or SKIP silenced get nothing back when Redis has run them, and
    /// the client's next request, on another connection, must not overtake
    /// them. A request behind them whose reply keyward swallows says they
    /// have run: RESET, answered in every state (in MULTI, in subscriber
    /// mode, under CLIENT REPLY OFF, which it ends; a SKIP has been spent
    /// by then), and the connection's state is being dropped anyway. False
    /// if the connection ended or the client went away meanwhile.
    async fn confirm_silent(&mut self) -> bool {
        let Some(p) = &mut self.pinned else {
            return true;
        };
        if !p.unconfirmed() {
            return true;
        }
        if p.send_reset_probe().await.is_err() {
            self.closing = true;
            return false;
        }
        self.wait_owed().await
    }

    /// Make sure the client has a pinned connection; false (with an error
    /// reply queued) if none can be had.
    async fn ensure_pinned(&mut self) -> bool {
        if self.pinned.is_some() {
            return true;
        }
        // A new connection, even when the last batch went to a pinned one
        // (RESET, or a release, gave that one back with replies perhaps
        // still owed): nothing may overtake what was sent before, and the
        // local replies made since must be queued ahead of its relay.
        self.barrier().await;
        match self.open_pinned().await {
            Ok(()) => true,
            Err((kind, text)) => {
                self.local_error(kind, &text).await;
                false
            }
        }
    }

    /// Open a pinned connection on the current master; the error is the
    /// reply line for the client.
    async fn open_pinned(&mut self) -> Result<(), (ErrorKind, String)> {
        let max = self.ctx.config.upstream.max_pinned;
        let Ok(permit) = self.ctx.pinned.clone().try_acquire_owned() else {
            Limit::MaxPinned.reached();
            return Err((ErrorKind::Limit, format!(
                "ERR max number of pinned upstream connections reached (upstream.max_pinned = {max})"
            )));
        };
        let fail = |e: Error| (ErrorKind::from(&e.kind), e.resp_text());
        let up = self.ctx.upstream(1, 0).await.map_err(fail)?;
        let (tx, rx) = mpsc::channel(64);
        let mut p = Pinned::open(
            &up,
            self.proto,
            self.state.db,
            permit,
            tx.clone(),
            self.shared.meter.clone(),
        )
        .await
        .map_err(fail)?;
        p.drain_on(self.ctx.shutdown.clone());
        p.set_carry_any_loss(self.ctx.config.uses_sentinel());
        // Lost before the session runs again (a master dying as the
        // connection opened, a kept connection to it), it is carried if
        // the state is: a carry-over's own new connection too.
        p.set_resubscribe(self.state.carryable());
        self.push(Entry::Relay(rx));
        self.pinned = Some(p);
        self.pinned_tx = Some(tx);
        self.target = Target::Pinned;
        Ok(())
    }

    /// The pinned connection ended under the session. If the master was
    /// replaced and the client held nothing but a database, subscriptions
    /// and an unspent CLIENT REPLY SKIP, carry them to the new master (the
    /// client sees no error; messages published in the gap are lost).
    /// Otherwise the writer has reported the loss and closes the client.
    async fn on_pinned_lost(&mut self) {
        let Some(p) = self.pinned.take() else { return };
        self.pinned_tx = None;
        self.pinned_reads_seen();
        if !p.carried_over() {
            self.closing = true;
            return;
        }
        let skip = p.skip_pending();
        drop(p);
        // Until the tracker has noticed a dead master, opening may fail (or
        // hand out a kept connection to it that dies under the carry): ask
        // it to check, and try again within the hold time.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.ctx.config.sentinel.hold_ms);
        loop {
            match self.open_pinned().await {
                Ok(()) => {}
                Err((_, e)) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(conn = self.id, error = %e, "cannot carry the connection's database and subscriptions to a new master; closing client");
                    self.shared.meter.kill();
                    self.closing = true;
                    return;
                }
                Err(_) => {
                    self.ctx.check_master.notify_one();
                    let mut changed = self.ctx.topology.subscribe();
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            }
            if self.resubscribe(skip).await {
                break;
            }
            // The new connection died under the carry: carry again, or
            // (its relay reported the loss) close.
            let Some(p) = self.pinned.take() else { return };
            self.pinned_tx = None;
            p.wait_lost().await;
            if !p.carried_over() {
                self.closing = true;
                return;
            }
        }
        tracing::info!(
            conn = self.id,
            channels = self.state.channels.len(),
            patterns = self.state.patterns.len(),
            shard_channels = self.state.shard_channels.len(),
            db = self.state.db,
            "database and subscriptions carried to the new master"
        );
    }

    /// Make the session's subscriptions (and an unspent CLIENT REPLY SKIP)
    /// again on a newly opened dedicated connection; false if the
    /// connection failed under it.
    async fn resubscribe(&mut self, skip: bool) -> bool {
        let kinds: [(&[u8], Vec<Bytes>); 3] = [
            (b"SUBSCRIBE", self.state.channels.iter().cloned().collect()),
            (b"PSUBSCRIBE", self.state.patterns.iter().cloned().collect()),
            (
                b"SSUBSCRIBE",
                self.state.shard_channels.iter().cloned().collect(),
            ),
        ];
        let Some(p) = &mut self.pinned else {
            return false;
        };
        for (cmd, names) in kinds {
            if names.is_empty() {
                continue;
            }
            let mut args: Vec<&[u8]> = vec![cmd];
            args.extend(names.iter().map(|n| n.as_ref()));
            let mut out = BytesMut::new();
            reply::command(&mut out, &args);
            p.pubsub_next(names.len() as u64, None);
            if p.send_swallowed(&out, names.len() as u64).await.is_err() {
                return false;
            }
        }
        if skip {
            // The client's CLIENT REPLY SKIP went to the old master: its next
            // request must be silenced here too.
            let mut out = BytesMut::new();
            reply::command(&mut out, &[b"CLIENT", b"REPLY", b"SKIP"]);
            if p.send(&out, 0).await.is_err() {
                return false;
            }
            p.skip_next();
        }
        true
    }

    /// Send on the pinned connection, owing `expect` replies.
    async fn send_pinned(&mut self, frame: &[u8], expect: u64) {
        // Writes queued in MULTI run at EXEC (or never, at DISCARD).
        let mut written = std::mem::take(&mut self.pending_written);
        if self.state.in_multi {
            self.multi_written.append(written);
            written = Written::default();
        } else {
            written.append(std::mem::take(&mut self.multi_written));
        }
        let Some(p) = &mut self.pinned else { return };
        if let (false, Some(cache)) = (written.is_empty(), &self.ctx.cache) {
            let cache = cache.clone();
            let shared = self.shared.clone();
            shared.writes_in_flight.fetch_add(1, Ordering::AcqRel);
            p.on_reply(
                expect,
                Box::new(move || {
                    written.replied(&cache.store);
                    shared.writes_in_flight.fetch_sub(1, Ordering::AcqRel);
                }),
            );
        }
        if expect > 0 && self.ctx.config.uses_sentinel() && self.state.carryable() && !p.blocked() {
            // A planned switchover (Sentinel only) waits for this reply
            // before it pauses the master (see `topology::switchover`).
            let count = self.ctx.carried_in_flight.clone();
            count.fetch_add(1, Ordering::AcqRel);
            p.on_reply(
                expect,
                Box::new(move || {
                    count.fetch_sub(1, Ordering::AcqRel);
                }),
            );
        }
        // The request's permit covers nothing once it is on the relay.
        self.shared.permits.add_permits(1);
        self.ctx.stats.relayed(self.family);
        // Whether a loss may be carried, as of this request, before it is
        // out: the relay decides the moment the connection dies, which may
        // be before this task runs again (a busy machine).
        p.set_resubscribe(self.state.carryable());
        if let Err(e) = p.send(frame, expect).await {
            // The relay reports the lost connection; stop reading.
            tracing::debug!(conn = self.id, req = self.seq, error = %e, "pinned write failed");
            self.closing = true;
        }
    }

    /// While a failover or planned switchover holds requests, a session
    /// whose connection will be carried to the new master (a database,
    /// subscriptions, or nothing yet given back) is held before its next
    /// request, as the shared pool's requests are, instead of writing to a
    /// master being replaced; once the master has changed, its connection is
    /// carried (with the state before this request) and the request goes to
    /// the new master. False if the request must not be handled: the hold
    /// ended in an error (the request gets it and the client is closed:
    /// where its state stands is unknown), or the connection could not be
    /// carried.
    async fn hold_pinned(&mut self, bytes: usize) -> bool {
        if self.pinned.is_none() || !self.ctx.config.uses_sentinel() || !self.state.carryable() {
            return true;
        }
        if self.ctx.holding() {
            if let Some(p) = &self.pinned {
                // Lost while held, the connection is carried.
                p.set_resubscribe(true);
            }
            if let Err(e) = self.ctx.upstream(1, bytes).await {
                self.local_error(ErrorKind::from(&e.kind), &e.resp_text())
                    .await;
                self.closing = true;
                return false;
            }
        }
        if let Some(p) = self.pinned.as_ref().filter(|p| p.retired()) {
            // The master changed (while the request was held, or while the
            // session waited on something else, say its own KEYWARD
            // FAILOVER): the retired connection is being shut down.
            p.wait_lost().await;
            Box::pin(self.on_pinned_lost()).await;
        }
        !self.closing && self.pinned.is_some()
    }

    /// Route one request that is not a plain pool-bound one.
    async fn dispatch(&mut self, class: Class, req: &Request, frame: Bytes) {
        // KEYWARD CLIENTS (and anything slow here) shows this command now.
        self.publish_info(0);
        // What keyward answers itself needs no master (RESET gives the
        // connection up anyway).
        let answered_here = matches!(
            class,
            Class::Hello | Class::Auth | Class::Keyward | Class::Quit | Class::Reset
        );
        if !answered_here && !self.hold_pinned(frame.len()).await {
            return;
        }
        let args: Vec<&[u8]> = ArgView::new(&frame, &req.args).collect();
        // Where Redis refuses a command without running it, let Redis say
        // so on the client's own connection: in RESP2 subscriber mode
        // ("Can't execute ...: only (P|S)SUBSCRIBE / ... are allowed"), and
        // for KEYWARD (unknown to Redis) and SYNC/PSYNC (not allowed) inside
        // MULTI, where the refusal also makes EXEC abort, as it would.
        let local = matches!(
            class,
            Class::Hello | Class::Auth | Class::Keyward | Class::Replication
        );
        let tracked = matches!(
            class,
            Class::Select
                | Class::Multi
                | Class::Watch
                | Class::Exec
                | Class::Discard
                | Class::Unwatch
                | Class::Monitor
                | Class::ClientState
                | Class::ClientReply(_)
                | Class::Subscribe(_)
                | Class::Unsubscribe(_)
        );
        self.settle_subscriptions();
        // A SUBSCRIBE, or an UNSUBSCRIBE naming its channels, gets one
        // confirmation per name whatever came before, and a refusal of an
        // earlier one is settled later (`SessionState::settle`): pipelined,
        // they go on without waiting a round trip each.
        let counted = (matches!(class, Class::Subscribe(_))
            || (matches!(class, Class::Unsubscribe(_)) && args.len() > 1))
            && !self.state.exec_unsettled();
        if (local || tracked) && !counted && self.state.unsettled() && self.pinned.is_some() {
            // What the subscriptions are (so whether the client is in
            // subscriber mode, and how many confirmations a bare
            // UNSUBSCRIBE gets) waits for Redis's answer to an earlier
            // SUBSCRIBE: it may have refused it as a whole.
            if !self.wait_owed().await {
                return;
            }
            self.settle_subscriptions();
            self.maybe_release().await;
        }
        let subscriber = self.proto == Proto::Resp2 && self.state.subscribed();
        let refused_in_multi = self.state.in_multi
            && (class == Class::Keyward
                || (class == Class::Replication && !args[0].eq_ignore_ascii_case(b"replconf")));
        if self.pinned.is_some() && local && (subscriber || refused_in_multi) {
            return self.forward(req, frame).await;
        }
        // A state command Redis refuses without running it (wrong arity;
        // anything but (UN)SUBSCRIBE, PING, QUIT, RESET in RESP2 subscriber
        // mode) changes no state: keyward must not think a transaction,
        // a WATCH, a database or a reply mode ended or began.
        if tracked {
            let arity_ok = self
                .ctx
                .learned
                .table
                .load()
                .as_deref()
                .and_then(|t| t.get_with_sub(args[0], args.get(1).copied()))
                .is_none_or(|i| i.arity_ok(args.len()));
            let allowed_subscribed = matches!(class, Class::Subscribe(_) | Class::Unsubscribe(_));
            if !arity_ok || (subscriber && !allowed_subscribed) {
                if class == Class::Exec && self.state.in_multi && !subscriber {
                    // Except EXEC: Redis refuses it by aborting the
                    // transaction (-EXECABORT), WATCHes included.
                    self.state.in_multi = false;
                    self.state.watching = false;
                    self.state.drop_queued();
                }
                return self.forward(req, frame).await;
            }
        }
        // Queued in MULTI, a command that changes subscriptions or the
        // reply mode runs at EXEC (or never). keyward applies queued
        // (UN)SUBSCRIBEs as EXEC runs them (`SessionState::exec_pubsub`),
        // but Redis may still answer them otherwise then (an ACL change;
        // see README), and a queued CLIENT REPLY's or MONITOR's effect is
        // not followed: the client keeps its connection until RESET. The
        // command now gets the one reply (+QUEUED) Redis sends.
        if self.state.in_multi
            && matches!(
                class,
                Class::Subscribe(_)
                    | Class::Unsubscribe(_)
                    | Class::ClientReply(_)
                    | Class::Monitor
            )
        {
            self.state.client_state = true;
            if let Class::Subscribe(kind) | Class::Unsubscribe(kind) = class {
                let names: Vec<Bytes> =
                    (1..args.len()).map(|i| arg_bytes(&frame, req, i)).collect();
                let subscribe = matches!(class, Class::Subscribe(_));
                self.state.queue_pubsub(subscribe, kind, &names);
            }
            if let (Class::Monitor, Some(p)) = (class, &self.pinned) {
                p.monitor_next();
            }
            return self.forward(req, frame).await;
        }
        match class {
            Class::Hello => Box::pin(self.hello(&args, &frame)).await,
            Class::Auth => {
                let mut out = BytesMut::new();
                local::auth(&mut out, &args[1..]);
                self.local_reply(out.freeze(), 1).await;
            }
            Class::Quit => {
                let mut out = BytesMut::new();
                reply::simple(&mut out, "OK");
                self.local_reply(out.freeze(), 1).await;
                self.close().await;
            }
            // Redis's arity error, from wherever we are.
            Class::Reset if args.len() != 1 => self.forward(req, frame).await,
            Class::Reset => {
                if self.pinned.is_some() {
                    // As in Redis, RESET behind a blocked call (BLPOP, XREAD
                    // BLOCK, WAIT) runs once that call has answered (or its
                    // connection is gone); closing first would lose the answer.
                    if !self.wait_owed().await {
                        return;
                    }
                }
                let mut out = BytesMut::new();
                reply::simple(&mut out, "RESET");
                // Under CLIENT REPLY SKIP Redis silences RESET's reply too
                // (RESET ends OFF, not a SKIP already in force): answered
                // now, on the pinned connection's relay, it is dropped.
                let silenced = self.state.reply_skip;
                if silenced {
                    self.local_reply(out.clone().freeze(), 1).await;
                }
                if !self.confirm_silent().await {
                    return;
                }
                if let Some(p) = self.pinned.take() {
                    self.pinned_tx = None;
                    p.release().await;
                    self.pinned_reads_seen();
                }
                self.state = SessionState::default();
                self.multi_written = Written::default();
                self.proto = Proto::Resp2;
                if !silenced {
                    self.local_reply(out.freeze(), 1).await;
                }
            }
            Class::Select => {
                let db = args.get(1).and_then(|a| parse_int(a));
                let databases = self.ctx.learned.facts.load().databases;
                match db {
                    // Out of range: Redis's refusal, and the database stays.
                    // Answered here, since the client's own database may be
                    // the one refusing everything (a master with fewer
                    // databases after a failover).
                    Some(n)
                        if args.len() == 2
                            && self.pinned.is_none()
                            && (n < 0 || databases.is_some_and(|d| n >= d)) =>
                    {
                        // Redis reads the index as a 32-bit integer first.
                        let text = if i32::try_from(n).is_err() {
                            "ERR value is out of range, value must between -2147483648 and 2147483647"
                        } else {
                            "ERR DB index is out of range"
                        };
                        let mut out = BytesMut::new();
                        reply::error(&mut out, text);
                        self.local_reply(out.freeze(), 1).await;
                    }
                    // The same on a dedicated connection, where it may be
                    // queued in MULTI: Redis answers.
                    Some(n) if self.pinned.is_some() && databases.is_some_and(|d| n >= d) => {
                        self.forward(req, frame).await
                    }
                    // A database Redis has: the client moves to that
                    // database's shared pool (its next batch waits for the
                    // replies of the previous pool's first, so nothing it
                    // sent before is overtaken).
                    Some(n)
                        if n >= 0
                            && args.len() == 2
                            && self.pinned.is_none()
                            && (n == 0 || databases.is_some()) =>
                    {
                        self.state.db = n;
                        self.state.db_checked = true;
                        let mut out = BytesMut::new();
                        reply::simple(&mut out, "OK");
                        self.local_reply(out.freeze(), 1).await;
                    }
                    // Whether the database exists is unknown (CONFIG GET
                    // refused): Redis answers on a dedicated connection,
                    // which the client keeps while it is not in db 0.
                    Some(n) if n >= 0 && args.len() == 2 => {
                        if self.ensure_pinned().await {
                            // Queued in MULTI it may never run (DISCARD,
                            // EXECABORT, a failed WATCH): keyward may think
                            // the connection left db 0, never that it is
                            // back in it, which would release it to the
                            // shared pool and the near cache in the wrong db.
                            if n != 0 || !self.state.in_multi {
                                self.state.db = n;
                                self.state.db_checked = databases.is_some();
                            }
                            self.state.db_uncertain = self.state.in_multi;
                            let expect = self.state.replies_for_next();
                            self.send_pinned(&frame, expect).await;
                        }
                    }
                    // Malformed, on the shared pool: Redis's error, made
                    // here (a SELECT must never reach a shared connection,
                    // where it would move every client on it).
                    _ if self.pinned.is_none() => {
                        let text = if args.len() == 2 {
                            "ERR value is not an integer or out of range"
                        } else {
                            "ERR wrong number of arguments for 'select' command"
                        };
                        let mut out = BytesMut::new();
                        reply::error(&mut out, text);
                        self.local_reply(out.freeze(), 1).await;
                    }
                    // Malformed, on a dedicated connection (perhaps queued
                    // in MULTI, which the error aborts): Redis answers.
                    _ => self.forward(req, frame).await,
                }
            }
            Class::Multi | Class::Watch | Class::Blocking | Class::Monitor | Class::ClientState => {
                if self.ensure_pinned().await {
                    match class {
                        Class::Multi => self.state.in_multi = true,
                        Class::Watch if !self.state.in_multi => self.state.watching = true,
                        Class::Monitor => {
                            self.state.monitor = true;
                            if let Some(p) = &self.pinned {
                                p.monitor_next();
                            }
                        }
                        Class::ClientState => {
                            self.state.client_state = true;
                            let sub = args.get(1).map(|s| s.to_ascii_lowercase());
                            // State RESET does not clear (NO-EVICT, NO-TOUCH)
                            // or that ties the connection to this client.
                            if let (
                                Some(b"id" | b"info" | b"tracking" | b"no-evict" | b"no-touch"),
                                Some(p),
                            ) = (sub.as_deref(), &mut self.pinned)
                            {
                                p.not_for_reuse();
                            }
                        }
                        Class::Blocking if !self.state.in_multi => {
                            if let Some(p) = &self.pinned {
                                p.blocking_next();
                            }
                        }
                        _ => {}
                    }
                    let expect = self.state.replies_for_next();
                    self.send_pinned(&frame, expect).await;
                }
            }
            Class::Exec | Class::Discard | Class::Unwatch => {
                if self.pinned.is_none() {
                    // No transaction here: Redis gives its own answer.
                    return self.forward(req, frame).await;
                }
                match class {
                    // Without MULTI, Redis refuses them and keeps the WATCH.
                    Class::Exec | Class::Discard if self.state.in_multi => {
                        self.state.in_multi = false;
                        self.state.watching = false;
                        let silenced = self.state.reply_off || self.state.reply_skip;
                        if class == Class::Discard {
                            self.state.drop_queued();
                        } else if silenced {
                            // Nothing settles it: the subscriptions stay
                            // as they were (see README), and subscriber
                            // mode is read from what Redis sends.
                            if self.state.has_queued() {
                                self.state.drop_queued();
                                if let Some(p) = &self.pinned {
                                    p.pubsub_next(1, None);
                                }
                            }
                        } else if let Some((extras, id)) = self.state.exec_pubsub() {
                            // EXEC's reply holds the confirmations of the
                            // (UN)SUBSCRIBEs queued, and more follow it.
                            if let Some(p) = &self.pinned {
                                p.exec_pubsub_next(extras, id);
                            }
                        }
                    }
                    Class::Unwatch if !self.state.in_multi => self.state.watching = false,
                    _ => {}
                }
                let expect = self.state.replies_for_next();
                self.send_pinned(&frame, expect).await;
            }
            Class::Subscribe(kind) => {
                if self.ensure_pinned().await {
                    let names: Vec<Bytes> =
                        (1..args.len()).map(|i| arg_bytes(&frame, req, i)).collect();
                    let (expect, id) = self.state.subscribe(kind, &names);
                    if let Some(p) = &self.pinned {
                        p.pubsub_next(expect, id);
                    }
                    self.send_pinned(&frame, expect).await;
                }
            }
            Class::Unsubscribe(kind) => {
                if self.pinned.is_none() {
                    // Not subscribed: answered here, one confirmation per
                    // name as Redis sends. On the shared pool Redis's extra
                    // confirmations would be taken as other clients' replies.
                    let mut out = BytesMut::new();
                    local::unsubscribed(&mut out, self.proto, kind, &args[1..]);
                    return self.local_reply(out.freeze(), 1).await;
                }
                let names: Vec<Bytes> =
                    (1..args.len()).map(|i| arg_bytes(&frame, req, i)).collect();
                let expect = self.state.unsubscribe(kind, &names);
                if let Some(p) = &self.pinned {
                    p.pubsub_next(expect, None);
                }
                self.send_pinned(&frame, expect).await;
            }
            Class::ClientReply(mode) => {
                if self.ensure_pinned().await {
                    let expect = self.state.set_reply_mode(mode);
                    self.send_pinned(&frame, expect).await;
                    if let (true, Some(p)) = (self.state.reply_skip, &mut self.pinned) {
                        p.skip_next();
                    }
                }
            }
            Class::Keyward => {
                let mut out = BytesMut::new();
                if args.len() == 2 && args[1].eq_ignore_ascii_case(b"failover") {
                    // A planned switchover; this client waits for it.
                    // Boxed, as the other rare paths (HELLO, INFO, a lost
                    // dedicated connection): inline they would enlarge every
                    // client's task, idle or not.
                    match Box::pin(crate::topology::switchover::planned(self.ctx.clone())).await {
                        Ok(_) => reply::simple(&mut out, "OK"),
                        Err(e) => reply::error(&mut out, format!("ERR switchover failed: {e}")),
                    }
                } else if args.len() >= 3
                    && args[1].eq_ignore_ascii_case(b"hotkeys")
                    && args[2].eq_ignore_ascii_case(b"fleet")
                    && self.ctx.hotkeys.is_some()
                {
                    match crate::admin::commands::parse_hotkeys(&args[2..]) {
                        Ok((_, count)) => {
                            crate::admin::commands::hotkeys_fleet(&self.ctx, count, &mut out).await
                        }
                        Err(e) => reply::error(&mut out, e),
                    }
                } else {
                    crate::admin::commands::keyward(&self.ctx, self.proto, &args[1..], &mut out);
                }
                self.local_reply(out.freeze(), 1).await;
            }
            Class::Refused => {
                let nul = args.iter().take(2).any(|a| a.contains(&0));
                let text = if !nul && self.proto == Proto::Resp2 && self.state.subscribed() {
                    // SCRIPT DEBUG in RESP2 subscriber mode: Redis's refusal
                    // comes first.
                    "ERR Can't execute 'script|debug': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / \
                     PING / QUIT / RESET are allowed in this context"
                        .as_bytes()
                        .to_vec()
                } else {
                    local::refusal(&args)
                };
                self.local_error(ErrorKind::Refused, &text).await
            }
            Class::Replication => {
                self.local_error(
                    ErrorKind::Refused,
                    "ERR keyward does not forward SYNC/PSYNC/REPLCONF; connect replicas to Redis directly",
                )
                .await
            }
            Class::Info => {
                let wanted = crate::admin::info::wanted(&args[1..]);
                Box::pin(self.info(req, frame.clone(), wanted)).await
            }
            Class::Kill => Box::pin(self.kill(req, frame.clone(), &args)).await,
            Class::Forward => self.forward(req, frame).await,
        }
    }

    /// SCRIPT KILL, FUNCTION KILL or CLIENT UNPAUSE: on a connection of its
    /// own (see `upstream::side`), since the script it stops (the write the
    /// pause holds) holds up the shared one.
    async fn kill(&mut self, req: &Request, frame: Bytes, args: &[&[u8]]) {
        if self.state.in_multi || (self.proto == Proto::Resp2 && self.state.subscribed()) {
            // Queued, or refused in subscriber mode: Redis's answer.
            return self.forward(req, frame).await;
        }
        if args[0].eq_ignore_ascii_case(b"client") {
            // CLIENT UNPAUSE runs after the client's own earlier requests,
            // as on Redis: a pipelined CLIENT PAUSE before it must not be
            // overtaken (and a write of its own that the pause holds keeps
            // it waiting, as Redis does).
            if self.pinned.is_some() {
                if !self.wait_owed().await {
                    return;
                }
            } else {
                self.barrier().await;
            }
        }
        let mut out = BytesMut::new();
        reply::command(&mut out, args);
        let res = async {
            let up = self.ctx.upstream(1, out.len()).await?;
            crate::upstream::side::call(&up.node.settings, self.proto, &out).await
        }
        .await;
        match res {
            Ok(reply) => self.local_reply(reply, 1).await,
            Err(e) => {
                self.local_error(ErrorKind::from(&e.kind), e.resp_text())
                    .await
            }
        }
    }

    /// An ordinary request taken out of the run (inline, or while pinned).
    async fn forward(&mut self, _req: &Request, frame: Bytes) {
        if self.pinned.is_some() {
            let expect = self.state.replies_for_next();
            self.send_pinned(&frame, expect).await;
        } else {
            self.flush_local();
            let batch = self.one();
            self.send_pool(frame, 1, batch).await;
        }
    }

    /// INFO: the upstream's answer with keyward's `# Keyward` section
    /// added (for the default sets and `INFO keyward`). Inside a pinned
    /// session (MULTI queues it) it goes to the pinned connection as is.
    async fn info(&mut self, req: &Request, frame: Bytes, wanted: bool) {
        if self.pinned.is_some() || !wanted {
            return self.forward(req, frame).await;
        }
        let mut out = BytesMut::new();
        match self.info_upstream(&frame).await {
            Ok(upstream) => {
                let section = crate::admin::info::section(&self.ctx);
                crate::admin::info::append(&mut out, &upstream, &section);
                self.local_reply(out.freeze(), 1).await;
            }
            Err(e) => {
                self.local_error(ErrorKind::from(&e.kind), &e.resp_text())
                    .await
            }
        }
    }

    /// Ask the upstream for INFO and wait for the answer. No meter: the
    /// reply is charged when it is queued as a local reply.
    async fn info_upstream(&mut self, frame: &[u8]) -> Result<Bytes, Error> {
        loop {
            let rx = match self
                .ctx
                .send(self.proto, 0, self.id as usize, frame, 1, None, 0)
                .await?
            {
                Sent::Queued(_, rx) => rx,
                // Generation 0 accepts any master; nothing was sent.
                Sent::Moved(_) => continue,
            };
            return match rx.await {
                Ok(Ok(r)) => Ok(r.bytes),
                Ok(Err(e)) => Err(e.error),
                Err(_) => Err(Error::upstream(
                    Kind::OutcomeUnknown,
                    "upstream connection dropped the request",
                )),
            };
        }
    }

    async fn hello(&mut self, args: &[&[u8]], _frame: &Bytes) {
        let hello = match local::parse_hello(&args[1..]) {
            Ok(h) => h,
            Err(e) => return self.local_error(ErrorKind::Refused, &e).await,
        };
        if let Some((user, pass)) = &hello.auth {
            if let Err(e) = local::check_auth(Some(user), pass) {
                return self.local_error(ErrorKind::Refused, &e).await;
            }
        }
        let proto = hello.proto.unwrap_or(self.proto);
        if self
            .pinned
            .as_ref()
            .is_some_and(|p| p.speaks() != proto && self.state.clean())
        {
            // Nothing ties the client to it any more (an EXEC pipelined
            // just before): once its replies are in it is given back.
            if !self.wait_owed().await {
                return;
            }
            self.maybe_release().await;
        }
        if self.pinned.as_ref().is_some_and(|p| p.speaks() != proto) {
            // Its replies would change shape mid-state: a transaction's,
            // subscriptions' or MONITOR's, or ones CLIENT REPLY silences.
            let s = &self.state;
            if s.in_multi
                || s.subscribed()
                || s.unsettled()
                || s.monitor
                || s.reply_off
                || s.reply_skip
            {
                return self
                    .local_error(ErrorKind::Refused, "ERR keyward cannot change the protocol while the connection holds state (MULTI, SUBSCRIBE, MONITOR, CLIENT REPLY); send RESET first")
                    .await;
            }
            // Otherwise (a database, a name, tracking, a WATCH) Redis
            // switches the dedicated connection itself; its reply is
            // keyward's, below.
            if !self.wait_owed().await {
                return;
            }
            let mut cmd = BytesMut::new();
            reply::command(&mut cmd, &[b"HELLO", proto.number().to_string().as_bytes()]);
            let Some(p) = &mut self.pinned else { return };
            if p.send_silent(&cmd).await.is_err() {
                self.closing = true;
                return;
            }
            if !self.wait_owed().await {
                return;
            }
            if let Some(p) = &mut self.pinned {
                p.switch_proto(proto);
            }
        }
        if hello.setname.is_some() && self.state.in_multi {
            // The CLIENT SETNAME would be queued into the transaction and
            // show up in EXEC's reply.
            return self
                .local_error(ErrorKind::Refused, "ERR keyward cannot set the client name with HELLO inside MULTI; use CLIENT SETNAME")
                .await;
        }
        self.proto = proto;
        if let Some(name) = &hello.setname {
            // The name belongs to one connection: pin, and set it upstream
            // without showing the client the CLIENT SETNAME reply.
            if !self.ensure_pinned().await {
                return;
            }
            self.state.client_state = true;
            // CLIENT REPLY OFF or SKIP silences it at Redis: nothing to swallow.
            let silenced = self.state.reply_off || self.state.reply_skip;
            let mut cmd = BytesMut::new();
            reply::command(&mut cmd, &[b"CLIENT", b"SETNAME", name]);
            if let Some(p) = &mut self.pinned {
                let sent = match silenced {
                    true => p.send(&cmd, 0).await,
                    false => p.send_silent(&cmd).await,
                };
                if sent.is_err() {
                    self.closing = true;
                    return;
                }
            }
        }
        if self.ctx.learned.facts.load().version.is_empty() {
            // HELLO reports the upstream's version: learn it first.
            if let Ok(up) = self.ctx.upstream(1, 0).await {
                up.pool2.wait_first(self.ctx.config.connect_timeout()).await;
            }
        }
        let mut out = BytesMut::new();
        let version = self.ctx.learned.facts.load().version.clone();
        local::hello_reply(&mut out, proto, self.id, &version);
        self.local_reply(out.freeze(), 1).await;
    }
}

fn arg_bytes(frame: &Bytes, req: &Request, i: usize) -> Bytes {
    let a = req.args[i];
    frame.slice(a.start as usize..a.end as usize)
}

/// Arguments of a request as byte slices.
struct ArgView<'a> {
    frame: &'a [u8],
    args: &'a Args,
    i: usize,
}

impl<'a> ArgView<'a> {
    fn new(frame: &'a [u8], args: &'a Args) -> Self {
        ArgView { frame, args, i: 0 }
    }
}

impl<'a> Iterator for ArgView<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let a = self.args.get(self.i)?;
        self.i += 1;
        Some(&self.frame[a.start as usize..a.end as usize])
    }
}

/// Writes replies in request order; see the module docs.
async fn write_loop(
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    mut wr: OwnedWriteHalf,
    id: u64,
    info: Arc<ClientInfo>,
) {
    let mut w = Writer {
        invalidate_after: None,
        out: BytesMut::new(),
        wr: &mut wr,
        shared: &shared,
        ctx: &ctx,
        info: &info,
        observed: Vec::new(),
        errors: Vec::new(),
    };
    loop {
        let entry = match rx.try_recv() {
            Ok(e) => e,
            Err(mpsc::error::TryRecvError::Empty) => {
                if !w.flush().await {
                    return;
                }
                match rx.recv().await {
                    Some(e) => e,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let ok = match entry {
            Entry::Ready(ready) => {
                let Ready {
                    bytes,
                    n,
                    errors,
                    batch,
                } = *ready;
                let ok = w.put(bytes).await;
                w.observed.push(Observed {
                    batch,
                    errors,
                    req: None,
                });
                shared.finish_entry(n);
                ok
            }
            Entry::Pooled(pooled) => {
                let Pooled {
                    rx,
                    req,
                    count,
                    route,
                    written,
                    hot,
                    batch,
                } = *pooled;
                if let Some(cache) = ctx.cache.as_ref().filter(|_| !written.is_empty()) {
                    // The writes have run once their reply is here: drop
                    // their keys again before the client can see it, voiding
                    // a fill that read them before the write ran (fills and
                    // writes travel on different connections).
                    w.invalidate_after = Some((cache.clone(), written));
                }
                let ok = w.pooled(rx, req, count, route, id, batch, hot).await;
                shared.finish_entry(count);
                ok
            }
            Entry::Relay(prx) => {
                let ok = w.relay(prx).await;
                shared.finish_entry(0);
                ok
            }
            Entry::Close => {
                w.flush().await;
                shared.finish_entry(0);
                break;
            }
        };
        if !ok {
            shared.meter.kill();
            return;
        }
    }
    w.flush().await;
    let _ = wr.shutdown().await;
}

/// A read of hot keys in a pooled batch that the near cache did not answer.
struct HotRead {
    /// Its place in the batch.
    index: u32,
    keys: SmallVec<[Bytes; 1]>,
    /// A request the cache answers: its reply is compared with the cache's.
    /// `None`: another read of the keys, whose reply is only `seen`.
    miss: Option<crate::cache::Miss>,
}

/// How long a client's `seen` time can matter: longer than any cached
/// reply lives after its fill began.
fn seen_keep(cache: &crate::cache::NearCache) -> Duration {
    Duration::from_millis(cache.config.max_ttl_ms) + Duration::from_secs(10)
}

/// Show the near cache Redis's replies (a batch's, in `bytes`) to its
/// reads of hot keys, in one pass over the frames (`hot` is in batch order).
fn observe_replies(cache: &crate::cache::NearCache, proto: Proto, bytes: &[u8], hot: &[HotRead]) {
    let mut wanted = hot.iter().filter_map(|h| Some((h.index, h.miss.as_ref()?)));
    let Some(mut next) = wanted.next() else {
        return;
    };
    let (mut off, mut index) = (0, 0u32);
    while let Ok(Some(end)) = crate::resp::Scanner::new().next(&bytes[off..]) {
        if index == next.0 {
            cache.observe(next.1, proto, &bytes[off..off + end]);
            match wanted.next() {
                Some(w) => next = w,
                None => return,
            }
        }
        off += end;
        index += 1;
    }
}

/// Write all of `bytes` to the client; false if it is gone. Once the
/// reader has ended, a client that takes none of them for
/// `server.drain_timeout_ms` counts as gone (it half-closed and does not
/// read: Redis would have dropped it at once).
async fn write_out(w: &mut Writer<'_>, bytes: &[u8]) -> bool {
    let (wr, shared, ctx) = (&mut *w.wr, w.shared, w.ctx);
    let drain = Duration::from_millis(ctx.config.server.drain_timeout_ms);
    let mut off = 0;
    while off < bytes.len() {
        let written = if shared.reader_gone.load(Ordering::Acquire) {
            match tokio::time::timeout(drain, wr.write(&bytes[off..])).await {
                Ok(r) => r,
                Err(_) => {
                    Limit::DrainTimeout.reached();
                    tracing::info!(
                        conn = w.info.id,
                        drain_timeout_ms = ctx.config.server.drain_timeout_ms,
                        "client closed its side and takes no replies; closing it"
                    );
                    return false;
                }
            }
        } else {
            tokio::select! {
                // The write first: one that completes at once (the usual
                // case) never registers with `gone`.
                biased;
                r = wr.write(&bytes[off..]) => r,
                // Bound the rest of this write too.
                _ = shared.gone.notified() => continue,
            }
        };
        match written {
            Ok(0) | Err(_) => return false,
            Ok(n) => off += n,
        }
    }
    true
}

/// A batch whose replies are queued, waiting for the write that sends
/// them to record its latency.
struct Observed {
    batch: Batch,
    errors: Vec<u32>,
    /// The requests, for the slow log (pooled batches).
    req: Option<Bytes>,
}

/// Requests of one slow batch written to the slow log at most.
const SLOWLOG_PER_BATCH: usize = 8;

struct Writer<'a> {
    /// Keys of the batch being awaited to drop from the near cache when its
    /// reply arrives.
    invalidate_after: Option<(Arc<crate::cache::NearCache>, Written)>,
    out: BytesMut,
    wr: &'a mut OwnedWriteHalf,
    shared: &'a Shared,
    ctx: &'a Ctx,
    info: &'a ClientInfo,
    /// Batches whose replies are buffered or being written.
    observed: Vec<Observed>,
    /// Indexes of the requests of the current pooled batch answered with
    /// an error keyward made (a failed batch).
    errors: Vec<u32>,
}

impl Writer<'_> {
    /// Write out what is buffered; false if the client is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            self.record();
            return true;
        }
        let mut out = std::mem::take(&mut self.out);
        let ok = write_out(self, &out).await;
        self.shared.meter.sub(out.len());
        self.sent(out.len());
        out.clear();
        if out.capacity() <= 4 * WRITE_FLUSH {
            self.out = out;
        }
        self.record();
        ok
    }

    fn sent(&self, n: usize) {
        self.ctx
            .stats
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The replies of the observed batches are written: record their
    /// latency (one clock read for all), and log the slow ones.
    fn record(&mut self) {
        if self.observed.is_empty() {
            return;
        }
        let now = Instant::now();
        for o in self.observed.drain(..) {
            let us = now.saturating_duration_since(o.batch.start).as_micros() as u64;
            self.ctx.stats.finish(&o.batch.tally, &o.errors, us);
            if let (true, Some(req)) = (self.ctx.slowlog.is_slow(us), &o.req) {
                slowlog_batch(self.ctx, req, us, &self.info.addr.to_string());
            }
        }
    }

    /// Queue reply bytes (already counted on the meter).
    async fn put(&mut self, bytes: Bytes) -> bool {
        if bytes.len() >= WRITE_DIRECT {
            if !self.flush().await {
                return false;
            }
            let ok = write_out(self, &bytes).await;
            self.shared.meter.sub(bytes.len());
            self.sent(bytes.len());
            return ok;
        }
        self.out.extend_from_slice(&bytes);
        if self.out.len() >= WRITE_FLUSH {
            return self.flush().await;
        }
        true
    }

    async fn put_local(&mut self, text: &str) -> bool {
        let mut b = BytesMut::new();
        reply::error(&mut b, text);
        self.shared.meter.add(b.len());
        self.put(b.freeze()).await
    }

    /// An error reply keyward makes for request `seq` (its index in the
    /// pooled batch is `index`): counted, logged with the connection and
    /// request ids, queued.
    async fn put_error(&mut self, error: &Error, seq: u64, index: u32) -> bool {
        let kind = ErrorKind::from(&error.kind);
        let text = error.resp_text();
        self.ctx.stats.error(kind);
        self.ctx
            .error_lines
            .log(self.info.id, seq, kind.name(), &text);
        self.errors.push(index);
        self.put_local(&text).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn pooled(
        &mut self,
        mut rx: oneshot::Receiver<BatchResult>,
        req: Bytes,
        count: u32,
        route: (Proto, i64),
        id: u64,
        batch: Batch,
        hot: Vec<HotRead>,
    ) -> bool {
        let ctx = self.ctx;
        let res = match rx.try_recv() {
            Ok(r) => r,
            Err(_) => {
                if !self.flush().await {
                    return false;
                }
                rx.await.unwrap_or_else(|_| {
                    Err(crate::upstream::BatchError {
                        delivered: Bytes::new(),
                        done: 0,
                        sent: true,
                        error: Error::upstream(
                            Kind::OutcomeUnknown,
                            "upstream connection dropped the request",
                        ),
                    })
                })
            }
        };
        if let Some((cache, written)) = self.invalidate_after.take() {
            written.replied(&cache.store);
            self.shared.writes_in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        // Before the client can see these replies (and read again):
        // Redis's replies to reads of hot keys are compared with the
        // cache's own reply to the same request, and the keys `seen` (other
        // cached requests on them may be older). A failed batch's keys are
        // `seen` once its retries are answered too.
        let (ok, errors) = match res {
            Ok(Replies { bytes, errors }) => {
                if let (false, Some(cache)) = (hot.is_empty(), &ctx.cache) {
                    observe_replies(cache, route.0, &bytes, &hot);
                }
                self.shared.hot_reads_done(&hot, ctx);
                (self.put(bytes).await, errors)
            }
            Err(e) => {
                let first_seq = batch.first_seq;
                let ok = self.failed(ctx, e, &req, count, route, id, first_seq).await;
                self.shared.hot_reads_done(&hot, ctx);
                (ok, std::mem::take(&mut self.errors))
            }
        };
        // The request bytes go along for the slow log (moved, not copied).
        self.observed.push(Observed {
            batch,
            errors,
            req: (ctx.slowlog.slower_than_us >= 0).then_some(req),
        });
        ok
    }

    /// A batch failed: keep the replies that came, retry reads once, and give
    /// every other request an error that says whether it reached Redis.
    #[allow(clippy::too_many_arguments)]
    async fn failed(
        &mut self,
        ctx: &Ctx,
        e: crate::upstream::BatchError,
        req: &Bytes,
        count: u32,
        route: (Proto, i64),
        id: u64,
        first_seq: u64,
    ) -> bool {
        if !e.delivered.is_empty() && !self.put(e.delivered).await {
            return false;
        }
        let table = ctx.learned.table.load();
        let mut parser = RequestParser::new();
        let mut off = 0usize;
        let mut index = 0u32;
        while index < count {
            let r = match parser.parse(&req[off..], &ctx.limits) {
                Ok(Some(Parsed::Request(r))) => r,
                Ok(Some(Parsed::Skip(n))) => {
                    off += n;
                    continue;
                }
                _ => break,
            };
            let frame = req.slice(off..off + r.consumed);
            off += r.consumed;
            index += 1;
            if index <= e.done {
                continue;
            }
            let name = r.arg(&frame, 0);
            let sub = (r.args.len() > 1).then(|| r.arg(&frame, 1));
            let readonly = table
                .as_deref()
                .and_then(|t| t.get_with_sub(name, sub))
                .map(|i| i.has(flags::READONLY))
                .unwrap_or(false);
            {
                // Reads are retried once, and so is any request that never
                // reached Redis (its outcome is known: not executed). A
                // write that may have run is never replayed.
                // Only when a connection died under the batch (or a fence
                // withdrew it): when no connection or no master was there,
                // the reader already waited (and held the batch) in vain.
                let conn_died = matches!(e.error.kind, Kind::NotSent | Kind::OutcomeUnknown);
                if (readonly || !e.sent) && conn_died {
                    // Retried on the current master (after a failover, the new one).
                    if !self.flush().await {
                        return false;
                    }
                    let ok = match self.retry(ctx, &frame, route, id, readonly).await {
                        Ok(bytes) => self.put(bytes).await,
                        Err(mut e2) => {
                            // Both causes: the first (a timeout, a protocol
                            // error) is what the operator has to look at.
                            e2.detail = format!("{}; retried: {}", e.error.detail, e2.detail);
                            self.put_error(&e2, first_seq + index as u64 - 1, index - 1)
                                .await
                        }
                    };
                    if !ok {
                        return false;
                    }
                    continue;
                }
            }
            if !self
                .put_error(&e.error, first_seq + index as u64 - 1, index - 1)
                .await
            {
                return false;
            }
        }
        // Requests the rescan could not find (should not happen) still get a reply.
        while index < count {
            index += 1;
            if index > e.done
                && !self
                    .put_error(&e.error, first_seq + index as u64 - 1, index - 1)
                    .await
            {
                return false;
            }
        }
        true
    }

    /// Send one request again. A read, following Sentinel, is sent again
    /// until a master answers or `sentinel.hold_ms` runs out: a retry can
    /// land on a sibling connection to the same dead master before anyone
    /// knows it is dead, so the tracker is told and the read waits for a
    /// change. Anything else is sent once more at most.
    async fn retry(
        &self,
        ctx: &Ctx,
        frame: &[u8],
        (proto, db): (Proto, i64),
        id: u64,
        readonly: bool,
    ) -> Result<Bytes, Error> {
        let hold = Duration::from_millis(ctx.config.sentinel.hold_ms);
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            let rx = match ctx
                .send(
                    proto,
                    db,
                    id as usize,
                    frame,
                    1,
                    Some(&self.shared.meter),
                    0,
                )
                .await?
            {
                Sent::Queued(_, rx) => rx,
                // Generation 0 accepts any master; nothing was sent.
                Sent::Moved(_) => continue,
            };
            let e2 = match rx.await {
                Ok(Ok(r)) => return Ok(r.bytes),
                Ok(Err(e2)) => e2.error,
                Err(_) => Error::upstream(
                    Kind::OutcomeUnknown,
                    "upstream connection dropped the request",
                ),
            };
            let again = (readonly || e2.kind == Kind::NotSent)
                && ctx.config.uses_sentinel()
                && matches!(e2.kind, Kind::NotSent | Kind::OutcomeUnknown)
                && tokio::time::Instant::now() < deadline;
            if !again {
                return Err(Error::upstream(Kind::Unavailable, e2.detail));
            }
            ctx.check_master.notify_one();
            let mut changed = ctx.topology.subscribe();
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    async fn relay(&mut self, mut prx: mpsc::Receiver<PinMsg>) -> bool {
        loop {
            let msg = match prx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !self.flush().await {
                        return false;
                    }
                    prx.recv().await
                }
            };
            match msg {
                None => return true,
                Some(PinMsg::Data(b)) => {
                    if !self.put(b).await {
                        return false;
                    }
                }
                Some(PinMsg::Lost { error, outstanding }) => {
                    let kind = ErrorKind::from(&error.kind);
                    if outstanding > 0 {
                        // Which requests were owed is the relay's secret:
                        // request id 0.
                        self.ctx
                            .error_lines
                            .log(self.info.id, 0, kind.name(), &error.resp_text());
                    }
                    for _ in 0..outstanding {
                        self.ctx.stats.error(kind);
                        if !self.put_local(&error.resp_text()).await {
                            return false;
                        }
                    }
                    // The connection's state (transaction, subscriptions,
                    // database) is gone; close rather than carry on without it.
                    tracing::warn!(conn = self.info.id, error = %error, outstanding, "pinned upstream connection lost; closing client");
                    self.flush().await;
                    return false;
                }
            }
        }
    }
}

/// Put the first requests of a slow batch in the slow log.
fn slowlog_batch(ctx: &Ctx, req: &[u8], us: u64, addr: &str) {
    let mut parser = RequestParser::new();
    let mut off = 0usize;
    for _ in 0..SLOWLOG_PER_BATCH {
        match parser.parse(&req[off..], &ctx.limits) {
            Ok(Some(Parsed::Request(r))) => {
                let frame = &req[off..off + r.consumed];
                let args: Vec<&[u8]> = ArgView::new(frame, &r.args).collect();
                ctx.slowlog.add(args.into_iter(), us, addr);
                off += r.consumed;
            }
            Ok(Some(Parsed::Skip(n))) => off += n,
            _ => return,
        }
    }
}

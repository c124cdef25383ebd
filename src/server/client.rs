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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::local;
use super::state::SessionState;
use super::{Ctx, Sent};
use crate::command::keys::for_each_key;
use crate::command::table::flags;
use crate::command::{classify, Class};
use crate::error::{Error, Kind};
use crate::hotkey::sampler::Sampler;
use crate::resp::reply;
use crate::resp::request::Args;
use crate::resp::{Parsed, Proto, Request, RequestParser};
use crate::upstream::{BatchResult, Meter, PinMsg, Pinned};

/// Local replies are flushed to the writer once this large.
const LOCAL_FLUSH: usize = 64 * 1024;
/// Writer buffer size above which replies are written out.
const WRITE_FLUSH: usize = 64 * 1024;
/// Replies at least this large are written from their own buffer, not copied.
const WRITE_DIRECT: usize = 16 * 1024;

/// One step of the reply stream, in request order.
enum Entry {
    /// Replies keyward made itself for `n` requests.
    Ready(Bytes, u32),
    /// A batch sent to the shared pool.
    Pooled {
        rx: oneshot::Receiver<BatchResult>,
        req: Bytes,
        count: u32,
        proto: Proto,
        /// Keys the batch writes, dropped from the near cache again when
        /// its reply arrives (see `Reader::pending_written`).
        written: Vec<Bytes>,
    },
    /// Everything a pinned connection sends, until it is released.
    Relay(mpsc::Receiver<PinMsg>),
    /// Close the connection once everything before is written.
    Close,
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
}

impl Shared {
    fn finish_entry(&self, requests: u32) {
        if requests > 0 {
            self.permits.add_permits(requests as usize);
        }
        if self.entries.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }
}

/// Decrements the client count however the reader task ends (including
/// being aborted).
struct ClientSlot(Arc<Ctx>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
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
    readers: &mut JoinSet<()>,
    writers: &TaskTracker,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let shared = Arc::new(Shared {
        meter: Arc::new(Meter::new(id, ctx.config.server.max_reply_bytes)),
        entries: AtomicUsize::new(0),
        drained: Notify::new(),
        permits: Semaphore::new(ctx.config.server.max_pending_requests),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = writers.spawn(write_loop(ctx.clone(), shared.clone(), rx, wr, id));
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
        target: Target::Pool(Proto::Resp2, 0),
        closing: false,
        sampler: Sampler::new(id),
        run_replica: false,
        pending_written: Vec::new(),
    };
    let slot = ClientSlot(ctx);
    let reader = readers.spawn(async move {
        let _slot = slot;
        reader.run(rd).await;
        if let Some(p) = reader.pinned.take() {
            drop(reader);
            p.release().await;
        }
    });
    shared.meter.set_tasks(reader, writer.abort_handle());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The shared pool of one RESP version in one upstream generation.
    Pool(Proto, u64),
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
    /// Keys written by requests not yet handed to the writer. Each is
    /// dropped from the near cache when the write is sent and again when
    /// its reply arrives: a fill racing the write on the tracking
    /// connection cannot then outlive the acknowledgement.
    pending_written: Vec<Bytes>,
}

impl Reader {
    async fn run(&mut self, mut rd: OwnedReadHalf) {
        let idle = match self.ctx.config.server.idle_timeout_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        while !self.closing {
            // A client that left its state (EXEC, last UNSUBSCRIBE) and went
            // quiet gives its pinned connection back without waiting for its
            // next request.
            self.maybe_release().await;
            let want = self.parser.need().saturating_sub(self.buf.len()).max(4096);
            if self.buf.capacity() - self.buf.len() < want {
                self.buf.reserve(want);
            }
            let buf = &mut self.buf;
            let pinned = &self.pinned;
            let releasable = pinned.is_some() && self.state.clean();
            let read = async {
                match idle {
                    Some(t) if pinned.is_none() => tokio::time::timeout(t, rd.read_buf(buf))
                        .await
                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
                    _ => rd.read_buf(buf).await,
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
                    self.on_pinned_lost().await;
                    continue;
                }
                _ = became_idle => continue,
                r = read => r,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            self.process().await;
        }
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
                    self.emit_run(&mut off).await;
                    let mut out = BytesMut::new();
                    reply::error(&mut out, &format!("ERR {e}"));
                    tracing::debug!(client = self.id, error = %e, "client protocol error; closing");
                    self.local_reply(out.freeze(), 1).await;
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
                    continue;
                }
                Parsed::Request(r) => r,
            };
            if !self.take_permit(&mut off).await {
                return;
            }
            let mut hit: Option<Bytes> = None;
            let class = {
                let frame: &[u8] = match &req.inline {
                    Some(f) => f,
                    None => &self.buf[off..off + req.consumed],
                };
                let args: SmallVec<[&[u8]; 8]> = ArgView::new(frame, &req.args).collect();
                let sampled = match &self.ctx.hotkeys {
                    Some(d) => self.sampler.due(d.config.sample_rate),
                    None => false,
                };
                let cache = self.ctx.cache.as_ref();
                let cache_active = cache.is_some_and(|c| c.store.active());
                // One command-table lookup, only when something needs it.
                let info = if sampled || cache_active || self.ctx.read_from_replica {
                    table.as_deref().and_then(|t| t.get(args[0]))
                } else {
                    None
                };
                if let (Some(d), Some(info), true) = (&self.ctx.hotkeys, info, sampled) {
                    for_each_key(info, args.len(), |i| args[i], |k| d.record(k));
                }
                let class = classify(table.as_deref(), &args);
                // A write drops its keys from the cache before it is
                // forwarded (and again when its reply arrives, see
                // `pending_written`): a client reads its own writes.
                if let (Some(cache), Some(info), true) = (cache, info, cache_active) {
                    if info.has(flags::WRITE) || info.has(flags::MAY_REPLICATE) {
                        let written = &mut self.pending_written;
                        for_each_key(
                            info,
                            args.len(),
                            |i| args[i],
                            |k| {
                                cache.store.invalidate(k);
                                written.push(Bytes::copy_from_slice(k));
                            },
                        );
                    }
                }
                // A hit on a hot key is answered here, in order.
                if let (Some(cache), Some(d)) = (cache, &self.ctx.hotkeys) {
                    if class == Class::Forward && self.pinned.is_none() && self.state.db == 0 {
                        hit = cache.lookup(d, &args, frame, self.proto);
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
            if let Some(reply) = hit.take() {
                self.emit_run(&mut off).await;
                let consumed = req.consumed;
                self.buf.advance(consumed);
                self.local_reply(reply, 1).await;
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
                self.run_count += 1;
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
                p.set_resubscribe(self.state.only_subscriptions());
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
        if self.run_replica {
            // Reads may be stale on a replica (that is the point of the
            // option) and need no ordering barrier against the master.
            let meter = Some(self.shared.meter.clone());
            if let Some(rx) =
                self.ctx
                    .send_replica(self.proto, self.id as usize, &req, count, meter)
            {
                self.push_pooled(rx, req, count);
                return;
            }
        }
        self.send_pool(req, count).await;
    }

    async fn send_pool(&mut self, req: Bytes, count: u32) {
        // Held here while a failover is suspected or under way. A batch
        // bound for another connection than the last one (other RESP
        // version, pinned before, a new master) first waits for every
        // earlier reply, so it cannot overtake them.
        let mut generation = match self.target {
            Target::Pool(p, g) if p == self.proto => g,
            _ => {
                self.switch_to(Target::Pool(self.proto, 0)).await;
                0
            }
        };
        let sent = loop {
            match self
                .ctx
                .send(
                    self.proto,
                    self.id as usize,
                    &req,
                    count,
                    Some(&self.shared.meter),
                    generation,
                )
                .await
            {
                Ok(Sent::Queued(g, rx)) => {
                    self.target = Target::Pool(self.proto, g);
                    break Ok(rx);
                }
                Ok(Sent::Moved(g)) => {
                    self.switch_to(Target::Pool(self.proto, g)).await;
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
        self.push_pooled(rx, req, count);
    }

    /// Queue a batch sent to a pool, with the keys it writes.
    fn push_pooled(&mut self, rx: oneshot::Receiver<BatchResult>, req: Bytes, count: u32) {
        let written = std::mem::take(&mut self.pending_written);
        self.push(Entry::Pooled {
            rx,
            req,
            count,
            proto: self.proto,
            written,
        });
    }

    /// Is the last batch's route the shared pool for the current protocol?
    fn on_pool(&self) -> bool {
        matches!(self.target, Target::Pool(p, _) if p == self.proto)
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
        self.push(Entry::Ready(bytes, n));
    }

    /// A reply keyward makes itself, in order with everything before it.
    async fn local_reply(&mut self, bytes: Bytes, requests: u32) {
        if let (Some(p), Some(tx)) = (&self.pinned, &self.pinned_tx) {
            // Behind the pinned connection's replies: wait until they are
            // all queued, then queue this one on the same relay.
            p.wait_idle().await;
            self.shared.meter.add(bytes.len());
            let _ = tx.send(PinMsg::Data(bytes)).await;
            self.shared.permits.add_permits(requests as usize);
            return;
        }
        self.local.extend_from_slice(&bytes);
        self.local_n += requests;
        if self.local.len() >= LOCAL_FLUSH {
            self.flush_local();
        }
    }

    async fn local_error(&mut self, text: &str) {
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
        self.target = target;
    }

    /// Give the pinned connection back when nothing ties the client to it.
    async fn maybe_release(&mut self) {
        let Some(p) = &self.pinned else { return };
        if !(p.idle() && self.state.clean()) {
            return;
        }
        let p = self.pinned.take().expect("checked");
        self.pinned_tx = None;
        p.release().await;
        tracing::trace!(client = self.id, "pinned connection released");
    }

    /// Make sure the client has a pinned connection; false (with an error
    /// reply queued) if none can be had.
    async fn ensure_pinned(&mut self) -> bool {
        if self.pinned.is_some() {
            return true;
        }
        self.switch_to(Target::Pinned).await;
        match self.open_pinned().await {
            Ok(()) => true,
            Err(text) => {
                self.local_error(&text).await;
                false
            }
        }
    }

    /// Open a pinned connection on the current master; the error is the
    /// reply line for the client.
    async fn open_pinned(&mut self) -> Result<(), String> {
        let max = self.ctx.config.upstream.max_pinned;
        let Ok(permit) = self.ctx.pinned.clone().try_acquire_owned() else {
            return Err(format!(
                "ERR max number of pinned upstream connections reached (upstream.max_pinned = {max})"
            ));
        };
        let up = self.ctx.upstream(1, 0).await.map_err(|e| e.resp_text())?;
        let (tx, rx) = mpsc::channel(64);
        let p = Pinned::open(
            &up,
            self.proto,
            permit,
            tx.clone(),
            self.shared.meter.clone(),
        )
        .await
        .map_err(|e| e.resp_text())?;
        p.set_carry_any_loss(self.ctx.config.uses_sentinel());
        self.push(Entry::Relay(rx));
        self.pinned = Some(p);
        self.pinned_tx = Some(tx);
        self.target = Target::Pinned;
        Ok(())
    }

    /// The pinned connection ended under the session. If the master was
    /// replaced and the client held nothing but subscriptions, carry them
    /// to the new master (the client sees no error; messages published in
    /// the gap are lost). Otherwise the writer has reported the loss and
    /// closes the client.
    async fn on_pinned_lost(&mut self) {
        let Some(p) = self.pinned.take() else { return };
        self.pinned_tx = None;
        if !p.carried_over() {
            self.closing = true;
            return;
        }
        drop(p);
        // Until the tracker has noticed a dead master, opening may fail:
        // ask it to check, and try again within the hold time.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.ctx.config.sentinel.hold_ms);
        loop {
            match self.open_pinned().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(client = self.id, error = %e, "cannot carry subscriptions to a new master; closing client");
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
                }
            }
        }
        let kinds: [(&[u8], Vec<Bytes>); 3] = [
            (b"SUBSCRIBE", self.state.channels.iter().cloned().collect()),
            (b"PSUBSCRIBE", self.state.patterns.iter().cloned().collect()),
            (
                b"SSUBSCRIBE",
                self.state.shard_channels.iter().cloned().collect(),
            ),
        ];
        let resp2 = self.proto == Proto::Resp2;
        let Some(p) = &mut self.pinned else { return };
        if resp2 {
            p.mark_subscribed();
        }
        for (cmd, names) in kinds {
            if names.is_empty() {
                continue;
            }
            let mut args: Vec<&[u8]> = vec![cmd];
            args.extend(names.iter().map(|n| n.as_ref()));
            let mut out = BytesMut::new();
            reply::command(&mut out, &args);
            if p.send_swallowed(&out, names.len() as u64).await.is_err() {
                self.closing = true;
                return;
            }
        }
        p.set_resubscribe(true);
        tracing::info!(
            client = self.id,
            channels = self.state.channels.len(),
            patterns = self.state.patterns.len(),
            shard_channels = self.state.shard_channels.len(),
            "subscriptions carried to the new master"
        );
    }

    /// Send on the pinned connection, owing `expect` replies.
    async fn send_pinned(&mut self, frame: &[u8], expect: u64) {
        // Writes on a pinned connection were dropped from the cache when
        // sent; their replies come back through the relay.
        self.pending_written.clear();
        let Some(p) = &mut self.pinned else { return };
        // The request's permit covers nothing once it is on the relay.
        self.shared.permits.add_permits(1);
        if let Err(e) = p.send(frame, expect).await {
            // The relay reports the lost connection; stop reading.
            tracing::debug!(client = self.id, error = %e, "pinned write failed");
            self.closing = true;
        }
    }

    /// Route one request that is not a plain pool-bound one.
    async fn dispatch(&mut self, class: Class, req: &Request, frame: Bytes) {
        let args: Vec<&[u8]> = ArgView::new(&frame, &req.args).collect();
        match class {
            Class::Hello => self.hello(&args, &frame).await,
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
            Class::Reset => {
                if let Some(p) = self.pinned.take() {
                    self.pinned_tx = None;
                    p.release().await;
                }
                self.state = SessionState::default();
                self.proto = Proto::Resp2;
                let mut out = BytesMut::new();
                reply::simple(&mut out, "RESET");
                self.local_reply(out.freeze(), 1).await;
            }
            Class::Select => {
                let db = args
                    .get(1)
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .and_then(|s| s.parse::<i64>().ok());
                match db {
                    Some(0) if self.pinned.is_none() && args.len() == 2 => {
                        let mut out = BytesMut::new();
                        reply::simple(&mut out, "OK");
                        self.local_reply(out.freeze(), 1).await;
                    }
                    Some(n) if n >= 0 && args.len() == 2 => {
                        if self.ensure_pinned().await {
                            self.state.db = n;
                            let expect = self.state.replies_for_next();
                            self.send_pinned(&frame, expect).await;
                        }
                    }
                    // Malformed: Redis's own error, from wherever we are.
                    _ => self.forward(req, frame).await,
                }
            }
            Class::Multi | Class::Watch | Class::Blocking | Class::Monitor | Class::ClientState => {
                if self.ensure_pinned().await {
                    match class {
                        Class::Multi => self.state.in_multi = true,
                        Class::Watch if !self.state.in_multi => self.state.watching = true,
                        Class::Monitor => self.state.monitor = true,
                        Class::ClientState => self.state.client_state = true,
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
                    Class::Exec | Class::Discard => {
                        self.state.in_multi = false;
                        self.state.watching = false;
                    }
                    _ if !self.state.in_multi => self.state.watching = false,
                    _ => {}
                }
                let expect = self.state.replies_for_next();
                self.send_pinned(&frame, expect).await;
            }
            Class::Subscribe(kind) => {
                if self.ensure_pinned().await {
                    let names: Vec<Bytes> =
                        (1..args.len()).map(|i| arg_bytes(&frame, req, i)).collect();
                    let expect = self.state.subscribe(kind, &names);
                    if let Some(p) = &self.pinned {
                        if self.proto == Proto::Resp2 {
                            p.mark_subscribed();
                        }
                    }
                    self.send_pinned(&frame, expect).await;
                }
            }
            Class::Unsubscribe(kind) => {
                if self.pinned.is_none() {
                    return self.forward(req, frame).await;
                }
                let names: Vec<Bytes> =
                    (1..args.len()).map(|i| arg_bytes(&frame, req, i)).collect();
                let expect = self.state.unsubscribe(kind, &names);
                self.send_pinned(&frame, expect).await;
            }
            Class::ClientReply(mode) => {
                if self.ensure_pinned().await {
                    let expect = self.state.set_reply_mode(mode);
                    self.send_pinned(&frame, expect).await;
                }
            }
            Class::Keyward => {
                let mut out = BytesMut::new();
                if args.len() == 2 && args[1].eq_ignore_ascii_case(b"failover") {
                    // A planned switchover; this client waits for it.
                    match crate::topology::switchover::planned(self.ctx.clone()).await {
                        Ok(_) => reply::simple(&mut out, "OK"),
                        Err(e) => reply::error(&mut out, &format!("ERR switchover failed: {e}")),
                    }
                } else if args.len() >= 3
                    && args[1].eq_ignore_ascii_case(b"hotkeys")
                    && args[2].eq_ignore_ascii_case(b"fleet")
                    && self.ctx.hotkeys.is_some()
                {
                    // The fleet view reads Redis; this client waits for it.
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
            Class::Replication => {
                self.local_error(
                    "ERR keyward does not forward SYNC/PSYNC; connect replicas to Redis directly",
                )
                .await
            }
            Class::Forward => self.forward(req, frame).await,
        }
    }

    /// An ordinary request taken out of the run (inline, or while pinned).
    async fn forward(&mut self, _req: &Request, frame: Bytes) {
        if self.pinned.is_some() {
            let expect = self.state.replies_for_next();
            self.send_pinned(&frame, expect).await;
        } else {
            self.flush_local();
            self.send_pool(frame, 1).await;
        }
    }

    async fn hello(&mut self, args: &[&[u8]], _frame: &Bytes) {
        let hello = match local::parse_hello(&args[1..]) {
            Ok(h) => h,
            Err(e) => return self.local_error(&e).await,
        };
        if let Some((user, pass)) = &hello.auth {
            if let Err(e) = local::check_auth(Some(user), pass) {
                return self.local_error(&e).await;
            }
        }
        let proto = hello.proto.unwrap_or(self.proto);
        if let Some(p) = &self.pinned {
            if p.proto != proto {
                // The pinned connection speaks the old protocol; switching it
                // mid-state is not supported, so say so rather than mislead.
                return self
                    .local_error("ERR keyward cannot change the protocol while the connection holds state (MULTI, SUBSCRIBE, SELECT, CLIENT); send RESET first")
                    .await;
            }
        }
        self.proto = proto;
        if let Some(name) = &hello.setname {
            // The name belongs to one connection: pin, and set it upstream
            // without showing the client the CLIENT SETNAME reply.
            if !self.ensure_pinned().await {
                return;
            }
            self.state.client_state = true;
            let mut cmd = BytesMut::new();
            reply::command(&mut cmd, &[b"CLIENT", b"SETNAME", name]);
            if let Some(p) = &mut self.pinned {
                if p.send_silent(&cmd).await.is_err() {
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
) {
    let mut w = Writer {
        invalidate_after: None,
        out: BytesMut::new(),
        wr: &mut wr,
        shared: &shared,
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
            Entry::Ready(bytes, n) => {
                let ok = w.put(bytes).await;
                shared.finish_entry(n);
                ok
            }
            Entry::Pooled {
                rx,
                req,
                count,
                proto,
                written,
            } => {
                if let Some(cache) = ctx.cache.as_ref().filter(|_| !written.is_empty()) {
                    // The writes have run once their reply is here: drop
                    // their keys again before the client can see it, voiding
                    // a fill that read them before the write ran (fills and
                    // writes travel on different connections).
                    w.invalidate_after = Some((cache.clone(), written));
                }
                let ok = w.pooled(&ctx, rx, req, count, proto, id).await;
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

struct Writer<'a> {
    /// Keys of the batch being awaited to drop from the near cache when its
    /// reply arrives.
    invalidate_after: Option<(Arc<crate::cache::NearCache>, Vec<Bytes>)>,
    out: BytesMut,
    wr: &'a mut OwnedWriteHalf,
    shared: &'a Shared,
}

impl Writer<'_> {
    /// Write out what is buffered; false if the client is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let ok = self.wr.write_all(&self.out).await.is_ok();
        self.shared.meter.sub(self.out.len());
        self.out.clear();
        if self.out.capacity() > 4 * WRITE_FLUSH {
            self.out = BytesMut::new();
        }
        ok
    }

    /// Queue reply bytes (already counted on the meter).
    async fn put(&mut self, bytes: Bytes) -> bool {
        if bytes.len() >= WRITE_DIRECT {
            if !self.flush().await {
                return false;
            }
            let ok = self.wr.write_all(&bytes).await.is_ok();
            self.shared.meter.sub(bytes.len());
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

    async fn pooled(
        &mut self,
        ctx: &Ctx,
        mut rx: oneshot::Receiver<BatchResult>,
        req: Bytes,
        count: u32,
        proto: Proto,
        id: u64,
    ) -> bool {
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
            for k in &written {
                cache.store.invalidate(k);
            }
        }
        match res {
            Ok(bytes) => self.put(bytes).await,
            Err(e) => self.failed(ctx, e, req, count, proto, id).await,
        }
    }

    /// A batch failed: keep the replies that came, retry reads once, and give
    /// every other request an error that says whether it reached Redis.
    async fn failed(
        &mut self,
        ctx: &Ctx,
        e: crate::upstream::BatchError,
        req: Bytes,
        count: u32,
        proto: Proto,
        id: u64,
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
                    let ok = match self.retry(ctx, &frame, proto, id, readonly).await {
                        Ok(bytes) => self.put(bytes).await,
                        Err(e2) => self.put_local(&e2.resp_text()).await,
                    };
                    if !ok {
                        return false;
                    }
                    continue;
                }
            }
            if !self.put_local(&e.error.resp_text()).await {
                return false;
            }
        }
        // Requests the rescan could not find (should not happen) still get a reply.
        while index < count {
            index += 1;
            if index > e.done && !self.put_local(&e.error.resp_text()).await {
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
        proto: Proto,
        id: u64,
        readonly: bool,
    ) -> Result<Bytes, Error> {
        let hold = Duration::from_millis(ctx.config.sentinel.hold_ms);
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            let rx = match ctx
                .send(proto, id as usize, frame, 1, Some(&self.shared.meter), 0)
                .await?
            {
                Sent::Queued(_, rx) => rx,
                // Generation 0 accepts any master; nothing was sent.
                Sent::Moved(_) => continue,
            };
            let e2 = match rx.await {
                Ok(Ok(bytes)) => return Ok(bytes),
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
                return Err(Error::upstream(
                    Kind::Unavailable,
                    format!("{} (retried)", e2.detail),
                ));
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
                    for _ in 0..outstanding {
                        if !self.put_local(&error.resp_text()).await {
                            return false;
                        }
                    }
                    // The connection's state (transaction, subscriptions,
                    // database) is gone; close rather than carry on without it.
                    tracing::warn!(error = %error, "pinned upstream connection lost; closing client");
                    self.flush().await;
                    return false;
                }
            }
        }
    }
}

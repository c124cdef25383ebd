//! A pinned upstream connection: dedicated to one client while it holds
//! connection state (MULTI, WATCH, a blocking call, subscriptions, MONITOR,
//! SELECT, CLIENT state).
//!
//! It is a byte relay: the client's requests are written as they are and
//! everything the upstream sends is forwarded in order, including pushes that
//! answer no request (pub/sub messages, MONITOR lines). The reader counts the
//! frames that answer requests, so the session knows when nothing is in
//! flight and the connection can be given back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connector;
use super::generation::Upstream;
use super::meter::Meter;
use super::parked::Parked;
use super::pool::Node;
use crate::error::{Error, Kind};
use crate::resp::scan::{elements, string_of};
use crate::resp::{Proto, Scanner};

/// What the relay hands the client's writer.
#[derive(Debug)]
pub enum PinMsg {
    /// Upstream bytes, complete frames only, to forward as they are.
    Data(Bytes),
    /// The connection died with `outstanding` replies still owed.
    Lost { error: Error, outstanding: u64 },
}

/// State shared between the session and the relay reader.
#[derive(Debug, Default)]
pub struct PinShared {
    /// Replies owed for requests written.
    outstanding: AtomicU64,
    /// The connection speaks RESP3 now (a HELLO on it may switch it; see
    /// `Pinned::switch_proto`).
    resp3: AtomicBool,
    /// Set when the session gives the connection up on purpose.
    releasing: AtomicBool,
    /// The client has subscribed in RESP2 on this connection, so arrays
    /// starting with `message`/`pmessage`/`smessage` are pushes, not replies.
    subscribed: AtomicBool,
    /// The numbers (counted from the start, as `sent`) of the replies to
    /// requests keyward sent on the client's behalf (the `CLIENT SETNAME` of
    /// a `HELLO ... SETNAME`), dropped instead of relayed. By number, not
    /// "the next reply": replies to the client's earlier requests may still
    /// be on their way.
    swallow: Mutex<VecDeque<u64>>,
    /// Notified when `outstanding` drops to zero.
    idle: Notify,
    /// The connection's upstream generation was retired (master replaced).
    retired: AtomicBool,
    /// The session holds nothing but subscriptions and will carry them to
    /// the new master itself if the generation is retired.
    resubscribe: AtomicBool,
    /// Set (and notified) when the connection ended without the session
    /// releasing it.
    lost: AtomicBool,
    lost_notify: Notify,
    /// The relay ended quietly so the session can carry the subscriptions.
    carried: AtomicBool,
    /// Carry subscriptions over any loss, not only a retired generation
    /// (following Sentinel, a lost connection usually means a failing master).
    carry_any_loss: AtomicBool,
    /// Replies owed so far, counted from the start (never decremented).
    sent: AtomicU64,
    /// One more than `sent` when a request Redis answers with nothing
    /// (under CLIENT REPLY OFF or SKIP) was last written; 0 if none was. The
    /// reply numbered this (or later) shows Redis has run it.
    silent_at: AtomicU64,
    /// A RESET of keyward's own was sent to learn that everything before it
    /// has run; its reply is dropped (see `Pinned::send_reset_probe`).
    reset_probe: AtomicBool,
    /// One more than `sent` when a blocking call (BLPOP, WAIT, ...) was
    /// last written; its reply, numbered this, may take for ever.
    blocking_at: AtomicU64,
    /// Actions to run once the reply numbered `.0` (counted from the start)
    /// has arrived, before it is relayed (see `Pinned::on_reply`).
    after: Mutex<VecDeque<AfterReply>>,
    /// Notified by a release that keeps the connection: the relay hands
    /// its read half back instead of reading on.
    park: Notify,
    /// When replies were last owed with none owed before, or last arrived
    /// (`now_ms`): owed replies that make no progress for the command
    /// timeout mean a hung upstream (see `relay`).
    progress_ms: AtomicU64,
    /// Notified when replies become owed with none owed before.
    owed: Notify,
    /// (UN)SUBSCRIBEs, and EXECs that ran some, in flight, in order (see
    /// `Pinned::pubsub_next`): only their replies can be subscribe
    /// confirmations, and Redis may refuse one as a whole with one error
    /// where it owes a confirmation per channel (an ACL denying one).
    pubsub: Mutex<VecDeque<PubsubReq>>,
    /// `pubsub` is not empty: the relay looks at it only then.
    pubsub_any: AtomicBool,
    /// Reported requests whose first reply has arrived: (id, refused).
    settled: Mutex<Vec<(u64, bool)>>,
    /// MONITOR was sent: its lines (simple strings, in RESP3 too) answer
    /// no request.
    monitor: AtomicBool,
    /// The session is blocked until the owed replies are in (a RESET, a
    /// release, a reply of its own): owed replies Redis does not send
    /// while it answers others then fail the connection (see `relay`).
    awaited: AtomicBool,
}

/// See `PinShared::pubsub`.
#[derive(Debug)]
struct PubsubReq {
    /// The numbers of its first and last replies (counted from the start,
    /// as `sent`) if Redis runs it.
    first: u64,
    last: u64,
    /// Reported to `settled` under this id when its first reply arrives.
    id: Option<u64>,
    /// An EXEC that runs queued (UN)SUBSCRIBEs: refused unless its reply
    /// is an array, and when it ran, `extras` frames (confirmations past
    /// each one's first) follow that array and answer no request.
    exec: bool,
    extras: u64,
}

/// What one reply is, for the relay (see `PinShared::answers`).
#[derive(Debug, Default, PartialEq)]
struct Answer {
    /// Owed replies it stands for.
    replies: u64,
    /// It answers an (UN)SUBSCRIBE, or an EXEC that ran some.
    pubsub: bool,
    /// ...an EXEC: its elements are the confirmations.
    exec: bool,
    /// Frames that follow it as part of it (see `PubsubReq::extras`).
    extras: u64,
}

/// Milliseconds on a monotonic clock, for `PinShared::progress_ms`.
fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// An action waiting for a reply.
struct AfterReply(u64, Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for AfterReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AfterReply({})", self.0)
    }
}

impl PinShared {
    /// The reply numbered `at` (0: none marked) has not arrived yet. Only
    /// the session sends, so `sent` is steady; a stale `outstanding` errs
    /// towards true.
    fn before_reply(&self, at: &AtomicU64) -> bool {
        let at = at.load(Ordering::Acquire);
        let sent = self.sent.load(Ordering::Acquire);
        let answered = sent.saturating_sub(self.outstanding.load(Ordering::Acquire));
        at != 0 && answered < at
    }

    /// The protocol the connection speaks now.
    fn proto(&self) -> Proto {
        match self.resp3.load(Ordering::Acquire) {
            true => Proto::Resp3,
            false => Proto::Resp2,
        }
    }

    /// A subscribe confirmation's count for its namespace (channels and
    /// patterns: false; shard channels: true), in wire order: RESP2
    /// subscriber mode is on while any count is.
    fn confirmed(&self, counts: &mut [i64; 2], (shard, n): (bool, i64)) {
        counts[shard as usize] = n;
        self.subscribed
            .store(counts[0] + counts[1] > 0, Ordering::Relaxed);
    }

    /// Queue a pub/sub request sent next (see `PinShared::pubsub`).
    fn pubsub_next(&self, replies: u64, id: Option<u64>, exec: bool, extras: u64) {
        let first = self.sent.load(Ordering::Acquire) + 1;
        let mut reqs = self.pubsub.lock().unwrap_or_else(|e| e.into_inner());
        reqs.push_back(PubsubReq {
            first,
            last: first + replies.max(1) - 1,
            id,
            exec,
            extras,
        });
        self.pubsub_any.store(true, Ordering::Release);
    }

    /// For the reply numbered `number` (numbers come in order): how many
    /// owed replies it stands for (all of a pub/sub request's when it is
    /// that request's first and an error: Redis refused it as a whole),
    /// and whether it answers a pub/sub request (only then can it be a
    /// subscribe confirmation).
    fn answers(&self, number: u64, frame: &[u8]) -> Answer {
        let mut answer = Answer {
            replies: 1,
            ..Answer::default()
        };
        if !self.pubsub_any.load(Ordering::Acquire) {
            return answer;
        }
        let mut reqs = self.pubsub.lock().unwrap_or_else(|e| e.into_inner());
        let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(r) = reqs.front_mut() {
            if r.first > number {
                break;
            }
            if r.last >= number {
                answer.pubsub = true;
                answer.exec = r.exec;
                let first = r.first == number;
                // An EXEC ran its commands only if it answers an array
                // (not -EXECABORT, nor the null of a failed WATCH).
                let refused = first
                    && match r.exec {
                        true => frame.first() != Some(&b'*') || frame.starts_with(b"*-1"),
                        false => frame.first() == Some(&b'-'),
                    };
                if first && r.exec && !refused {
                    answer.extras = r.extras;
                }
                if let (true, Some(id)) = (first, r.id.take()) {
                    settled.push((id, refused));
                }
                if !refused {
                    break;
                }
                answer.replies = r.last - r.first + 1;
            }
            // Past (or refused whole): its replies are all in.
            if let Some(id) = r.id.take() {
                settled.push((id, false));
            }
            reqs.pop_front();
        }
        self.pubsub_any.store(!reqs.is_empty(), Ordering::Release);
        answer
    }

    /// Is reply number `n` one to drop? (Numbers come in order.)
    fn swallows(&self, n: u64) -> bool {
        let mut s = self.swallow.lock().unwrap_or_else(|e| e.into_inner());
        while s.front().is_some_and(|&f| f < n) {
            s.pop_front();
        }
        if s.front() == Some(&n) {
            s.pop_front();
            return true;
        }
        false
    }

    fn swallowing(&self) -> usize {
        self.swallow.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take_swallowing(&self) -> u64 {
        let mut s = self.swallow.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.len() as u64;
        s.clear();
        n
    }

    /// Run the actions waiting for replies up to number `answered` (all of
    /// them when the connection has ended: `u64::MAX`).
    fn replied(&self, answered: u64) {
        loop {
            let action = {
                let mut after = self.after.lock().unwrap_or_else(|e| e.into_inner());
                match after.front() {
                    Some(a) if a.0 <= answered => after.pop_front(),
                    _ => None,
                }
            };
            match action {
                Some(AfterReply(_, f)) => f(),
                None => return,
            }
        }
    }

    /// See `Pinned::wait_idle`; the relay zeroes `outstanding` and notifies
    /// `idle` when the connection ends.
    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The relay's read half and buffer, handed back when it stops for a
/// release that keeps the connection.
type ReadBack = Option<(OwnedReadHalf, BytesMut)>;

pub struct Pinned {
    /// Always Some until dropped (taken by `Drop` to outlive the session
    /// during a drain).
    wr: Option<OwnedWriteHalf>,
    shared: Arc<PinShared>,
    /// The relay task (taken by a release that keeps the connection).
    relay: Option<JoinHandle<ReadBack>>,
    node: Arc<Node>,
    parked: Arc<Parked>,
    retired: CancellationToken,
    pub proto: Proto,
    _permit: OwnedSemaphorePermit,
    /// keyward's shutdown: dropped after it with replies owed, the
    /// connection stays until they arrive (see `Drop`).
    drain_on: Option<CancellationToken>,
    /// A CLIENT REPLY SKIP was sent and no request since: Redis will
    /// silence the next one it gets (see `spend_skip`).
    skip_pending: bool,
    /// Closed rather than kept for the next client when given back (see
    /// `not_for_reuse`).
    single_use: bool,
}

impl Pinned {
    /// Connect, in database `db`, and start the relay reader feeding `tx`.
    /// Redis's refusal of the SELECT fails the open (the client must not
    /// run its commands in database 0 instead).
    pub async fn open(
        upstream: &Upstream,
        proto: Proto,
        db: i64,
        permit: OwnedSemaphorePermit,
        tx: mpsc::Sender<PinMsg>,
        meter: Arc<Meter>,
    ) -> Result<Pinned, Error> {
        let settings = &upstream.node.settings;
        let kept = match upstream.retired.is_cancelled() {
            false => {
                let wait = settings.connect_timeout;
                upstream.parked.take_or_wait(proto, wait).await
            }
            true => None,
        };
        let mut stream = match kept {
            Some(s) => s,
            None => connector::connect(settings, proto).await?,
        };
        if db != 0 {
            connector::select(&mut stream, settings, db).await?;
        }
        // A second handle on the socket lets a retired generation shut it
        // down (both directions) while the session still owns the write half.
        let io =
            |e: std::io::Error| Error::upstream(Kind::Io, format!("{}: {e}", settings.address));
        let std_stream = stream.into_std().map_err(io)?;
        let fence = std_stream.try_clone().map_err(io)?;
        let stream = tokio::net::TcpStream::from_std(std_stream).map_err(io)?;
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(PinShared::default());
        shared.resp3.store(proto == Proto::Resp3, Ordering::Release);
        let relay = relay(
            rd,
            shared.clone(),
            tx,
            meter,
            settings.address.clone(),
            Watchdog {
                timeout: settings.command_timeout,
                pool: upstream.pool2.clone(),
            },
        );
        let retired = upstream.retired.clone();
        let watcher = shared.clone();
        let task = tokio::spawn(async move {
            tokio::pin!(relay);
            tokio::select! {
                back = &mut relay => return back,
                _ = retired.cancelled() => {
                    // The master is being replaced: nothing more may reach
                    // it. The relay sees the shutdown and reports the loss.
                    watcher.retired.store(true, Ordering::Release);
                    let _ = fence.shutdown(std::net::Shutdown::Both);
                }
            }
            relay.await;
            None
        });
        Ok(Pinned {
            wr: Some(wr),
            relay: Some(task),
            node: upstream.node.clone(),
            parked: upstream.parked.clone(),
            retired: upstream.retired.clone(),
            drain_on: None,
            skip_pending: false,
            single_use: false,
            shared,
            proto,
            _permit: permit,
        })
    }

    /// Run `f` once the last of the next `expect` replies (those of the
    /// next `send`) has arrived, before the client's writer gets it (with
    /// the next reply if `expect` is 0), or when the connection ends if it
    /// never arrives. Call before that `send`.
    pub fn on_reply(&self, expect: u64, f: Box<dyn FnOnce() + Send>) {
        let at = self.shared.sent.load(Ordering::Acquire) + expect;
        self.shared
            .after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(AfterReply(at, f));
        if self.shared.lost.load(Ordering::Acquire) {
            // The relay has ended (and run what it found): nothing will.
            self.shared.replied(u64::MAX);
        }
    }

    /// The next `send` is an (UN)SUBSCRIBE, or an EXEC that may run one,
    /// owing `n` replies: they may be subscribe confirmations (RESP2
    /// subscriber mode is read from them), or one error for all (Redis
    /// checks the channels against the ACL before it confirms any). With
    /// an `id`, `take_settled` reports it once its first reply is in.
    /// Call before that `send`.
    pub fn pubsub_next(&self, n: u64, id: Option<u64>) {
        self.shared.pubsub_next(n, id, false, 0);
    }

    /// The next `send` is an EXEC that runs queued (UN)SUBSCRIBEs (see
    /// `PubsubReq::exec`), settled under `id`. Call before that `send`.
    pub fn exec_pubsub_next(&self, extras: u64, id: u64) {
        self.shared.pubsub_next(1, Some(id), true, extras);
    }

    /// The requests (`pubsub_next` with an id) answered since the last
    /// call, in order:
    /// (id, refused by Redis).
    pub fn take_settled(&self) -> Vec<(u64, bool)> {
        std::mem::take(
            &mut *self
                .shared
                .settled
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Write requests owing `expect` replies.
    pub async fn send(&mut self, bytes: &[u8], expect: u64) -> Result<(), Error> {
        self.skip_pending = false;
        let sent = self.shared.sent.fetch_add(expect, Ordering::AcqRel);
        if expect == 0 {
            self.shared.silent_at.store(sent + 1, Ordering::Release);
        }
        if self.shared.outstanding.fetch_add(expect, Ordering::AcqRel) == 0 && expect > 0 {
            self.shared.progress_ms.store(now_ms(), Ordering::Release);
            self.shared.owed.notify_one();
        }
        let Some(wr) = self.wr.as_mut() else {
            return Err(Error::upstream(Kind::NotSent, "pinned connection closed"));
        };
        wr.write_all(bytes).await.map_err(|e| {
            Error::upstream(
                Kind::OutcomeUnknown,
                format!("pinned connection write failed: {e}"),
            )
        })
    }

    /// The session waits (or stops waiting) for every owed reply: see
    /// `PinShared::awaited`.
    pub fn set_awaited(&self, on: bool) {
        self.shared.awaited.store(on, Ordering::Release);
    }

    /// MONITOR is sent next (or queued in MULTI): from now on the lines
    /// it streams are told apart from replies.
    pub fn monitor_next(&self) {
        self.shared.monitor.store(true, Ordering::Release);
    }

    /// The next request sent is a blocking call that runs now (not queued
    /// in MULTI).
    pub fn blocking_next(&self) {
        let next = self.shared.sent.load(Ordering::Acquire) + 1;
        self.shared.blocking_at.store(next, Ordering::Release);
    }

    /// A blocking call's reply may still be owed.
    pub fn blocked(&self) -> bool {
        self.shared.before_reply(&self.shared.blocking_at)
    }

    /// The master this connection goes to has been replaced (or fenced):
    /// the connection is being shut down.
    pub fn retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// A CLIENT REPLY SKIP was sent and no request since.
    pub fn skip_pending(&self) -> bool {
        self.skip_pending
    }

    /// A CLIENT REPLY SKIP that Redis will apply was just sent.
    pub fn skip_next(&mut self) {
        self.skip_pending = true;
    }

    /// keyward answered the request a CLIENT REPLY SKIP applies to itself
    /// (AUTH, KEYWARD, RESET): Redis would silence the next request it gets
    /// instead, so spend its SKIP on a PING that owes nothing.
    pub async fn spend_skip(&mut self) -> Result<(), Error> {
        match self.skip_pending {
            true => self.send(b"*1\r\n$4\r\nPING\r\n", 0).await,
            false => Ok(()),
        }
    }

    /// Send RESET, whose reply the client must not see, before the
    /// connection is given up: once it is answered, everything sent before
    /// it has run.
    pub async fn send_reset_probe(&mut self) -> Result<(), Error> {
        self.shared.reset_probe.store(true, Ordering::Release);
        self.send(b"*1\r\n$5\r\nRESET\r\n", 1).await
    }

    /// Send a request of keyward's own whose reply the client must not see.
    pub async fn send_silent(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.send_swallowed(bytes, 1).await
    }

    /// Send requests of keyward's own owing `replies` replies the client
    /// must not see (re-subscribing on a new master).
    pub async fn send_swallowed(&mut self, bytes: &[u8], replies: u64) -> Result<(), Error> {
        let first = self.shared.sent.load(Ordering::Acquire) + 1;
        self.shared
            .swallow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(first..first + replies);
        self.send(bytes, replies).await
    }

    /// Carry subscriptions over any loss of the connection (Sentinel mode).
    pub fn set_carry_any_loss(&self, on: bool) {
        self.shared.carry_any_loss.store(on, Ordering::Release);
    }

    /// Whether the session will carry its subscriptions over a master change.
    pub fn set_resubscribe(&self, on: bool) {
        self.shared.resubscribe.store(on, Ordering::Release);
    }

    /// The connection ended without being released, and the loss was a
    /// master change the session said it would carry subscriptions over.
    pub fn carried_over(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire) && self.shared.carried.load(Ordering::Acquire)
    }

    /// Wait until the connection ends without being released.
    pub async fn wait_lost(&self) {
        loop {
            let notified = self.shared.lost_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.lost.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// No reply is owed, and every reply received has been handed to the
    /// client's writer (the relay counts a reply only after queueing it).
    pub fn idle(&self) -> bool {
        self.shared.outstanding.load(Ordering::Acquire) == 0
    }

    /// A request sent without a reply to come (under CLIENT REPLY OFF or
    /// SKIP) may not have run yet: no reply has arrived since it was sent.
    pub fn unconfirmed(&self) -> bool {
        self.shared.before_reply(&self.shared.silent_at)
            && !self.shared.lost.load(Ordering::Acquire)
    }

    /// Wait until no reply is owed (also once the connection has ended:
    /// nothing can be owed then).
    pub async fn wait_idle(&self) {
        self.shared.wait_idle().await
    }

    /// Give the connection up. Quiet, it is RESET and kept for the next
    /// client that needs one (see `parked`); otherwise it is closed: the
    /// upstream drops all of its state, and the relay ends once the
    /// upstream has closed its side.
    pub async fn release(mut self) {
        self.shared.releasing.store(true, Ordering::Release);
        let keep = self.parked.enabled()
            && self.idle()
            && !self.retired.is_cancelled()
            && !self.single_use;
        // Both are there until release or drop takes them.
        let halves = match keep {
            true => self.relay.take().zip(self.wr.take()),
            false => None,
        };
        if let Some((task, wr)) = halves {
            self.shared.park.notify_one();
            let (parked, node, proto) = (self.parked.clone(), self.node.clone(), self.proto);
            let resetting = parked.begin(proto);
            tokio::spawn(async move {
                if let Ok(Some((rd, buf))) = task.await {
                    if let (true, Ok(stream)) = (buf.is_empty(), rd.reunite(wr)) {
                        let s = &node.settings;
                        parked.reset_and_keep(stream, s, proto, resetting).await;
                    }
                }
            });
            return;
        }
        if let Some(wr) = self.wr.as_mut() {
            let _ = wr.shutdown().await;
        }
    }

    /// Close the connection when it is given back instead of keeping it for
    /// another client: Redis ties state to the connection's id that RESET
    /// does not clear (the keys CLIENT TRACKING recorded, whose
    /// invalidations would reach the next client), or the client learned
    /// that id (CLIENT ID, CLIENT INFO) and may have named it as another
    /// connection's tracking REDIRECT target, which must see the target
    /// go (`tracking-redir-broken`) rather than a stranger take its place.
    pub fn not_for_reuse(&mut self) {
        self.single_use = true;
    }

    /// The protocol the connection speaks now.
    pub fn speaks(&self) -> Proto {
        self.shared.proto()
    }

    /// Redis has answered a HELLO that switched the connection to `proto`
    /// (nothing owed): read its replies in that protocol from now on. The
    /// connection is not kept for another client after (it is kept by the
    /// protocol it was opened in).
    pub fn switch_proto(&mut self, proto: Proto) {
        self.shared
            .resp3
            .store(proto == Proto::Resp3, Ordering::Release);
        self.single_use = true;
    }

    /// Keep the connection through keyward's shutdown while replies are
    /// owed (see `Drop`).
    pub fn drain_on(&mut self, shutdown: CancellationToken) {
        self.drain_on = Some(shutdown);
    }
}

impl Drop for Pinned {
    /// Dropped because keyward is shutting down (its session was stopped)
    /// with replies still owed, say a BLPOP blocked when SIGTERM came: the
    /// connection stays open until they arrive, so the drain delivers
    /// them; the shutdown grace period bounds the wait. Dropped otherwise
    /// (the client left), the connection closes now and Redis forgets the
    /// client's state.
    fn drop(&mut self) {
        let Some(wr) = self.wr.take() else { return };
        let draining = self.drain_on.as_ref().is_some_and(|t| t.is_cancelled())
            && !self.shared.releasing.load(Ordering::Acquire)
            && self.shared.outstanding.load(Ordering::Acquire) > 0;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !draining {
            return;
        }
        let shared = self.shared.clone();
        runtime.spawn(async move {
            shared.wait_idle().await;
            // Closing is expected now: the relay ends without a loss.
            shared.releasing.store(true, Ordering::Release);
            drop(wr);
        });
    }
}

async fn relay(
    mut rd: OwnedReadHalf,
    shared: Arc<PinShared>,
    tx: mpsc::Sender<PinMsg>,
    meter: Arc<Meter>,
    address: String,
    watchdog: Watchdog,
) -> ReadBack {
    let _guard = PanicGuard(shared.clone());
    // Owed replies that make no progress for the command timeout (Redis
    // stopped, a lost network) fail the connection as on a shared one,
    // unless a blocking call is among them (it may wait for ever) or Redis
    // still answers a PING on the shared connection (a slow script, or a
    // reply keyward expected that Redis never sends: say one error for a
    // whole SUBSCRIBE refused): then the client keeps its connection, as
    // it would against Redis. The time left, or None while nothing is owed
    // or a blocking call is.
    let command_timeout = watchdog.timeout;
    let timeout_ms = command_timeout.as_millis() as u64;
    let time_left = |shared: &PinShared| {
        let watched = shared.outstanding.load(Ordering::Acquire) > 0
            && !shared.before_reply(&shared.blocking_at);
        let since = now_ms().saturating_sub(shared.progress_ms.load(Ordering::Acquire));
        watched.then(|| timeout_ms.saturating_sub(since))
    };
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut scanner = Scanner::new();
    // Replies received, counted from the start (see `PinShared::sent`).
    let mut received = 0u64;
    // Subscriptions (channels and patterns; shard channels) Redis reported.
    let mut counts = [0i64; 2];
    // Frames still to come of an EXEC's output past its array (see
    // `PubsubReq::extras`).
    let mut uncounted = 0u64;
    let error = loop {
        crate::resp::release_if_large(&mut buf, 8 * 1024);
        crate::resp::make_room(&mut buf, scanner.need(), 8 * 1024);
        let left = time_left(&shared);
        let timer = async {
            match left {
                Some(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms + 1)).await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            // Owed replies from none: the watchdog's time starts.
            _ = shared.owed.notified() => continue,
            _ = timer => {
                if time_left(&shared).is_none_or(|ms| ms > 0) {
                    continue;
                }
                if watchdog.node_answers().await {
                    if shared.awaited.load(Ordering::Acquire) {
                        // Redis answers others but not these, and the
                        // client is stuck behind them (a silenced refusal
                        // keyward counted as replies to come, say): fail
                        // them, as a lost connection does.
                        break Error::upstream(
                            Kind::OutcomeUnknown,
                            format!(
                                "{address}: replies owed for {} ms (upstream.command_timeout_ms) that Redis, answering others, did not send",
                                command_timeout.as_millis()
                            ),
                        );
                    }
                    shared.progress_ms.store(now_ms(), Ordering::Release);
                    continue;
                }
                break Error::upstream(
                    Kind::Timeout,
                    format!(
                        "{address}: no reply for {} ms (upstream.command_timeout_ms)",
                        command_timeout.as_millis()
                    ),
                );
            }
            _ = shared.park.notified() => {
                // Released to be kept: hand the read half back if nothing
                // is owed or half-read (else dropping it closes the socket).
                shared.replied(u64::MAX);
                shared.outstanding.store(0, Ordering::Release);
                shared.idle.notify_waiters();
                let quiet = buf.is_empty() && shared.swallowing() == 0;
                return quiet.then_some((rd, buf));
            }
        };
        match read {
            Ok(0) => {
                break Error::upstream(
                    Kind::OutcomeUnknown,
                    format!("{address}: connection closed by upstream"),
                )
            }
            Err(e) => {
                break Error::upstream(Kind::OutcomeUnknown, format!("{address}: read failed: {e}"))
            }
            Ok(_) => shared.progress_ms.store(now_ms(), Ordering::Release),
        }
        let mut start = 0;
        let mut bad = None;
        let mut answered = 0u64;
        // Switched only while nothing is owed: never within one read.
        let proto = shared.proto();
        // Frames to leave out of the relay (swallowed replies), as ranges.
        let mut cut: SmallVec<[(usize, usize); 2]> = SmallVec::new();
        loop {
            match scanner.next(&buf) {
                Ok(Some(end)) => {
                    if uncounted > 0 {
                        // More confirmations of a queued (UN)SUBSCRIBE (or
                        // the elements they pushed out of EXEC's array).
                        uncounted -= 1;
                        if proto == Proto::Resp2 {
                            if let Some(c) = confirmation(&buf[start..end]) {
                                shared.confirmed(&mut counts, c);
                            }
                        }
                    } else if answers_request(
                        &buf[start..end],
                        proto,
                        shared.subscribed.load(Ordering::Relaxed),
                    ) && !(shared.monitor.load(Ordering::Relaxed)
                        && monitor_line(&buf[start..end]))
                    {
                        let number = received + answered + 1;
                        let a = shared.answers(number, &buf[start..end]);
                        answered += a.replies;
                        uncounted += a.extras;
                        // keyward's RESET probe is found by its reply, not
                        // its number: a reply keyward did not count (a
                        // confirmation an EXEC sends under CLIENT REPLY OFF)
                        // may come before it. The client's RESET never
                        // reaches Redis, so "+RESET" is the probe's.
                        let probe = &buf[start..end] == b"+RESET\r\n"
                            && shared.reset_probe.swap(false, Ordering::AcqRel);
                        if probe || shared.swallows(received + answered) {
                            cut.push((start, end));
                        }
                        // RESP2 subscriber mode, from Redis's own counts in
                        // its (un)subscribe confirmations, in wire order.
                        // (Also inside EXEC's array: a SUBSCRIBE queued in
                        // MULTI subscribes when EXEC runs, wherever it was
                        // queued.)
                        // Only arrays count: a bulk string holding such
                        // bytes is a value, not a confirmation.
                        // And only replies to (UN)SUBSCRIBEs and to an EXEC
                        // that ran some: a script's reply may look the same.
                        let frame = &buf[start..end];
                        let array =
                            proto == Proto::Resp2 && frame.first() == Some(&b'*') && a.pubsub;
                        let exec = array
                            && (a.exec
                                || elements(frame)
                                    .next()
                                    .is_some_and(|e| e.first() == Some(&b'*')));
                        let confirmations = std::iter::once(frame)
                            .filter(|_| array && !exec)
                            .chain(elements(frame).filter(|_| exec))
                            .filter_map(confirmation);
                        for c in confirmations {
                            shared.confirmed(&mut counts, c);
                        }
                    }
                    start = end;
                }
                Ok(None) => break,
                Err(e) => {
                    bad = Some(Error::upstream(Kind::Protocol, format!("{address}: {e}")));
                    break;
                }
            }
        }
        if answered > 0 {
            received += answered;
            shared.replied(received);
        }
        if start > 0 {
            let data = buf.split_to(start).freeze();
            scanner.consumed(start);
            let mut pieces: SmallVec<[Bytes; 2]> = SmallVec::new();
            let mut from = 0;
            for (a, b) in cut.drain(..) {
                if a > from {
                    pieces.push(data.slice(from..a));
                }
                from = b;
            }
            if from < data.len() {
                pieces.push(data.slice(from..));
            }
            for piece in pieces {
                meter.add(piece.len());
                if tx.send(PinMsg::Data(piece)).await.is_err() {
                    return None;
                }
            }
        }
        if answered > 0 {
            // Counted only after the replies are queued for the client, so a
            // session that sees zero owed can queue its own reply after them.
            // Saturating: frames arriving when nothing is owed are pushes.
            let left = shared
                .outstanding
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(answered))
                })
                .map(|prev| prev.saturating_sub(answered))
                .unwrap_or(0);
            if left == 0 {
                shared.idle.notify_waiters();
            }
        }
        if let Some(e) = bad {
            break e;
        }
    };
    // Replies owed to the client, not counting keyward's own swallowed
    // ones (a re-subscription still unanswered when this connection died
    // too, e.g. a master lost right after the carry-over): those are
    // carried again, and the client is owed no error for them.
    let owed = shared
        .outstanding
        .load(Ordering::Acquire)
        .saturating_sub(shared.take_swallowing());
    let carried = (shared.retired.load(Ordering::Acquire)
        || shared.carry_any_loss.load(Ordering::Acquire))
        && shared.resubscribe.load(Ordering::Acquire)
        && owed == 0;
    shared.carried.store(carried, Ordering::Release);
    // Writes whose replies will never come may have run all the same.
    shared.replied(u64::MAX);
    if !shared.releasing.load(Ordering::Acquire) && !carried {
        shared.outstanding.store(0, Ordering::Release);
        let _ = tx
            .send(PinMsg::Lost {
                error,
                outstanding: owed,
            })
            .await;
    }
    shared.outstanding.store(0, Ordering::Release);
    shared.idle.notify_waiters();
    if !shared.releasing.load(Ordering::Acquire) {
        shared.lost.store(true, Ordering::Release);
        // An action queued after the first run and before `lost` was set.
        shared.replied(u64::MAX);
        shared.lost_notify.notify_waiters();
    }
    None
}

/// Should the relay panic (a bug), the session must not wait for ever on a
/// connection nobody reads: it is reported lost, and the client closed.
struct PanicGuard(Arc<PinShared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let shared = &self.0;
            shared.outstanding.store(0, Ordering::Release);
            shared.idle.notify_waiters();
            shared.lost.store(true, Ordering::Release);
            shared.lost_notify.notify_waiters();
        }
    }
}

/// The relay's check for a hung upstream.
struct Watchdog {
    timeout: std::time::Duration,
    /// The shared connection to the same node, to ask whether it answers.
    pool: Arc<super::pool::Pool>,
}

impl Watchdog {
    /// Does the node answer a PING within the command timeout?
    async fn node_answers(&self) -> bool {
        let Ok(rx) = self.pool.send(0, b"*1\r\n$4\r\nPING\r\n", 1, None) else {
            return false;
        };
        matches!(tokio::time::timeout(self.timeout, rx).await, Ok(Ok(Ok(_))))
    }
}

/// Does this frame answer a request (as opposed to a push)?
fn answers_request(frame: &[u8], proto: Proto, subscribed: bool) -> bool {
    match frame.first() {
        // RESP3 pushes: only the (un)subscribe confirmations answer requests.
        Some(b'>') => matches!(
            first_element(frame)
                .map(|n| n.to_ascii_lowercase())
                .as_deref(),
            Some(
                b"subscribe"
                    | b"unsubscribe"
                    | b"psubscribe"
                    | b"punsubscribe"
                    | b"ssubscribe"
                    | b"sunsubscribe"
            )
        ),
        Some(b'*') if subscribed && proto == Proto::Resp2 => !matches!(
            first_element(frame)
                .map(|n| n.to_ascii_lowercase())
                .as_deref(),
            Some(b"message" | b"pmessage" | b"smessage")
        ),
        _ => true,
    }
}

/// A MONITOR line: `+<seconds>.<micros> [<db> <client>] "cmd" ...`. No
/// reply a monitoring client can get (to PING, AUTH, HELLO, CLIENT, RESET,
/// QUIT) starts with digits and a dot.
fn monitor_line(frame: &[u8]) -> bool {
    let Some(rest) = frame.strip_prefix(b"+") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = &rest[digits..];
    let Some(rest) = rest.strip_prefix(b".") else {
        return false;
    };
    let micros = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && micros > 0 && rest[micros..].starts_with(b" [")
}

/// An (un)subscribe confirmation's kind (true: shard channels) and the
/// subscription count it reports.
fn confirmation(frame: &[u8]) -> Option<(bool, i64)> {
    if frame.first() != Some(&b'*') {
        return None;
    }
    let mut e = elements(frame);
    let name = string_of(e.next()?)?;
    // Every RESP2 array reply on a dedicated connection comes here: compare
    // in place rather than lower-case a copy.
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let shard =
        if is(b"subscribe") || is(b"unsubscribe") || is(b"psubscribe") || is(b"punsubscribe") {
            false
        } else if is(b"ssubscribe") || is(b"sunsubscribe") {
            true
        } else {
            return None;
        };
    let count = e.nth(1)?;
    let n = count.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    Some((shard, crate::resp::scan::parse_int(n)?))
}

/// The first element of an aggregate frame, if it is a bulk or simple string.
fn first_element(frame: &[u8]) -> Option<&[u8]> {
    elements(frame).next().and_then(string_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_run_once_their_reply_arrived() {
        use std::sync::atomic::AtomicUsize;
        let shared = PinShared::default();
        let ran = Arc::new(AtomicUsize::new(0));
        // Actions waiting for replies 2, 3 and 5 (as `on_reply` queues them).
        for (at, bit) in [(2u64, 1usize), (3, 2), (5, 4)] {
            let ran = ran.clone();
            shared.after.lock().unwrap().push_back(AfterReply(
                at,
                Box::new(move || {
                    ran.fetch_or(bit, Ordering::Relaxed);
                }),
            ));
        }
        shared.replied(1);
        assert_eq!(ran.load(Ordering::Relaxed), 0, "no reply it waits for yet");
        shared.replied(3);
        assert_eq!(ran.load(Ordering::Relaxed), 1 | 2);
        shared.replied(4);
        assert_eq!(ran.load(Ordering::Relaxed), 1 | 2);
        // The connection ended: what still waits runs (the write may have run).
        shared.replied(u64::MAX);
        assert_eq!(ran.load(Ordering::Relaxed), 1 | 2 | 4);
        assert!(shared.after.lock().unwrap().is_empty());
    }

    #[test]
    fn pubsub_replies_are_told_apart_and_a_refusal_stands_for_all() {
        let shared = PinShared::default();
        // As the session queues them: `sent` is the number of the reply
        // before each request's first.
        let push = |first: u64, last: u64, id, exec, extras| {
            shared.sent.store(first - 1, Ordering::Release);
            shared.pubsub_next(last - first + 1, id, exec, extras);
        };
        let answer = |replies, pubsub, exec, extras| Answer {
            replies,
            pubsub,
            exec,
            extras,
        };
        // 1: GET; 2-3: SUBSCRIBE a b (id 7); 4-5: SUBSCRIBE c d (id 8),
        // refused; 6: EVAL; 7: EXEC of SUBSCRIBE e f (id 9), ran; 8: EXEC
        // of another (id 10), its WATCH failed; 9: one refused (id 11).
        push(2, 3, Some(7), false, 0);
        push(4, 5, Some(8), false, 0);
        push(7, 7, Some(9), true, 1);
        push(8, 8, Some(10), true, 1);
        push(9, 9, Some(11), true, 0);
        let conf = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n";
        assert_eq!(shared.answers(1, conf), answer(1, false, false, 0));
        assert_eq!(shared.answers(2, conf), answer(1, true, false, 0));
        assert_eq!(shared.answers(3, conf), answer(1, true, false, 0));
        assert_eq!(
            shared.answers(4, b"-NOPERM no\r\n"),
            answer(2, true, false, 0)
        );
        assert_eq!(shared.answers(6, conf), answer(1, false, false, 0));
        let exec = b"*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\ne\r\n:1\r\n";
        assert_eq!(shared.answers(7, exec), answer(1, true, true, 1));
        assert_eq!(shared.answers(8, b"*-1\r\n"), answer(1, true, true, 0));
        assert_eq!(
            shared.answers(9, b"-EXECABORT no\r\n"),
            answer(1, true, true, 0)
        );
        assert_eq!(
            *shared.settled.lock().unwrap(),
            vec![(7, false), (8, true), (9, false), (10, true), (11, true)]
        );
        assert!(!shared.pubsub_any.load(Ordering::Acquire));
    }

    #[test]
    fn monitor_lines_are_not_replies() {
        assert!(monitor_line(
            b"+1700000000.123456 [0 127.0.0.1:5000] \"SET\" \"k\" \"v\"\r\n"
        ));
        assert!(monitor_line(b"+1.2 [0 lua] \"GET\" \"k\"\r\n"));
        for reply in [
            &b"+OK\r\n"[..],
            b"+PONG\r\n",
            b"+RESET\r\n",
            b"+1.5\r\n",
            b"$5\r\n1.2 [\r\n",
            b"+12 [x]\r\n",
        ] {
            assert!(!monitor_line(reply), "{}", String::from_utf8_lossy(reply));
        }
    }

    #[test]
    fn subscription_confirmations() {
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:2\r\n";
        let sunsub = b"*3\r\n$12\r\nsunsubscribe\r\n$1\r\ns\r\n:0\r\n";
        let msg = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n";
        assert_eq!(confirmation(sub), Some((false, 2)));
        assert_eq!(confirmation(sunsub), Some((true, 0)));
        assert_eq!(confirmation(msg), None);
        assert_eq!(confirmation(b"+OK\r\n"), None);
        // A value that holds a confirmation's bytes is not one.
        let value = [format!("${}\r\n", sub.len()).as_bytes(), sub, b"\r\n"].concat();
        assert_eq!(confirmation(&value), None);
        // EXEC's reply holding a SUBSCRIBE's confirmation.
        let exec = [&b"*1\r\n"[..], sub].concat();
        assert_eq!(confirmation(&exec), None);
        assert_eq!(elements(&exec).find_map(confirmation), Some((false, 2)));
    }

    #[test]
    fn pushes_and_replies() {
        let msg2 = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n";
        let sub2 = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n";
        let msg3 = b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n";
        let sub3 = b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n";
        assert!(!answers_request(msg2, Proto::Resp2, true));
        assert!(answers_request(msg2, Proto::Resp2, false));
        assert!(answers_request(sub2, Proto::Resp2, true));
        assert!(!answers_request(msg3, Proto::Resp3, true));
        assert!(answers_request(sub3, Proto::Resp3, true));
        assert!(answers_request(b"+OK\r\n", Proto::Resp3, true));
    }
}

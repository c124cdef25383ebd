//! One shared, pipelined upstream connection.
//!
//! Many clients hand it batches of requests. `send` appends the bytes to a
//! write buffer and a waiter to a FIFO under one short std mutex (never held
//! across an await); the writer task swaps the buffer out and writes all that
//! piled up in one syscall, so requests from many clients are coalesced into
//! one upstream write. The reader task scans reply frames and hands each
//! waiter its replies as one zero-copy `Bytes` slice of the read buffer, in
//! FIFO order, which is the order Redis answers in.
//!
//! When the connection dies every waiter is failed exactly once, by the
//! reader: replies already complete are delivered, requests whose bytes were
//! never written are marked not sent, and the rest have an unknown outcome.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::meter::Meter;
use crate::error::{Error, Kind};
use crate::resp::Scanner;

/// The outcome of one batch.
pub type BatchResult = Result<Replies, BatchError>;

/// The replies to a whole batch.
#[derive(Debug, Default)]
pub struct Replies {
    pub bytes: Bytes,
    /// Indexes (in the batch) of the requests Redis answered with an error,
    /// for the request metrics; empty (and unallocated) as a rule.
    pub errors: Vec<u32>,
}

/// A batch that did not complete.
#[derive(Debug)]
pub struct BatchError {
    /// Complete replies for the first `done` requests of the batch.
    pub delivered: Bytes,
    pub done: u32,
    /// False when no byte of the batch reached the upstream.
    pub sent: bool,
    pub error: Error,
}

struct Waiter {
    seq: u64,
    count: u32,
    tx: oneshot::Sender<BatchResult>,
    meter: Option<Arc<Meter>>,
    /// The client went over its output limit: drop its replies.
    discard: bool,
}

struct Queue {
    wbuf: BytesMut,
    waiters: VecDeque<Waiter>,
    next_seq: u64,
    /// Waiters with `seq` below this had their bytes taken by the writer.
    written_below: u64,
    closed: Option<Error>,
}

/// A live shared connection.
pub struct Conn {
    pub id: u64,
    pub address: String,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Set when the connection is finished (checked on every send).
    closed: AtomicBool,
    /// Cancelled when the connection is finished, for the maintainer.
    done: CancellationToken,
    /// The reader and writer tasks, aborted by `fail`.
    tasks: OnceLock<[AbortHandle; 2]>,
    /// Requests sent and not yet answered (for the stall detector and gauges).
    pending: AtomicUsize,
    /// Milliseconds since `epoch` of the last reply or of the queue becoming
    /// non-empty; a connection with pending requests and no progress for the
    /// command timeout is stalled.
    progress_ms: AtomicU64,
    epoch: Instant,
    max_inflight: usize,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Conn {
    /// Take over a connected, handshaken stream and start its tasks.
    pub fn start(
        stream: TcpStream,
        address: String,
        max_inflight: usize,
        fenced: Arc<AtomicBool>,
    ) -> Arc<Conn> {
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(Conn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            address,
            queue: Mutex::new(Queue {
                wbuf: BytesMut::with_capacity(16 * 1024),
                waiters: VecDeque::new(),
                next_seq: 0,
                written_below: 0,
                closed: None,
            }),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            done: CancellationToken::new(),
            tasks: OnceLock::new(),
            pending: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            max_inflight,
        });
        let w = tokio::spawn(write_loop(conn.clone(), wr, fenced));
        let r = tokio::spawn(read_loop(conn.clone(), rd));
        let _ = conn.tasks.set([r.abort_handle(), w.abort_handle()]);
        if conn.is_closed() {
            conn.abort();
        }
        conn
    }

    /// Queue `count` requests held in `bytes`; the receiver gets their replies.
    pub fn send(
        &self,
        bytes: &[u8],
        count: u32,
        meter: Option<Arc<Meter>>,
    ) -> Result<oneshot::Receiver<BatchResult>, Error> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &q.closed {
                return Err(Error::upstream(Kind::NotSent, e.detail.clone()));
            }
            // Counted in requests, as the setting says; a batch larger than
            // the whole bound still goes out alone.
            let inflight = self.pending.load(Ordering::Relaxed);
            if inflight > 0 && inflight + count as usize > self.max_inflight {
                crate::metrics::Limit::MaxInflight.reached();
                return Err(Error::upstream(
                    Kind::Limit,
                    format!(
                        "upstream {} has {} requests in flight (upstream.max_inflight)",
                        self.address, self.max_inflight
                    ),
                ));
            }
            let seq = q.next_seq;
            q.next_seq += 1;
            q.wbuf.extend_from_slice(bytes);
            q.waiters.push_back(Waiter {
                seq,
                count,
                tx,
                meter,
                discard: false,
            });
        }
        if self.pending.fetch_add(count as usize, Ordering::Relaxed) == 0 {
            self.touch();
        }
        self.wake.notify_one();
        Ok(rx)
    }

    fn touch(&self) {
        self.progress_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Is the connection finished?
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn abort(&self) {
        if let Some(tasks) = self.tasks.get() {
            for t in tasks {
                t.abort();
            }
        }
    }

    /// Resolves when the connection is finished.
    pub async fn closed(&self) {
        self.done.cancelled().await
    }

    /// Let the writer run now (after a fence, to withdraw unwritten requests).
    pub fn wake_writer(&self) {
        self.wake.notify_one();
    }

    /// Requests waiting for replies.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// How long requests have waited without any reply arriving.
    pub fn stalled_for(&self) -> std::time::Duration {
        if self.pending() == 0 {
            return std::time::Duration::ZERO;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.progress_ms.load(Ordering::Relaxed)),
        )
    }

    /// Close the connection; every waiter is failed with `error` (by the
    /// reader's drop guard, exactly once).
    pub fn fail(&self, error: Error) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed.is_none() {
                q.closed = Some(error);
            }
        }
        self.closed.store(true, Ordering::Release);
        self.done.cancel();
        self.abort();
    }
}

async fn write_loop(conn: Arc<Conn>, mut wr: OwnedWriteHalf, fenced: Arc<AtomicBool>) {
    let mut spare = BytesMut::with_capacity(16 * 1024);
    loop {
        conn.wake.notified().await;
        let mut out = {
            let mut q = conn.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed.is_some() {
                return;
            }
            if q.wbuf.is_empty() {
                continue;
            }
            if fenced.load(Ordering::Acquire) {
                // The node failed over (or is about to): nothing more may
                // reach it. Requests queued but not written fail as not
                // sent (safe to retry elsewhere); those already written are
                // still answered through the reader.
                let first_unsent = q.waiters.partition_point(|w| w.seq < q.written_below);
                let unsent: Vec<Waiter> = q.waiters.drain(first_unsent..).collect();
                q.wbuf.clear();
                drop(q);
                let error = Error::upstream(
                    Kind::NotSent,
                    format!("{}: master is being replaced (fenced)", conn.address),
                );
                for w in unsent {
                    conn.pending.fetch_sub(w.count as usize, Ordering::Relaxed);
                    let _ = w.tx.send(Err(BatchError {
                        delivered: Bytes::new(),
                        done: 0,
                        sent: false,
                        error: error.clone(),
                    }));
                }
                continue;
            }
            q.written_below = q.next_seq;
            std::mem::replace(&mut q.wbuf, spare)
        };
        if let Err(e) = wr.write_all(&out).await {
            conn.fail(Error::upstream(
                Kind::OutcomeUnknown,
                format!("{}: write failed: {e}", conn.address),
            ));
            return;
        }
        out.clear();
        // Keep a normal-sized buffer; a 64 MiB request should not pin 64 MiB.
        spare = if out.capacity() > 1024 * 1024 {
            BytesMut::with_capacity(16 * 1024)
        } else {
            out
        };
    }
}

/// Reply bytes a batch may accumulate before they are charged to the
/// client's output meter.
const CHARGE_STEP: usize = 64 * 1024;

/// The reader's state. Its `Drop` fails every waiter still queued, so the
/// waiters are answered exactly once however the reader ends: an I/O error,
/// a protocol error, or `fail` aborting the task.
struct ReadState {
    conn: Arc<Conn>,
    buf: BytesMut,
    scanner: Scanner,
    /// Waiters moved out of the shared queue, so the lock is taken once per
    /// read rather than once per reply.
    local: VecDeque<Waiter>,
    /// Complete replies received for the front waiter.
    frames: u32,
    /// Bytes of the front waiter's complete replies charged to its meter.
    charged: usize,
    /// Which of the front waiter's replies are errors.
    errors: Vec<u32>,
}

async fn read_loop(conn: Arc<Conn>, mut rd: OwnedReadHalf) {
    let mut st = ReadState {
        conn,
        buf: BytesMut::with_capacity(16 * 1024),
        scanner: Scanner::new(),
        local: VecDeque::new(),
        frames: 0,
        charged: 0,
        errors: Vec::new(),
    };
    let error = loop {
        crate::resp::make_room(&mut st.buf, st.scanner.need(), 8 * 1024);
        match rd.read_buf(&mut st.buf).await {
            Ok(0) => break format!("{}: connection closed by upstream", st.conn.address),
            Err(e) => break format!("{}: read failed: {e}", st.conn.address),
            Ok(_) => {}
        }
        if let Err(e) = st.deliver() {
            break e;
        }
        // One large reply (LRANGE of a big list) must not pin its size.
        crate::resp::release_if_large(&mut st.buf, 16 * 1024);
    };
    st.conn.fail(Error::upstream(Kind::OutcomeUnknown, error));
}

impl ReadState {
    /// Hand every complete batch of replies to its waiter.
    fn deliver(&mut self) -> Result<(), String> {
        let mut delivered = 0usize;
        loop {
            let start = self.scanner.frame_start();
            match self.scanner.next(&self.buf) {
                Ok(Some(_)) if self.buf[start] == b'>' => {
                    // A RESP3 push answers no request (DEBUG PROTOCOL push,
                    // tracking redirected here by some client): counted as
                    // a reply, it would shift every later one. Cut it out.
                    let end = self.scanner.frame_start();
                    let len = self.buf.len();
                    self.buf.copy_within(end..len, start);
                    self.buf.truncate(len - (end - start));
                    self.scanner.consumed(end - start);
                    continue;
                }
                Ok(Some(_)) => {
                    if matches!(self.buf[start], b'-' | b'!') {
                        self.errors.push(self.frames);
                    }
                    self.frames += 1
                }
                Ok(None) => break,
                Err(e) => return Err(format!("{}: {e}", self.conn.address)),
            }
            if self.local.is_empty() {
                // Only written requests can be answered; unwritten ones stay
                // in the shared queue, where a fence can still withdraw them.
                let mut q = self.conn.queue.lock().unwrap_or_else(|e| e.into_inner());
                let written = q.waiters.partition_point(|w| w.seq < q.written_below);
                self.local.extend(q.waiters.drain(..written));
            }
            let Some(front) = self.local.front_mut() else {
                return Err(format!("{}: reply with no request", self.conn.address));
            };
            // Charge each reply to its client as it completes, so a client
            // that stopped reading is cut off mid-batch, and once it is,
            // drop its replies instead of buffering them.
            let end = self.scanner.frame_start();
            // Charged in steps of CHARGE_STEP (and at the end of the batch)
            // so the common small batch costs one atomic add.
            let last = self.frames == front.count;
            if let Some(m) = &front.meter {
                if last || end - self.charged >= CHARGE_STEP {
                    m.add(end - self.charged);
                    self.charged = end;
                    if m.is_killed() {
                        front.discard = true;
                    }
                }
            }
            if front.discard {
                self.buf.advance(end);
                self.scanner.consumed(end);
                self.charged = 0;
            }
            if self.frames == front.count {
                let w = self.local.pop_front().expect("front exists");
                self.frames = 0;
                self.charged = 0;
                let errors = std::mem::take(&mut self.errors);
                delivered += w.count as usize;
                if !w.discard {
                    let end = self.scanner.frame_start();
                    let bytes = self.buf.split_to(end).freeze();
                    self.scanner.consumed(end);
                    let _ = w.tx.send(Ok(Replies { bytes, errors }));
                }
            }
        }
        if delivered > 0 {
            self.conn.pending.fetch_sub(delivered, Ordering::Relaxed);
            self.conn.touch();
        }
        Ok(())
    }
}

impl Drop for ReadState {
    fn drop(&mut self) {
        let (error, rest, written_below) = {
            let mut q = self.conn.queue.lock().unwrap_or_else(|e| e.into_inner());
            let error = q.closed.clone().unwrap_or_else(|| {
                Error::upstream(
                    Kind::OutcomeUnknown,
                    format!("{}: connection closed", self.conn.address),
                )
            });
            if q.closed.is_none() {
                q.closed = Some(error.clone());
            }
            (error, std::mem::take(&mut q.waiters), q.written_below)
        };
        self.conn.closed.store(true, Ordering::Release);
        self.conn.done.cancel();
        let mut first = true;
        for w in self.local.drain(..).chain(rest) {
            let sent = w.seq < written_below;
            let (delivered, done) = if first && self.frames > 0 && !w.discard {
                let end = self.scanner.frame_start();
                (self.buf.split_to(end).freeze(), self.frames)
            } else {
                (Bytes::new(), 0)
            };
            first = false;
            let kind = if sent {
                Kind::OutcomeUnknown
            } else {
                Kind::NotSent
            };
            let _ = w.tx.send(Err(BatchError {
                delivered,
                done,
                sent,
                error: Error::upstream(kind, error.detail.clone()),
            }));
        }
        self.conn.pending.store(0, Ordering::Relaxed);
    }
}

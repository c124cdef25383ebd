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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::meter::Meter;
use crate::error::{Error, Kind};
use crate::resp::Scanner;

/// The outcome of one batch.
pub type BatchResult = Result<Bytes, BatchError>;

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
    /// Cancelled when the connection is finished; both tasks watch it.
    done: CancellationToken,
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
    pub fn start(stream: TcpStream, address: String, max_inflight: usize) -> Arc<Conn> {
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
            done: CancellationToken::new(),
            pending: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            max_inflight,
        });
        tokio::spawn(write_loop(conn.clone(), wr));
        tokio::spawn(read_loop(conn.clone(), rd));
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
            if q.waiters.len() >= self.max_inflight {
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
    pub fn is_closed(&self) -> bool {
        self.done.is_cancelled()
    }

    /// Resolves when the connection is finished.
    pub async fn closed(&self) {
        self.done.cancelled().await
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

    /// Close the connection; the reader fails every waiter with `error`.
    pub fn fail(&self, error: Error) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed.is_none() {
                q.closed = Some(error);
            }
        }
        self.done.cancel();
    }
}

async fn write_loop(conn: Arc<Conn>, mut wr: OwnedWriteHalf) {
    let mut spare = BytesMut::with_capacity(16 * 1024);
    loop {
        tokio::select! {
            biased;
            _ = conn.done.cancelled() => return,
            _ = conn.wake.notified() => {}
        }
        let mut out = {
            let mut q = conn.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.wbuf.is_empty() {
                continue;
            }
            q.written_below = q.next_seq;
            std::mem::replace(&mut q.wbuf, spare)
        };
        let res = tokio::select! {
            biased;
            _ = conn.done.cancelled() => return,
            r = wr.write_all(&out) => r,
        };
        if let Err(e) = res {
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

async fn read_loop(conn: Arc<Conn>, mut rd: OwnedReadHalf) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = Scanner::new();
    // Waiters moved out of the shared queue, so the lock is taken once per
    // read rather than once per reply.
    let mut local: VecDeque<Waiter> = VecDeque::new();
    let mut frames: u32 = 0;
    // Bytes of the front waiter's complete replies already charged to its meter.
    let mut charged = 0usize;
    let error = 'run: loop {
        let want = scanner.need().saturating_sub(buf.len()).max(8 * 1024);
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        let n = tokio::select! {
            biased;
            _ = conn.done.cancelled() => break 'run None,
            r = rd.read_buf(&mut buf) => r,
        };
        match n {
            Ok(0) => {
                break Some(Error::upstream(
                    Kind::OutcomeUnknown,
                    format!("{}: connection closed by upstream", conn.address),
                ))
            }
            Err(e) => {
                break Some(Error::upstream(
                    Kind::OutcomeUnknown,
                    format!("{}: read failed: {e}", conn.address),
                ))
            }
            Ok(_) => {}
        }
        let mut delivered = 0usize;
        loop {
            match scanner.next(&buf) {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(e) => {
                    break 'run Some(Error::upstream(
                        Kind::Protocol,
                        format!("{}: {e}", conn.address),
                    ))
                }
            }
            if local.is_empty() {
                let mut q = conn.queue.lock().unwrap_or_else(|e| e.into_inner());
                local.extend(q.waiters.drain(..));
            }
            let Some(front) = local.front_mut() else {
                break 'run Some(Error::upstream(
                    Kind::Protocol,
                    format!("{}: reply with no request", conn.address),
                ));
            };
            // Charge each reply to its client as it completes, so a client
            // that stopped reading is cut off mid-batch, and once it is,
            // drop its replies instead of buffering them.
            let end = scanner.frame_start();
            if let Some(m) = &front.meter {
                m.add(end - charged);
                if m.over.is_cancelled() {
                    front.discard = true;
                }
            }
            charged = end;
            if front.discard {
                buf.advance(end);
                scanner.consumed(end);
                charged = 0;
            }
            if frames == front.count {
                let w = local.pop_front().expect("front exists");
                frames = 0;
                delivered += w.count as usize;
                if !w.discard {
                    let data = buf.split_to(end).freeze();
                    scanner.consumed(end);
                    let _ = w.tx.send(Ok(data));
                }
                charged = 0;
            }
        }
        if delivered > 0 {
            conn.pending.fetch_sub(delivered, Ordering::Relaxed);
            conn.touch();
        }
    };
    // Fail everything still waiting, exactly once.
    let (error, rest, written_below) = {
        let mut q = conn.queue.lock().unwrap_or_else(|e| e.into_inner());
        let error = error.or_else(|| q.closed.clone()).unwrap_or_else(|| {
            Error::upstream(
                Kind::OutcomeUnknown,
                format!("{}: connection closed", conn.address),
            )
        });
        if q.closed.is_none() {
            q.closed = Some(error.clone());
        }
        (error, std::mem::take(&mut q.waiters), q.written_below)
    };
    conn.done.cancel();
    let mut first = true;
    for w in local.into_iter().chain(rest) {
        let sent = w.seq < written_below;
        let (delivered, done) = if first && frames > 0 {
            let end = scanner.frame_start();
            (buf.split_to(end).freeze(), frames)
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
    conn.pending.store(0, Ordering::Relaxed);
}

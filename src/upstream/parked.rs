//! Dedicated connections kept for reuse.
//!
//! A client that ends its state (EXEC, the last UNSUBSCRIBE, SELECT 0)
//! gives its dedicated connection back. Instead of closing it, keyward
//! sends `RESET` (which drops everything the client left on it: database,
//! name, tracking, protocol, authentication) and the handshake again, and
//! keeps it here for the next client that needs one: a transaction then
//! costs no TCP connect and leaves no TIME_WAIT socket behind. At most
//! `upstream.max_idle_pinned` wait here (per generation); one more is
//! closed. A connection kept longer than `MAX_AGE`, or that Redis closed
//! meanwhile, is not handed out. Redis before 6.2 has no RESET: there the
//! first failure turns reuse off.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::connector::{self, Settings};
use crate::error::{Error, Kind};
use crate::metrics::Limit;
use crate::resp::{Proto, Scanner};

/// A connection kept longer than this is closed rather than handed out
/// (a Redis `timeout`, or a middlebox, may have dropped it).
const MAX_AGE: Duration = Duration::from_secs(30);

pub struct Parked {
    max: usize,
    conns: Mutex<Vec<(Proto, TcpStream, Instant)>>,
    /// RESET failed once (Redis before 6.2): no more reuse.
    unsupported: AtomicBool,
    /// Connections being reset, by protocol (`Resetting` guards).
    resetting: [AtomicUsize; 2],
    /// Notified when a reset ends (kept or not).
    reset_done: Notify,
}

/// A connection being reset for `Parked`; counted until dropped.
pub struct Resetting {
    parked: Arc<Parked>,
    proto: Proto,
}

impl Drop for Resetting {
    fn drop(&mut self) {
        self.parked.resetting[slot(self.proto)].fetch_sub(1, Ordering::AcqRel);
        self.parked.reset_done.notify_waiters();
    }
}

fn slot(proto: Proto) -> usize {
    match proto {
        Proto::Resp2 => 0,
        Proto::Resp3 => 1,
    }
}

impl Parked {
    pub fn new(max: usize) -> Self {
        Parked {
            max,
            conns: Mutex::new(Vec::new()),
            unsupported: AtomicBool::new(false),
            resetting: [AtomicUsize::new(0), AtomicUsize::new(0)],
            reset_done: Notify::new(),
        }
    }

    /// Are released connections worth resetting?
    pub fn enabled(&self) -> bool {
        self.max > 0 && !self.unsupported.load(Ordering::Relaxed)
    }

    /// Connections waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Proto, TcpStream, Instant)>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Close every connection kept (the generation is retired).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// A connection given back is about to be reset: a client asking for
    /// one meanwhile waits for it (`take_or_wait`) rather than connecting.
    pub fn begin(self: &Arc<Self>, proto: Proto) -> Resetting {
        self.resetting[slot(proto)].fetch_add(1, Ordering::AcqRel);
        Resetting {
            parked: self.clone(),
            proto,
        }
    }

    /// A kept connection for `proto`, waiting up to `wait` for one being
    /// reset (a client that ends a transaction and starts the next at once
    /// gets its own connection back, reset, instead of a new one).
    pub async fn take_or_wait(&self, proto: Proto, wait: Duration) -> Option<TcpStream> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let done = self.reset_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if let Some(s) = self.take(proto) {
                return Some(s);
            }
            if self.resetting[slot(proto)].load(Ordering::Acquire) == 0 {
                return None;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return None;
            }
        }
    }

    /// A live connection for `proto`, the most recently parked first.
    pub fn take(&self, proto: Proto) -> Option<TcpStream> {
        let mut conns = self.lock();
        conns.retain(|(_, _, at)| at.elapsed() < MAX_AGE);
        while let Some(i) = conns.iter().rposition(|(p, _, _)| *p == proto) {
            let (_, stream, _) = conns.swap_remove(i);
            // Quiet and open: a read would block. Closed (0) or with stray
            // bytes: drop it and look further.
            let mut probe = [0u8; 1];
            if matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                return Some(stream);
            }
        }
        None
    }

    /// Reset a connection a client gave back and keep it, or close it
    /// (`_resetting` is dropped once it is kept or closed).
    pub async fn reset_and_keep(
        &self,
        mut stream: TcpStream,
        settings: &Settings,
        proto: Proto,
        _resetting: Resetting,
    ) {
        if self.lock().len() >= self.max {
            Limit::MaxIdlePinned.reached();
            return;
        }
        match reset(&mut stream, settings, proto).await {
            Ok(()) => {
                let mut conns = self.lock();
                if conns.len() < self.max {
                    conns.push((proto, stream, Instant::now()));
                } else {
                    Limit::MaxIdlePinned.reached();
                }
            }
            Err(e) if e.kind == Kind::Protocol => {
                tracing::info!(error = %e, "RESET refused (Redis before 6.2?): dedicated connections are no longer reused");
                self.unsupported.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "a released dedicated connection could not be reset")
            }
        }
    }
}

/// `RESET`, then the handshake, within the connect timeout. What the
/// previous client's state still sends before RESET's reply (messages of a
/// subscription, invalidations, MONITOR lines) is skipped.
async fn reset(stream: &mut TcpStream, s: &Settings, proto: Proto) -> Result<(), Error> {
    let reply = tokio::time::timeout(s.connect_timeout, async {
        connector::send(stream, &[b"RESET"]).await?;
        let mut buf = BytesMut::with_capacity(4096);
        let mut scanner = Scanner::new();
        loop {
            let frame = connector::read_frame(stream, &mut buf, &mut scanner).await?;
            if &frame[..] == b"+RESET\r\n" || frame.first() == Some(&b'-') {
                return Ok::<_, Error>((frame, buf.is_empty()));
            }
        }
    })
    .await
    .map_err(|_| Error::upstream(Kind::Unavailable, format!("{}: RESET timed out", s.address)))??;
    match reply {
        (frame, _) if frame.first() == Some(&b'-') => Err(Error::upstream(
            Kind::Protocol,
            format!(
                "{}: RESET answered {}",
                s.address,
                String::from_utf8_lossy(&frame).trim_end()
            ),
        )),
        (_, true) => connector::handshake(stream, s, proto).await,
        (_, false) => Err(Error::upstream(
            Kind::Io,
            format!("{}: bytes after RESET's reply", s.address),
        )),
    }
}

//! The admin port's listener, bounded: at most `admin.max_connections`
//! connections at once (one more is closed as soon as it is accepted), and
//! a connection is closed when `admin.idle_timeout_secs` pass without a
//! byte of reply since its request began (or since it opened, or since its
//! last reply, with nothing sent): quiet connections, and requests dripped
//! a byte at a time, cannot hold slots. Without these, such connections
//! would keep the admin port (health probes, metrics) unreachable and hold
//! file descriptors until keyward had none left for Redis clients.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::Limit;

pub struct Bounded {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl Bounded {
    pub fn new(listener: TcpListener, max_connections: usize, idle: Duration) -> Self {
        Bounded {
            listener,
            slots: Arc::new(Semaphore::new(max_connections)),
            idle,
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                Limit::AdminMaxConnections.reached();
                drop(stream);
                continue;
            };
            let conn = Conn {
                stream,
                idle: self.idle,
                deadline: Box::pin(tokio::time::sleep(self.idle)),
                in_request: false,
                _slot: slot,
            };
            return (conn, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An admin connection: its slot is given back when it is dropped.
pub struct Conn {
    stream: TcpStream,
    idle: Duration,
    /// Moved forward by reply bytes, and by the first request byte after
    /// a reply (a request's later bytes do not move it).
    deadline: Pin<Box<Sleep>>,
    /// Request bytes came since the last reply bytes.
    in_request: bool,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn progressed(&mut self, reply: bool) {
        if !reply && self.in_request {
            return;
        }
        self.in_request = !reply;
        // Far enough when `idle` is beyond the clock's range.
        let now = Instant::now();
        let at = now
            .checked_add(self.idle)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        self.deadline.as_mut().reset(at);
    }

    /// An I/O poll's result: progress moves the deadline; pending I/O is
    /// an error once the deadline has passed.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
        reply: bool,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.progressed(reply);
            return r;
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Limit::AdminIdleTimeout.reached();
                Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.watch(cx, r, false)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, r, true)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, r, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

//! A client connection that records how each request ended instead of
//! panicking (unlike [`super::Raw`]): one reply, a closed connection, or no
//! reply within [`REPLY_LIMIT`]. For clients whose every outcome a test
//! checks afterwards, often from a background task.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::resp::{cmd, esc, frame_len};
use super::runtime::within;

/// A request through keyward must be answered within this long, even while
/// there is no master: a hold (at most `sentinel.hold_ms`, 5 s by default)
/// that outlasts it counts as a hang.
pub const REPLY_LIMIT: Duration = Duration::from_secs(8);

/// How one request through keyward ended, as the client saw it.
#[derive(Debug, Clone)]
pub enum Answer {
    /// One complete RESP reply.
    Reply(Vec<u8>),
    /// keyward closed or reset the client connection instead of replying.
    Closed(String),
    /// No reply within [`REPLY_LIMIT`].
    Hang,
}

impl Answer {
    /// The reply's bytes, if there was one.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Answer::Reply(r) => Some(r),
            _ => None,
        }
    }
}

/// A plain client connection to 127.0.0.1:port. Bytes read past one reply
/// stay in `buf` for the next.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Conn {
    /// Connect; panics if keyward does not accept within [`REPLY_LIMIT`].
    pub async fn connect(port: u16) -> Conn {
        let s = within(
            REPLY_LIMIT,
            "connect to keyward",
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .unwrap_or_else(|e| panic!("connect to keyward 127.0.0.1:{port}: {e}"));
        Conn::wrap(s)
    }

    /// Connect, or `None` if that fails or takes longer than
    /// [`REPLY_LIMIT`] (for clients that retry on a fresh connection).
    pub async fn try_connect(port: u16) -> Option<Conn> {
        match tokio::time::timeout(REPLY_LIMIT, TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(s)) => Some(Conn::wrap(s)),
            _ => None,
        }
    }

    fn wrap(s: TcpStream) -> Conn {
        s.set_nodelay(true).expect("set_nodelay");
        Conn {
            stream: s,
            buf: Vec::new(),
        }
    }

    /// Send one command and wait (bounded) for its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Answer {
        self.request(&cmd(args)).await
    }

    /// Send `request` (one encoded command) and wait (bounded) for its reply.
    pub async fn request(&mut self, request: &[u8]) -> Answer {
        match tokio::time::timeout(REPLY_LIMIT, self.roundtrip(request)).await {
            Ok(Ok(reply)) => Answer::Reply(reply),
            Ok(Err(e)) => Answer::Closed(e),
            Err(_) => Answer::Hang,
        }
    }

    /// Send `request` and read exactly one reply frame.
    async fn roundtrip(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(n) = frame_len(&self.buf)? {
                return Ok(self.buf.drain(..n).collect());
            }
            match self.stream.read(&mut chunk).await {
                Ok(0) => {
                    return Err(format!(
                        "closed by keyward; partial reply: {}",
                        esc(&self.buf)
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}; partial reply: {}", esc(&self.buf))),
            }
        }
    }
}

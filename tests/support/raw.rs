//! A raw async TCP client for byte-exact protocol checks: what keyward puts
//! on the wire, not what a client library makes of it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::resp::{cmd, esc, frame_len};
use super::DEADLINE;

/// A raw connection to 127.0.0.1:port. Reads go through an internal buffer,
/// so bytes read past one reply are kept for the next call; every read is
/// bounded by a 10 s deadline and panics (showing what did arrive) instead of
/// hanging the test.
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    port: u16,
}

impl Raw {
    /// Connect to 127.0.0.1:`port` (panics on failure or after 10 s).
    pub async fn connect(port: u16) -> Raw {
        match Raw::try_connect(port).await {
            Ok(r) => r,
            Err(e) => panic!("Raw::connect(127.0.0.1:{port}): {e}"),
        }
    }

    /// Connect and switch to RESP3 with `HELLO 3` (asserting the map reply).
    pub async fn connect_resp3(port: u16) -> Raw {
        let mut raw = Raw::connect(port).await;
        let hello = raw.call(&[b"HELLO", b"3"]).await;
        assert!(
            hello.starts_with(b"%"),
            "HELLO 3 on 127.0.0.1:{port}: {}",
            esc(&hello)
        );
        raw
    }

    /// Like [`Raw::connect`] but returns the error, for tests that expect the
    /// connection to be refused.
    pub async fn try_connect(port: u16) -> std::io::Result<Raw> {
        let conn = tokio::time::timeout(DEADLINE, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        // Tests send small pipelines and expect them on the wire at once.
        conn.set_nodelay(true)?;
        Ok(Raw {
            stream: conn,
            buf: Vec::new(),
            port,
        })
    }

    /// Write all of `bytes` (panics on error, e.g. a reset connection).
    pub async fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes).await {
            panic!(
                "Raw(127.0.0.1:{}): write of {} failed: {e}",
                self.port,
                esc(bytes)
            );
        }
    }

    /// Send one command encoded with [`cmd`] and return its single reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(&cmd(args)).await;
        self.read_reply().await
    }

    /// [`Raw::call`] every 10 ms until `done` holds for the reply or the
    /// 10 s deadline passes; the last reply (for the caller to assert on).
    pub async fn call_until(&mut self, args: &[&[u8]], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let r = self.call(args).await;
            if done(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Exactly one complete RESP2/RESP3 reply frame (an attribute is returned
    /// together with the frame it annotates). Panics on malformed data, EOF or
    /// timeout, showing the bytes received so far.
    pub async fn read_reply(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match frame_len(&self.buf) {
                Ok(Some(n)) => return self.buf.drain(..n).collect(),
                Ok(None) => {}
                Err(e) => panic!(
                    "Raw(127.0.0.1:{}): invalid RESP: {e}; buffer: {}",
                    self.port,
                    esc(&self.buf)
                ),
            }
            if !self.fill(deadline, "a complete reply").await {
                panic!(
                    "Raw(127.0.0.1:{}): connection closed before a complete reply; got: {}",
                    self.port,
                    esc(&self.buf)
                );
            }
        }
    }

    /// The next `n` replies, in order (for pipelined commands).
    pub async fn read_replies(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.read_reply().await);
        }
        out
    }

    /// Exactly the next `n` bytes, regardless of framing.
    pub async fn read_exact_n(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        while self.buf.len() < n {
            if !self.fill(deadline, &format!("{n} bytes")).await {
                panic!(
                    "Raw(127.0.0.1:{}): connection closed after {} of {n} bytes: {}",
                    self.port,
                    self.buf.len(),
                    esc(&self.buf)
                );
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Everything up to and including the first occurrence of `end`,
    /// without parsing frames (for replies too deep for the test kit's
    /// recursive frame reader): send a PING after the request and read to
    /// its `+PONG\r\n`.
    pub async fn read_through(&mut self, end: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.buf.windows(end.len()).position(|w| w == end) {
                return self.buf.drain(..i + end.len()).collect();
            }
            if !self.fill(deadline, &format!("\"{}\"", esc(end))).await {
                panic!(
                    "Raw(127.0.0.1:{}): connection closed before \"{}\": {} bytes",
                    self.port,
                    esc(end),
                    self.buf.len()
                );
            }
        }
    }

    /// Assert the next bytes on the wire are exactly `expected`. On mismatch
    /// the message shows both sides escaped and where they first differ.
    pub async fn expect(&mut self, expected: &[u8]) {
        let deadline = Instant::now() + DEADLINE;
        // Read only as much as needed, but stop early at the first differing
        // byte so a short wrong answer fails fast instead of timing out.
        while self.buf.len() < expected.len() && expected.starts_with(&self.buf) {
            if !self.fill(deadline, &format!("\"{}\"", esc(expected))).await {
                break;
            }
        }
        let got_len = self.buf.len().min(expected.len());
        let got: Vec<u8> = self.buf[..got_len].to_vec();
        if got != expected {
            let at = got
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len());
            panic!(
                "Raw(127.0.0.1:{}): wire bytes differ at offset {at}\n  expected: \"{}\"\n       got: \"{}\"\n(buffered: \"{}\")",
                self.port,
                esc(expected),
                esc(&got),
                esc(&self.buf)
            );
        }
        self.buf.drain(..got_len);
    }

    /// Everything until the peer closes (including anything already
    /// buffered). Panics if the connection is still open after 10 s.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        while self.fill(deadline, "the peer to close").await {}
        std::mem::take(&mut self.buf)
    }

    /// Whether the peer closes the connection within 10 s. Data arriving
    /// meanwhile is kept in the buffer; a reset counts as closed.
    pub async fn is_closed(&mut self) -> bool {
        self.is_closed_within(DEADLINE).await
    }

    /// [`Raw::is_closed`] with a caller-chosen deadline; use a short one when
    /// asserting that a connection stays open.
    pub async fn is_closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => return true,
            }
        }
    }

    /// Bytes received but not yet consumed by a read call.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Half-close: send FIN, keep reading (e.g. to see replies to a pipeline
    /// followed by client EOF).
    pub async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// The underlying socket, for anything the helpers do not cover.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Read more bytes into the buffer. `false` on EOF or reset; panics at
    /// the deadline naming `waiting_for` and showing what has arrived.
    async fn fill(&mut self, deadline: Instant, waiting_for: &str) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "Raw(127.0.0.1:{}): timed out after {DEADLINE:?} waiting for {waiting_for}; received so far: \"{}\"",
                self.port,
                esc(&self.buf)
            ),
            Ok(Ok(0)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Ok(Err(e)) => panic!("Raw(127.0.0.1:{}): read failed: {e}; received so far: \"{}\"", self.port, esc(&self.buf)),
        }
    }
}

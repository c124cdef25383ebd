//! Opening upstream connections: TCP connect with a deadline, then the
//! handshake that selects the RESP version and authenticates with the
//! configured credentials, so every connection (shared or pinned) starts in a
//! known state.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Error, Kind};
use crate::resp::{reply, Proto, Scanner};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: String,
    pub username: String,
    pub password: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// Connect and complete the handshake for `proto`.
pub async fn connect(s: &Settings, proto: Proto) -> Result<TcpStream, Error> {
    let stream = tokio::time::timeout(s.connect_timeout, TcpStream::connect(&s.address))
        .await
        .map_err(|_| {
            Error::upstream(
                Kind::Unavailable,
                format!("{}: connect timed out", s.address),
            )
        })?
        .map_err(|e| Error::upstream(Kind::Unavailable, format!("{}: {e}", s.address)))?;
    stream
        .set_nodelay(true)
        .map_err(|e| Error::upstream(Kind::Io, format!("{}: {e}", s.address)))?;
    let mut stream = stream;
    handshake(&mut stream, s, proto).await?;
    Ok(stream)
}

/// Select the RESP version and authenticate (a new connection, or one RESET).
pub async fn handshake(stream: &mut TcpStream, s: &Settings, proto: Proto) -> Result<(), Error> {
    let user = if s.username.is_empty() {
        "default"
    } else {
        s.username.as_str()
    };
    let hello: Option<Vec<&[u8]>> = match (proto, s.password.is_empty()) {
        (Proto::Resp3, true) => Some(vec![b"HELLO", b"3"]),
        (Proto::Resp3, false) => Some(vec![
            b"HELLO",
            b"3",
            b"AUTH",
            user.as_bytes(),
            s.password.as_bytes(),
        ]),
        (Proto::Resp2, false) => Some(vec![b"AUTH", user.as_bytes(), s.password.as_bytes()]),
        (Proto::Resp2, true) => None,
    };
    if let Some(cmd) = hello {
        setup_call(stream, s, &cmd, "handshake").await?;
    }
    Ok(())
}

/// Move a new connection to database `db` (a shared pool of that database).
pub async fn select(stream: &mut TcpStream, s: &Settings, db: i64) -> Result<(), Error> {
    let db = db.to_string();
    setup_call(
        stream,
        s,
        &[b"SELECT", db.as_bytes()],
        &format!("SELECT {db}"),
    )
    .await
}

/// One step of setting a connection up, within the connect timeout: an
/// error reply fails it as a handshake error naming the step.
async fn setup_call(
    stream: &mut TcpStream,
    s: &Settings,
    args: &[&[u8]],
    step: &str,
) -> Result<(), Error> {
    let reply = tokio::time::timeout(s.connect_timeout, call(stream, args))
        .await
        .map_err(|_| {
            Error::upstream(
                Kind::Unavailable,
                format!("{}: {step} timed out", s.address),
            )
        })??;
    if reply.first() == Some(&b'-') {
        let text = String::from_utf8_lossy(&reply[1..]).trim_end().to_string();
        return Err(Error::upstream(
            Kind::Handshake,
            format!("{}: {step}: {text}", s.address),
        ));
    }
    Ok(())
}

/// Send one command and read exactly one reply. Only for connections not yet
/// handed to a pipelined reader (handshake, table load).
pub async fn call(stream: &mut TcpStream, args: &[&[u8]]) -> Result<BytesMut, Error> {
    send(stream, args).await?;
    read_frame(
        stream,
        &mut BytesMut::with_capacity(4096),
        &mut Scanner::new(),
    )
    .await
}

/// Write one command.
pub async fn send(stream: &mut TcpStream, args: &[&[u8]]) -> Result<(), Error> {
    let mut out = BytesMut::new();
    reply::command(&mut out, args);
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::upstream(Kind::Io, e.to_string()))
}

/// Read the next complete frame, keeping whatever follows it in `buf` for
/// the next call (pub/sub streams).
pub async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
) -> Result<BytesMut, Error> {
    loop {
        if let Some(end) = scanner
            .next(buf)
            .map_err(|e| Error::upstream(Kind::Protocol, e.to_string()))?
        {
            let frame = buf.split_to(end);
            scanner.consumed(end);
            return Ok(frame);
        }
        crate::resp::make_room(buf, scanner.need(), 4096);
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| Error::upstream(Kind::Io, e.to_string()))?;
        if n == 0 {
            return Err(Error::upstream(
                Kind::Unavailable,
                "upstream closed the connection",
            ));
        }
    }
}

//! One-shot connections for the commands that must not wait behind the
//! shared connection: `SCRIPT KILL`, `FUNCTION KILL` and `CLIENT UNPAUSE`.
//! The script they stop runs on a shared connection (the EVAL or FCALL of
//! some client), and Redis reads nothing more from that connection until
//! the script ends; a write held by `CLIENT PAUSE WRITE` blocks its shared
//! connection the same way until the pause ends. So these have to reach
//! Redis on another connection, as they do from any other client talking
//! to Redis directly. Redis accepts connections, HELLO and AUTH while a
//! script keeps it busy or a pause holds writes.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::connector::{self, Settings};
use crate::error::{Error, Kind};
use crate::resp::{Proto, Scanner};

/// Open a connection in `proto`, send `request` (one RESP command), and
/// return its reply; the connection is closed after.
pub async fn call(settings: &Settings, proto: Proto, request: &[u8]) -> Result<Bytes, Error> {
    let work = async {
        let mut stream = connector::connect(settings, proto).await?;
        stream.write_all(request).await.map_err(|e| {
            Error::upstream(Kind::Io, format!("{}: write failed: {e}", settings.address))
        })?;
        let mut buf = BytesMut::with_capacity(512);
        let reply = connector::read_frame(&mut stream, &mut buf, &mut Scanner::new()).await?;
        Ok(reply.freeze())
    };
    let limit = settings.connect_timeout + settings.command_timeout;
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(Error::upstream(
            Kind::Timeout,
            format!(
                "{}: no reply within {} ms (upstream.connect_timeout_ms + command_timeout_ms)",
                settings.address,
                limit.as_millis()
            ),
        ))
    })
}

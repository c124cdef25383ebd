//! Connected fred clients, the "real application" view of keyward (or of a
//! bare redis-server, for comparison).

use std::time::Duration;

use fred::clients::Client;
use fred::error::Error;
use fred::interfaces::ClientLike;
use fred::types::config::Config;
use fred::types::{Builder, RespVersion};

use super::DEADLINE;

/// A RESP2 fred client connected to 127.0.0.1:`port`. Panics if the
/// connection or handshake fails.
///
/// Reconnection is disabled (no policy set): a dropped connection must show
/// up as an error in the test, not be papered over by a silent retry.
/// Commands time out after 10 s so a stuck proxy fails the test.
pub async fn client(port: u16) -> Client {
    client_with(port, RespVersion::RESP2, None).await
}

/// Like [`client`] but negotiates RESP3 (fred sends `HELLO 3` on connect).
pub async fn client_resp3(port: u16) -> Client {
    client_with(port, RespVersion::RESP3, None).await
}

/// A RESP2 client that authenticates with `password` (default user).
pub async fn client_auth(port: u16, password: &str) -> Client {
    client_with(port, RespVersion::RESP2, Some(password)).await
}

/// The general form: protocol version and optional password. Panics on
/// failure; use [`try_client`] to assert a failure.
pub async fn client_with(port: u16, version: RespVersion, password: Option<&str>) -> Client {
    match try_client(port, version.clone(), password).await {
        Ok(c) => c,
        Err(e) => panic!("fred client to 127.0.0.1:{port} ({version:?}) failed to connect: {e:?}"),
    }
}

/// Build and connect a client, returning the connection error instead of
/// panicking (for tests where the handshake is expected to fail).
pub async fn try_client(
    port: u16,
    version: RespVersion,
    password: Option<&str>,
) -> Result<Client, Error> {
    let mut config = Config::from_url(&format!("redis://127.0.0.1:{port}"))?;
    config.version = version;
    config.password = password.map(str::to_string);
    // fail_fast (the default) makes init() report the first connection
    // error instead of entering reconnect logic.
    config.fail_fast = true;

    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| {
            p.default_command_timeout = DEADLINE;
        })
        .with_connection_config(|c| {
            c.connection_timeout = DEADLINE;
            c.internal_command_timeout = DEADLINE;
        });
    let client = builder.build()?;
    // init() resolves once the connection (and HELLO/AUTH) succeeded; the
    // returned task handle is dropped, which detaches the connection task.
    let connect = tokio::time::timeout(DEADLINE + Duration::from_secs(1), client.init());
    match connect.await {
        Ok(r) => {
            r?;
            Ok(client)
        }
        Err(_) => Err(Error::new(
            fred::error::ErrorKind::Timeout,
            "client init timed out",
        )),
    }
}

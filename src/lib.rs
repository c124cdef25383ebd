//! keyward: a Redis-protocol smart proxy.
//!
//! ```text
//!  Redis clients (redis-cli, fred, redis-py, Lettuce, ...)        probes
//!         | RESP2 / RESP3                                           | HTTP
//!         v                                                         v
//!  +------------------------- keyward (one process, tokio) ---------------+
//!  | server::listener -> server::client (reader + writer per client)     |
//!  |      | resp::request frames (scan once, raw bytes kept)  admin::http |
//!  |      v                                                  /live /ready |
//!  |  command::class (table from upstream COMMAND) -> route              |
//!  |      |                           |                                  |
//!  |  upstream::pool (pipelined,   upstream::pinned (MULTI, blocking,    |
//!  |   shared, per RESP version)    SUBSCRIBE, MONITOR, SELECT, CLIENT)  |
//!  +------|---------------------------|----------------------------------+
//!         v                           v
//!                         Redis
//! ```
//!
//! Bytes flow one way: a request is framed once, its name classified, and
//! its original bytes go upstream; replies come back as slices of the
//! upstream read buffer, in request order. See DESIGN.md for the decisions
//! behind this shape.

#![forbid(unsafe_code)]

pub mod admin;
pub mod command;
pub mod config;
pub mod error;
pub mod resp;
pub mod server;
pub mod shutdown;
pub mod upstream;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use resp::{Limits, Proto};
use server::Ctx;
use upstream::{Node, Pool, ServerFacts, Settings};

/// Accept backlog; Redis's default tcp-backlog, so a burst of reconnecting
/// clients is not dropped at the SYN queue.
const BACKLOG: u32 = 511;

fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Bind the listeners; errors here are start-up errors (exit code 1).
pub async fn bind(config: &Config) -> std::io::Result<(TcpListener, Option<TcpListener>)> {
    let listener = listen(&config.server.listen).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", config.server.listen),
        )
    })?;
    let admin = if config.admin.listen.is_empty() {
        None
    } else {
        Some(TcpListener::bind(&config.admin.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {} (admin): {e}", config.admin.listen),
            )
        })?)
    };
    Ok((listener, admin))
}

/// Run the proxy until `shutdown` is cancelled, then drain and return.
pub async fn run(
    config: Config,
    listeners: (TcpListener, Option<TcpListener>),
    shutdown: CancellationToken,
) {
    let (listener, admin) = listeners;
    let u = &config.upstream;
    let node = Arc::new(Node {
        settings: Settings {
            address: u.address.clone(),
            username: u.username.clone(),
            password: u.password.clone(),
            connect_timeout: config.connect_timeout(),
            command_timeout: config.command_timeout(),
        },
        max_inflight: u.max_inflight,
        backoff_min: std::time::Duration::from_millis(u.backoff_min_ms),
        backoff_max: std::time::Duration::from_millis(u.backoff_max_ms),
        table: ArcSwapOption::empty(),
        facts: ArcSwap::from_pointee(ServerFacts::default()),
    });
    // Pools stop on their own token, after the clients have drained.
    let pools_stop = CancellationToken::new();
    let pool2 = Pool::start(node.clone(), Proto::Resp2, u.pool_size, pools_stop.clone());
    let pool3 = Pool::start(node.clone(), Proto::Resp3, u.pool_size, pools_stop.clone());
    let ctx = Arc::new(Ctx {
        limits: Limits {
            max_bulk: config.server.max_bulk_bytes,
            max_request: config.server.max_request_bytes,
        },
        pinned: Arc::new(Semaphore::new(u.max_pinned)),
        node,
        pool2,
        pool3,
        next_client_id: AtomicU64::new(1),
        clients: AtomicUsize::new(0),
        shutdown,
        config,
    });
    tracing::info!(
        listen = %ctx.config.server.listen,
        upstream = %ctx.config.upstream.address,
        admin = %ctx.config.admin.listen,
        "keyward started"
    );
    let admin_task = admin.map(|l| tokio::spawn(admin::http::serve(ctx.clone(), l)));
    server::listener::serve(ctx.clone(), listener).await;
    pools_stop.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    tracing::info!("keyward stopped");
}

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
pub mod cache;
pub mod command;
pub mod config;
pub mod error;
pub mod hex;
pub mod hotkey;
pub mod logging;
pub mod metrics;
pub mod resp;
pub mod server;
pub mod shutdown;
pub mod topology;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use server::Ctx;
use topology::{State, Topology};

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
    let sentinel = config.uses_sentinel();
    let initial = if sentinel {
        Topology {
            master: None,
            epoch: 0,
            state: State::Discovering,
            replicas: Vec::new(),
            sentinels: config
                .sentinel
                .addresses
                .iter()
                .map(|a| topology::SentinelInfo {
                    address: a.clone(),
                    reachable: false,
                })
                .collect(),
            master_name: Some(config.sentinel.master_name.clone()),
            since_ms: topology::now_ms(),
        }
    } else {
        Topology {
            master: Some(config.upstream.address.clone()),
            epoch: 0,
            state: State::Healthy,
            replicas: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
            since_ms: topology::now_ms(),
        }
    };
    let ctx = Arc::new(Ctx::new(config, initial, shutdown));
    let tracker = if sentinel {
        Some(tokio::spawn(topology::sentinel::run(ctx.clone())))
    } else {
        ctx.install(&ctx.config.upstream.address);
        None
    };
    tracing::info!(
        listen = %ctx.config.server.listen,
        upstream = %if sentinel {
            format!("sentinel master '{}' via {}", ctx.config.sentinel.master_name, ctx.config.sentinel.addresses.join(","))
        } else {
            ctx.config.upstream.address.clone()
        },
        admin = %ctx.config.admin.listen,
        "keyward started"
    );
    if let Some(d) = &ctx.hotkeys {
        tokio::spawn(d.clone().run(ctx.shutdown.clone()));
        if d.config.fleet {
            tokio::spawn(hotkey::fleet::run(ctx.clone()));
        }
    }
    if let Some(c) = &ctx.cache {
        let fills = ctx
            .cache_fills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(fills) = fills {
            tokio::spawn(cache::tracking::run(ctx.clone(), c.clone(), fills));
        }
        tokio::spawn(cache::warmup::run(ctx.clone(), c.clone()));
    } else if ctx.config.cache.max_mb > 0 {
        tracing::warn!("near cache off: it caches hot keys only and hotkeys.enabled is false");
    }
    metrics::install();
    let admin_stop = CancellationToken::new();
    let admin_task =
        admin.map(|l| tokio::spawn(admin::http::serve(ctx.clone(), l, admin_stop.clone())));
    server::listener::serve(ctx.clone(), listener).await;
    if let Some(t) = tracker {
        let _ = t.await;
    }
    // Close the upstream connections once the clients have drained.
    if let Some(up) = ctx.upstream.swap(None) {
        up.retire();
    }
    admin_stop.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    tracing::info!("keyward stopped");
}

//! Accepting clients: the max-clients bound, a reader and a writer task per
//! connection, and draining on shutdown.
//!
//! Readers live in a `JoinSet` so shutdown can abort them all at once (no
//! new requests are read); writers live in a `TaskTracker` so shutdown can
//! wait, up to the grace period, for them to deliver the replies owed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::{client, Ctx};

/// Accept until shutdown, then drain.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    let writers = TaskTracker::new();
    let mut readers: JoinSet<()> = JoinSet::new();
    let max = ctx.config.server.max_clients;
    let shutdown = ctx.shutdown.clone();
    let stop = shutdown.cancelled();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            // Reap finished readers so the set does not grow.
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if ctx.clients.fetch_add(1, Ordering::AcqRel) >= max {
            ctx.clients.fetch_sub(1, Ordering::AcqRel);
            ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
            crate::metrics::Limit::MaxClients.reached();
            tracing::warn!(%peer, max, "rejecting client: server.max_clients reached");
            writers.spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        }
        let id = ctx.next_client_id.fetch_add(1, Ordering::Relaxed);
        ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
        client::start(ctx.clone(), stream, id, peer, &mut readers, &writers);
    }
    drop(listener);
    let open = ctx.clients.load(Ordering::Acquire);
    let grace = Duration::from_millis(ctx.config.server.shutdown_grace_ms);
    tracing::info!(
        clients = open,
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining clients"
    );
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    writers.close();
    if tokio::time::timeout(grace, writers.wait()).await.is_err() {
        tracing::warn!(
            clients = ctx.clients.load(Ordering::Acquire),
            "grace period over; closing remaining clients"
        );
    }
}

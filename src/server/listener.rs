//! Accepting clients: the max-clients bound, one task per connection, and
//! draining on shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use super::{client, Ctx};

/// Accept until shutdown, then wait (up to the grace period) for sessions to
/// finish writing the replies they owe.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    let tracker = TaskTracker::new();
    let max = ctx.config.server.max_clients;
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
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
            tracing::warn!(%peer, max, "rejecting client: server.max_clients reached");
            tracker.spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        }
        let id = ctx.next_client_id.fetch_add(1, Ordering::Relaxed);
        let ctx2 = ctx.clone();
        tracker.spawn(async move {
            client::serve(ctx2.clone(), stream, id).await;
            ctx2.clients.fetch_sub(1, Ordering::AcqRel);
        });
    }
    drop(listener);
    tracker.close();
    let grace = Duration::from_millis(ctx.config.server.shutdown_grace_ms);
    let open = ctx.clients.load(Ordering::Acquire);
    tracing::info!(
        clients = open,
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining clients"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            clients = ctx.clients.load(Ordering::Acquire),
            "grace period over; closing remaining clients"
        );
    }
}

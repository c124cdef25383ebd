//! Admin HTTP endpoints.
//!
//! - `GET /live`: 200 while the process runs (liveness).
//! - `GET /ready`: 200 when a shared upstream connection is up and the
//!   command table is loaded, 503 otherwise, with a one-line reason.
//! - `GET /topology`: the tracker's snapshot as JSON.
//! - `POST /failover`: a planned switchover (see `topology::switchover`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::server::Ctx;

pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/topology", get(topology))
        .route("/failover", axum::routing::post(failover))
        .with_state(ctx)
}

async fn ready(State(ctx): State<Arc<Ctx>>) -> (StatusCode, String) {
    let t = ctx.topology.snapshot();
    let Some(up) = ctx.current() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no verified master (state: {})\n",
                t.state.name()
            ),
        );
    };
    if ctx.learned.table.load().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: upstream command table not loaded yet\n".into(),
        );
    }
    if up.pool2.live() == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no connection to upstream {}\n", up.address()),
        );
    }
    (StatusCode::OK, "ready\n".into())
}

/// The topology as JSON: master, epoch, state, replicas, sentinels.
async fn topology(State(ctx): State<Arc<Ctx>>) -> axum::Json<crate::topology::Topology> {
    axum::Json((*ctx.topology.snapshot()).clone())
}

/// A planned switchover; 200 with what happened, or 409 with why not.
async fn failover(State(ctx): State<Arc<Ctx>>) -> (StatusCode, axum::Json<serde_json::Value>) {
    match crate::topology::switchover::planned(ctx).await {
        Ok(o) => (
            StatusCode::OK,
            axum::Json(
                serde_json::json!({"ok": true, "old": o.old, "new": o.new, "held_ms": o.held_ms}),
            ),
        ),
        Err(e) => (
            StatusCode::CONFLICT,
            axum::Json(serde_json::json!({"ok": false, "error": e})),
        ),
    }
}

/// Serve until shutdown.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    let shutdown = ctx.shutdown.clone();
    let app = router(ctx);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

//! Admin HTTP endpoints.
//!
//! - `GET /live`: 200 while the process runs (liveness).
//! - `GET /ready`: 200 when a shared upstream connection is up and the
//!   command table is loaded, 503 otherwise, with a one-line reason.
//! - `GET /topology`: the tracker's snapshot as JSON.
//! - `POST /failover`: a planned switchover (see `topology::switchover`).
//! - `GET /hotkeys?count=n`: the hottest keys of the last window as JSON.
//! - `GET /metrics`: Prometheus metrics.
//! - `GET /cache?count=n`: near-cache statistics and the keys cached now.
//! - `GET /health`: each component's state as JSON (200 unless down).
//! - `GET /stats`: request counts, latency histogram and percentiles,
//!   overall and per command family, as JSON (the dashboard's source).
//! - `GET /clients?count=n`: the clients connected now.
//! - `GET /log-level`, `PUT /log-level` (body: a filter such as `debug`).
//! - `GET /ui`: the dashboard, one self-contained page embedded in the
//!   binary that polls the JSON endpoints above every second.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Ctx;

pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/topology", get(topology))
        .route("/failover", axum::routing::post(failover))
        .route("/hotkeys", get(hotkeys))
        .route("/metrics", get(metrics))
        .route("/cache", get(cache))
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/clients", get(clients))
        .route("/log-level", get(log_level).put(set_log_level))
        .route("/ui", get(ui))
        .with_state(ctx)
}

async fn ready(State(ctx): State<Arc<Ctx>>) -> (StatusCode, String) {
    if ctx.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".into(),
        );
    }
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
    if let Some(c) = &ctx.cache {
        if !c.warm.load(std::sync::atomic::Ordering::Acquire) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: near cache warming up\n".into(),
            );
        }
    }
    (StatusCode::OK, "ready\n".into())
}

/// The topology as JSON: master, epoch, state, replicas, sentinels, and
/// the last failover with its timeline.
async fn topology(State(ctx): State<Arc<Ctx>>) -> axum::Json<serde_json::Value> {
    let mut v = serde_json::to_value(&*ctx.topology.snapshot()).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "last_failover".into(),
            serde_json::to_value(ctx.topology.last_failover()).unwrap_or_default(),
        );
    }
    axum::Json(v)
}

/// The dashboard page (embedded at build time; no external assets).
async fn ui() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("ui.html"))
}

async fn health(State(ctx): State<Arc<Ctx>>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let h = super::health::report(&ctx);
    let code = if h.status == "down" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        axum::Json(serde_json::to_value(h).unwrap_or_default()),
    )
}

/// Counters and latency for the dashboard; see `admin::health::stats`.
async fn stats(State(ctx): State<Arc<Ctx>>) -> axum::Json<serde_json::Value> {
    axum::Json(super::health::stats(&ctx))
}

/// The clients connected now: `?count=n` (default 100).
async fn clients(
    State(ctx): State<Arc<Ctx>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let count = match q.get("count").map(|c| c.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if n > 0 => n,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "count must be a positive integer"})),
            )
        }
    };
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({
            "total": ctx.registry.len(),
            "clients": ctx.registry.list(count),
        })),
    )
}

async fn log_level() -> String {
    format!("{}\n", crate::logging::level())
}

/// Change the log filter; 400 with the reason if it does not parse.
async fn set_log_level(body: String) -> (StatusCode, String) {
    match crate::logging::set_level(&body) {
        Ok(()) => (StatusCode::OK, format!("{}\n", crate::logging::level())),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Prometheus text exposition.
async fn metrics(
    State(ctx): State<Arc<Ctx>>,
) -> (
    StatusCode,
    [(axum::http::header::HeaderName, &'static str); 1],
    String,
) {
    let ct = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; version=0.0.4",
    )];
    match crate::metrics::render(&ctx) {
        Some(text) => (StatusCode::OK, ct, text),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            ct,
            "metrics recorder unavailable\n".into(),
        ),
    }
}

/// Near-cache statistics and the keys cached now: `?count=n` (default 10).
async fn cache(
    State(ctx): State<Arc<Ctx>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let Some(c) = &ctx.cache else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(
                serde_json::json!({"enabled": false, "error": "the near cache is disabled"}),
            ),
        );
    };
    let count = q
        .get("count")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(10);
    (
        StatusCode::OK,
        axum::Json(serde_json::to_value(c.stats(count)).unwrap_or_default()),
    )
}

/// The hottest keys as JSON: `?count=n` (default 10).
async fn hotkeys(
    State(ctx): State<Arc<Ctx>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let Some(d) = &ctx.hotkeys else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(
                serde_json::json!({"error": "hot-key detection is disabled (hotkeys.enabled = false)"}),
            ),
        );
    };
    let fleet = match q.get("scope").map(String::as_str) {
        None | Some("local") => false,
        Some("fleet") => true,
        Some(_) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "scope must be local or fleet"})),
            )
        }
    };
    let count = match q.get("count").map(|c| c.parse::<usize>()) {
        None => 10,
        Some(Ok(n)) if n > 0 => n,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "count must be a positive integer"})),
            )
        }
    };
    if fleet {
        return match crate::hotkey::fleet::read(&ctx).await {
            Ok(entries) => (
                StatusCode::OK,
                axum::Json(serde_json::json!({
                    "scope": "fleet",
                    "keys": entries.iter().take(count).collect::<Vec<_>>(),
                })),
            ),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"error": format!("fleet view unavailable: {e}")})),
            ),
        };
    }
    let snap = d.snapshot();
    let keys: Vec<_> = snap.keys.iter().take(count).collect();
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({
            "scope": "local",
            "window_ms": snap.window_ms,
            "sample_rate": snap.sample_rate,
            "windows": snap.windows,
            "keys": keys,
        })),
    )
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
/// Serve until `stop` is cancelled. keyward cancels it once clients have
/// drained, not at SIGTERM: during the drain `/ready` answers 503
/// "shutting down" (load balancers stop sending) and `/metrics` still
/// scrapes.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener, stop: CancellationToken) {
    let admin = &ctx.config.admin;
    let listener = super::listener::Bounded::new(
        listener,
        admin.max_connections,
        Duration::from_secs(admin.idle_timeout_secs),
    );
    let app = router(ctx);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

//! `/health` (each component's state) and `/stats` (the counters and
//! latency the dashboard charts), built from the same snapshots the
//! metrics read.

use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use crate::command::Family;
use crate::metrics::histogram::BOUNDS_US;
use crate::server::Ctx;
use crate::topology::State;

#[derive(Debug, Serialize)]
pub struct Component {
    /// "ok", "degraded", "down" or "disabled".
    pub status: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Health {
    /// The worst component status ("disabled" counts as ok).
    pub status: &'static str,
    pub components: std::collections::BTreeMap<&'static str, Component>,
    /// The last error replies keyward made itself, newest first (the
    /// totals by kind are in `keyward_errors_total`).
    pub recent_errors: Vec<crate::logging::RecentError>,
    /// Configured bounds reached since start, by config key (those never
    /// reached are left out); `keyward_limit_reached_total` in /metrics.
    pub limits_reached: std::collections::BTreeMap<&'static str, u64>,
}

fn c(status: &'static str, detail: impl Into<String>) -> Component {
    Component {
        status,
        detail: detail.into(),
    }
}

pub fn report(ctx: &Ctx) -> Health {
    let mut m = std::collections::BTreeMap::new();
    let t = ctx.topology.snapshot();
    m.insert(
        "topology",
        match t.state {
            State::Healthy => c("ok", format!("healthy, epoch {}", t.epoch)),
            State::Discovering => c("down", "no verified master yet"),
            s => c(
                "degraded",
                format!("{} since {} (requests held)", s.name(), t.since_ms),
            ),
        },
    );
    m.insert(
        "upstream",
        match ctx.upstream.load_full() {
            None => c("down", "no upstream connections (no verified master)"),
            Some(up) => {
                let live = up.pool2.live();
                if live == 0 {
                    c(
                        "down",
                        format!("no live connection to {} (circuit open)", up.address()),
                    )
                } else {
                    c(
                        "ok",
                        format!(
                            "{}: {} connections, {} requests in flight",
                            up.address(),
                            up.live(),
                            up.pending()
                        ),
                    )
                }
            }
        },
    );
    if !t.sentinels.is_empty() {
        let up = t.sentinels.iter().filter(|s| s.reachable).count();
        let status = match up {
            0 => "down",
            n if n < t.sentinels.len() => "degraded",
            _ => "ok",
        };
        m.insert(
            "sentinels",
            c(status, format!("{up} of {} reachable", t.sentinels.len())),
        );
    }
    if ctx.learned.table.load().is_none() {
        m.insert("commands", c("down", "command table not loaded yet"));
    } else {
        m.insert("commands", c("ok", "command table loaded"));
    }
    m.insert(
        "listener",
        if ctx.shutdown.is_cancelled() {
            c("down", "shutting down")
        } else {
            c(
                "ok",
                format!(
                    "{} clients (max {})",
                    ctx.clients.load(Relaxed),
                    ctx.config.server.max_clients
                ),
            )
        },
    );
    m.insert(
        "hotkeys",
        match &ctx.hotkeys {
            None => c("disabled", "hotkeys.enabled = false"),
            Some(d) => c("ok", format!("{} keys hot", d.hot_now.load(Relaxed))),
        },
    );
    m.insert(
        "cache",
        match &ctx.cache {
            None => c("disabled", "cache.max_mb = 0 or hot keys off"),
            Some(cache) if !cache.warm.load(Relaxed) => c("degraded", "warming up"),
            Some(cache) if !cache.link_up.load(Relaxed) => {
                c("degraded", "tracking link down: not serving from the cache")
            }
            Some(cache) => c(
                "ok",
                format!(
                    "{} entries, {} bytes",
                    cache.store.len(),
                    cache.store.bytes()
                ),
            ),
        },
    );
    let worst = m
        .values()
        .map(|c| match c.status {
            "down" => 2,
            "degraded" => 1,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    Health {
        status: ["ok", "degraded", "down"][worst],
        components: m,
        recent_errors: ctx.error_lines.recent(),
        limits_reached: crate::metrics::Limit::ALL
            .iter()
            .map(|l| (l.key(), l.count()))
            .filter(|(_, n)| *n > 0)
            .collect(),
    }
}

/// Cumulative counters and latency (per-bucket counts since start, so a
/// reader can diff two polls for the latency of the interval between).
pub fn stats(ctx: &Ctx) -> serde_json::Value {
    let st = &ctx.stats;
    let (requests, errors) = st.totals();
    let lat = st.latency();
    let families: Vec<serde_json::Value> = Family::ALL
        .iter()
        .filter_map(|&f| {
            let fs = st.family(f);
            let (ok, err, relayed) = (
                fs.ok.load(Relaxed),
                fs.error.load(Relaxed),
                fs.relayed.load(Relaxed),
            );
            if ok + err + relayed == 0 {
                return None;
            }
            let l = fs.latency.snapshot();
            Some(serde_json::json!({
                "family": f.name(),
                "requests": ok + err + relayed,
                "errors": err,
                "relayed": relayed,
                "p50_us": l.quantile(0.5),
                "p99_us": l.quantile(0.99),
            }))
        })
        .collect();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": st.started.elapsed().as_secs_f64(),
        "clients": ctx.clients.load(Relaxed),
        "clients_accepted": st.accepted.load(Relaxed),
        "clients_rejected": st.rejected.load(Relaxed),
        "requests": requests,
        "errors": errors,
        "bytes_in": st.bytes_in.load(Relaxed),
        "bytes_out": st.bytes_out.load(Relaxed),
        "latency": {
            "bounds_us": BOUNDS_US,
            "counts": lat.counts,
            "count": lat.count(),
            "sum_us": lat.sum_us,
            "p50_us": lat.quantile(0.5),
            "p99_us": lat.quantile(0.99),
        },
        "families": families,
    })
}

//! Metric names and the Prometheus exposition, in one place.
//!
//! keyward keeps its counters in plain atomics next to the code that owns
//! them (the data path never calls into a metrics library); a scrape of
//! `/metrics` copies them into the Prometheus recorder (the `metrics`
//! facade and `metrics-exporter-prometheus`) and renders it. The request
//! latency histograms are kept pre-bucketed in atomics (`histogram.rs`):
//! the facade has no way to set a histogram's buckets absolutely, so their
//! text is appended to the exporter's, in the same format.
//! Labels are bounded: never a key name, never a client address; node
//! labels name upstream Redis servers (a handful, from the topology).

pub mod histogram;
pub mod limits;
pub mod requests;

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use limits::Limit;
pub use requests::{ErrorKind, RequestStats, Tally};

use crate::command::Family;
use crate::server::Ctx;

pub const BUILD_INFO: &str = "keyward_build_info";
pub const UPTIME: &str = "keyward_uptime_seconds";
pub const CLIENTS_ACCEPTED: &str = "keyward_clients_accepted_total";
pub const CLIENTS_REJECTED: &str = "keyward_clients_rejected_total";
pub const REQUESTS: &str = "keyward_requests_total";
pub const REQUEST_DURATION: &str = "keyward_request_duration_seconds";
pub const ERRORS: &str = "keyward_errors_total";
pub const BYTES_RECEIVED: &str = "keyward_bytes_received_total";
pub const BYTES_SENT: &str = "keyward_bytes_sent_total";
pub const PINNED: &str = "keyward_pinned_connections";
pub const PINNED_IDLE: &str = "keyward_pinned_idle_connections";
pub const UPSTREAM_CONNECTIONS: &str = "keyward_upstream_connections";
pub const UPSTREAM_INFLIGHT: &str = "keyward_upstream_inflight";
pub const UPSTREAM_BREAKER_OPEN: &str = "keyward_upstream_breaker_open";
pub const UPSTREAM_ERRORS: &str = "keyward_upstream_errors_total";
pub const TOPOLOGY_STATE: &str = "keyward_topology_state";
pub const FAILOVERS: &str = "keyward_failovers_total";
pub const SLOWLOG_ENTRIES: &str = "keyward_slowlog_entries";
pub const LIMIT_REACHED: &str = "keyward_limit_reached_total";

pub const CLIENTS: &str = "keyward_clients";
pub const HELD_REQUESTS: &str = "keyward_held_requests";
pub const CARRIED_IN_FLIGHT: &str = "keyward_carried_requests_in_flight";
pub const TOPOLOGY_EPOCH: &str = "keyward_topology_epoch";
pub const TOPOLOGY_HEALTHY: &str = "keyward_topology_healthy";
pub const UPSTREAM_GENERATION: &str = "keyward_upstream_generation";
pub const HOTKEY_SAMPLES: &str = "keyward_hotkey_samples_total";
pub const HOTKEY_WINDOWS: &str = "keyward_hotkey_windows_total";
pub const HOTKEYS_HOT: &str = "keyward_hotkeys_hot";
pub const CACHE_HITS: &str = "keyward_cache_hits_total";
pub const CACHE_MISSES: &str = "keyward_cache_misses_total";
pub const CACHE_BYTES: &str = "keyward_cache_bytes";
pub const CACHE_ENTRIES: &str = "keyward_cache_entries";
pub const CACHE_FILLS: &str = "keyward_cache_fills_total";
pub const CACHE_FILLS_VOIDED: &str = "keyward_cache_fills_voided_total";
pub const CACHE_INVALIDATIONS: &str = "keyward_cache_invalidations_total";
pub const CACHE_FLUSHES: &str = "keyward_cache_flushes_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder (once) and describe every metric.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder is already installed; /metrics is unavailable");
                return None;
            }
            metrics::describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
            metrics::describe_gauge!(UPTIME, "Seconds since keyward started.");
            metrics::describe_gauge!(CLIENTS, "Connected clients.");
            metrics::describe_counter!(CLIENTS_ACCEPTED, "Client connections accepted.");
            metrics::describe_counter!(
                CLIENTS_REJECTED,
                "Client connections refused, by reason (server.max_clients)."
            );
            metrics::describe_counter!(
                REQUESTS,
                "Requests by command family and result (ok, error, relayed through a pinned connection)."
            );
            metrics::describe_counter!(
                ERRORS,
                "Error replies keyward made itself, by kind."
            );
            metrics::describe_counter!(BYTES_RECEIVED, "Bytes read from clients.");
            metrics::describe_counter!(BYTES_SENT, "Bytes written to clients.");
            metrics::describe_gauge!(
                PINNED,
                "Pinned upstream connections in use (upstream.max_pinned bounds them)."
            );
            metrics::describe_gauge!(
                PINNED_IDLE,
                "Pinned connections given back, RESET and kept for reuse (upstream.max_idle_pinned bounds them)."
            );
            metrics::describe_gauge!(
                UPSTREAM_CONNECTIONS,
                "Live shared connections per upstream node and role."
            );
            metrics::describe_gauge!(
                UPSTREAM_INFLIGHT,
                "Requests sent and not yet answered per upstream node and role."
            );
            metrics::describe_gauge!(
                UPSTREAM_BREAKER_OPEN,
                "1 while a node's circuit breaker is open (no live connection; requests fail at once)."
            );
            metrics::describe_counter!(
                UPSTREAM_ERRORS,
                "Failed connects and lost or stalled shared connections per upstream node (since the node's current generation)."
            );
            metrics::describe_gauge!(TOPOLOGY_STATE, "1 for the tracker's current state.");
            metrics::describe_counter!(
                FAILOVERS,
                "Failovers followed (episodes that ended on another master)."
            );
            metrics::describe_gauge!(SLOWLOG_ENTRIES, "Entries in KEYWARD SLOWLOG.");
            metrics::describe_counter!(
                LIMIT_REACHED,
                "Times a configured bound was reached, by its config key."
            );
            metrics::describe_gauge!(
                HELD_REQUESTS,
                "Requests held while no verified master takes writes."
            );
            metrics::describe_gauge!(
                CARRIED_IN_FLIGHT,
                "Requests in flight on dedicated connections a master change would carry over (a database, subscriptions); a planned switchover waits for them."
            );
            metrics::describe_gauge!(
                TOPOLOGY_EPOCH,
                "Sentinel config epoch of the current master."
            );
            metrics::describe_gauge!(TOPOLOGY_HEALTHY, "1 while a verified master takes traffic.");
            metrics::describe_gauge!(
                UPSTREAM_GENERATION,
                "Upstream connection generation (bumps on every master change)."
            );
            metrics::describe_counter!(HOTKEY_SAMPLES, "Keys sampled for hot-key detection.");
            metrics::describe_counter!(HOTKEY_WINDOWS, "Hot-key windows rotated.");
            metrics::describe_gauge!(HOTKEYS_HOT, "Keys currently hot.");
            metrics::describe_counter!(CACHE_HITS, "Requests answered from the near cache.");
            metrics::describe_counter!(
                CACHE_MISSES,
                "Requests on hot keys the near cache could not answer."
            );
            metrics::describe_gauge!(
                CACHE_BYTES,
                "Bytes held by the near cache (cache.max_mb bounds it)."
            );
            metrics::describe_gauge!(CACHE_ENTRIES, "Replies held by the near cache.");
            metrics::describe_counter!(CACHE_FILLS, "Near-cache fills that landed.");
            metrics::describe_counter!(
                CACHE_FILLS_VOIDED,
                "Fills dropped because their key changed or the cache was flushed meanwhile."
            );
            metrics::describe_counter!(
                CACHE_INVALIDATIONS,
                "Keys invalidated (writes through keyward, Redis pushes)."
            );
            metrics::describe_counter!(
                CACHE_FLUSHES,
                "Whole-cache flushes by reason (link, flushall, topology, start, command)."
            );
            Some(handle)
        })
        .as_ref()
}

/// The Prometheus text for a scrape.
pub fn render(ctx: &Ctx) -> Option<String> {
    let handle = install()?;
    let st = &ctx.stats;
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(UPTIME).set(st.started.elapsed().as_secs_f64());
    metrics::gauge!(CLIENTS).set(ctx.clients.load(Ordering::Relaxed) as f64);
    metrics::counter!(CLIENTS_ACCEPTED).absolute(st.accepted.load(Ordering::Relaxed));
    metrics::counter!(CLIENTS_REJECTED, "reason" => "max_clients")
        .absolute(st.rejected.load(Ordering::Relaxed));
    for f in Family::ALL {
        let fs = st.family(f);
        for (result, v) in [
            ("ok", &fs.ok),
            ("error", &fs.error),
            ("relayed", &fs.relayed),
        ] {
            let v = v.load(Ordering::Relaxed);
            if v > 0 {
                metrics::counter!(REQUESTS, "family" => f.name(), "result" => result).absolute(v);
            }
        }
    }
    for k in ErrorKind::ALL {
        metrics::counter!(ERRORS, "kind" => k.name()).absolute(st.errors_of(k));
    }
    for l in Limit::ALL {
        metrics::counter!(LIMIT_REACHED, "limit" => l.key()).absolute(l.count());
    }
    metrics::counter!(BYTES_RECEIVED).absolute(st.bytes_in.load(Ordering::Relaxed));
    metrics::counter!(BYTES_SENT).absolute(st.bytes_out.load(Ordering::Relaxed));
    let max_pinned = ctx.config.upstream.max_pinned;
    metrics::gauge!(PINNED).set(max_pinned.saturating_sub(ctx.pinned.available_permits()) as f64);
    let mut nodes: Vec<(std::sync::Arc<crate::upstream::Upstream>, &'static str)> = Vec::new();
    if let Some(up) = ctx.upstream.load_full() {
        metrics::gauge!(PINNED_IDLE).set(up.parked.len() as f64);
        nodes.push((up, "master"));
    }
    for r in ctx.read_replicas.load().iter() {
        nodes.push((r.clone(), "replica"));
    }
    // A node that changed role or left (a failover) keeps its last series
    // in the registry: zero them, so only the current roles show traffic.
    static SHOWN: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let now: Vec<(String, &'static str)> = nodes
        .iter()
        .map(|(up, role)| (up.address().to_string(), *role))
        .collect();
    let mut shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner());
    for (node, role) in shown.iter().filter(|s| !now.contains(s)) {
        for name in [
            UPSTREAM_CONNECTIONS,
            UPSTREAM_INFLIGHT,
            UPSTREAM_BREAKER_OPEN,
        ] {
            metrics::gauge!(name, "node" => node.clone(), "role" => *role).set(0.0);
        }
    }
    *shown = now;
    drop(shown);
    for (up, role) in nodes {
        let node = up.address().to_string();
        let live = up.live();
        let inflight = up.pending();
        metrics::gauge!(UPSTREAM_CONNECTIONS, "node" => node.clone(), "role" => role)
            .set(live as f64);
        metrics::gauge!(UPSTREAM_INFLIGHT, "node" => node.clone(), "role" => role)
            .set(inflight as f64);
        metrics::counter!(UPSTREAM_ERRORS, "node" => node.clone(), "role" => role)
            .absolute(up.node.errors.load(Ordering::Relaxed));
        metrics::gauge!(UPSTREAM_BREAKER_OPEN, "node" => node, "role" => role)
            .set(if up.pool2.live() == 0 { 1.0 } else { 0.0 });
    }
    let state = ctx.topology.state();
    for s in crate::topology::State::ALL {
        metrics::gauge!(TOPOLOGY_STATE, "state" => s.name()).set(if s == state {
            1.0
        } else {
            0.0
        });
    }
    metrics::counter!(FAILOVERS).absolute(ctx.topology.failovers());
    metrics::gauge!(SLOWLOG_ENTRIES).set(ctx.slowlog.len() as f64);
    metrics::gauge!(HELD_REQUESTS).set(ctx.held() as f64);
    metrics::gauge!(CARRIED_IN_FLIGHT).set(
        ctx.carried_in_flight
            .load(std::sync::atomic::Ordering::Acquire) as f64,
    );
    let t = ctx.topology.snapshot();
    metrics::gauge!(TOPOLOGY_EPOCH).set(t.epoch as f64);
    metrics::gauge!(TOPOLOGY_HEALTHY).set(if ctx.current().is_some() { 1.0 } else { 0.0 });
    if let Some(up) = ctx.upstream.load_full() {
        metrics::gauge!(UPSTREAM_GENERATION).set(up.generation as f64);
    }
    if let Some(d) = &ctx.hotkeys {
        metrics::counter!(HOTKEY_SAMPLES).absolute(d.samples.load(Ordering::Relaxed));
        metrics::counter!(HOTKEY_WINDOWS).absolute(d.rotations.load(Ordering::Relaxed));
        metrics::gauge!(HOTKEYS_HOT).set(d.hot_now.load(Ordering::Relaxed) as f64);
    }
    if let Some(c) = &ctx.cache {
        metrics::counter!(CACHE_HITS).absolute(c.store.hits.load(Ordering::Relaxed) as u64);
        metrics::counter!(CACHE_MISSES).absolute(c.store.misses.load(Ordering::Relaxed) as u64);
        metrics::gauge!(CACHE_BYTES).set(c.store.bytes() as f64);
        metrics::gauge!(CACHE_ENTRIES).set(c.store.len() as f64);
        metrics::counter!(CACHE_FILLS).absolute(c.store.fills.load(Ordering::Relaxed) as u64);
        metrics::counter!(CACHE_FILLS_VOIDED)
            .absolute(c.store.fills_voided.load(Ordering::Relaxed) as u64);
        metrics::counter!(CACHE_INVALIDATIONS)
            .absolute(c.store.invalidations.load(Ordering::Relaxed) as u64);
        for r in crate::cache::store::FlushReason::ALL {
            metrics::counter!(CACHE_FLUSHES, "reason" => r.name())
                .absolute(c.store.flushes[r as usize].load(Ordering::Relaxed) as u64);
        }
    }
    let mut text = handle.render();
    render_latency(ctx, &mut text);
    Some(text)
}

/// `keyward_request_duration_seconds` per family, in the exposition format.
fn render_latency(ctx: &Ctx, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP {REQUEST_DURATION} Request latency by command family, from the read of the request to the write of its reply."
    );
    let _ = writeln!(out, "# TYPE {REQUEST_DURATION} histogram");
    for f in Family::ALL {
        let s = ctx.stats.family(f).latency.snapshot();
        let count = s.count();
        if count == 0 {
            continue;
        }
        let family = f.name();
        let mut cumulative = 0u64;
        for (i, bound) in histogram::BOUNDS_US.iter().enumerate() {
            cumulative += s.counts[i];
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{REQUEST_DURATION}_bucket{{family=\"{family}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{REQUEST_DURATION}_bucket{{family=\"{family}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{REQUEST_DURATION}_sum{{family=\"{family}\"}} {}",
            s.sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "{REQUEST_DURATION}_count{{family=\"{family}\"}} {count}"
        );
    }
}

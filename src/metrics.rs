//! Metric names and the Prometheus exposition, in one place.
//!
//! keyward keeps its counters in plain atomics next to the code that owns
//! them (the data path never calls into a metrics library); a scrape of
//! `/metrics` copies them into the Prometheus recorder and renders it.
//! Labels are bounded: never a key name.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::server::Ctx;

pub const CLIENTS: &str = "keyward_clients";
pub const HELD_REQUESTS: &str = "keyward_held_requests";
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
            metrics::describe_gauge!(CLIENTS, "Connected clients.");
            metrics::describe_gauge!(
                HELD_REQUESTS,
                "Requests held while no verified master takes writes."
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
                "Whole-cache flushes by reason (link, flushall, topology, start)."
            );
            Some(handle)
        })
        .as_ref()
}

/// The Prometheus text for a scrape.
pub fn render(ctx: &Ctx) -> Option<String> {
    let handle = install()?;
    metrics::gauge!(CLIENTS).set(ctx.clients.load(Ordering::Relaxed) as f64);
    metrics::gauge!(HELD_REQUESTS).set(ctx.held() as f64);
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
    Some(handle.render())
}

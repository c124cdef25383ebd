//! Warm-up: the cached requests (keys and commands, never values) are saved
//! to the state folder every few seconds and at shutdown; at start keyward
//! declares those keys hot and refetches them through the fill path at a
//! bounded rate, so the cache serves hits right after a restart. With the
//! fleet view on, the keys the other instances find hot now are declared
//! hot too and their GET replies fetched: a new proxy joining a fleet (or
//! one restarted without its state folder) starts warm.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::NearCache;
use crate::server::Ctx;

/// How often the list is saved.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Saved requests at most.
const MAX_SAVED: usize = 10_000;

fn file(dir: &str) -> PathBuf {
    Path::new(dir).join("near-cache.json")
}

/// Load, warm, then save periodically until shutdown (and once more then).
pub async fn run(ctx: Arc<Ctx>, cache: Arc<NearCache>) {
    let dir = cache.config.state_dir.clone();
    let saved = if dir.is_empty() {
        Vec::new()
    } else {
        load(&file(&dir))
    };
    let fleet = ctx.hotkeys.as_ref().is_some_and(|d| d.config.fleet);
    if !saved.is_empty() || fleet {
        warm(&ctx, &cache, saved, fleet).await;
    }
    cache.warm.store(true, Ordering::Release);
    if dir.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(SAVE_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                save(&cache, &dir);
                return;
            }
            _ = tick.tick() => save(&cache, &dir),
        }
    }
}

async fn warm(ctx: &Ctx, cache: &NearCache, mut saved: Vec<(Bytes, Bytes)>, fleet: bool) {
    let Some(d) = &ctx.hotkeys else { return };
    let started = std::time::Instant::now();
    d.seed_hot(
        saved
            .iter()
            .map(|(k, _)| k.to_vec().into_boxed_slice())
            .collect(),
    );
    // Fills need the tracking link.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(cache.config.warmup_ready_ms.max(1000));
    while !cache.link_up.load(Ordering::Acquire) {
        if tokio::time::Instant::now() > deadline || ctx.shutdown.is_cancelled() {
            tracing::warn!("near cache warm-up skipped: no tracking link");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if fleet {
        let from_fleet = fleet_hot(ctx, &saved).await;
        d.seed_hot(
            from_fleet
                .iter()
                .map(|(k, _)| k.to_vec().into_boxed_slice())
                .collect(),
        );
        saved.extend(from_fleet);
    }
    let per_fill = Duration::from_secs_f64(1.0 / cache.config.warmup_rate.max(1) as f64);
    let mut pace = tokio::time::interval(per_fill);
    let mut started_fills = 0;
    for (key, request) in &saved {
        // Only what keyward saves: one cacheable request, after `SELECT n`
        // outside database 0 (a list edited by hand may hold anything).
        let Some((db, _)) = super::split_store_key(request) else {
            continue;
        };
        pace.tick().await;
        if cache.fill(key.clone(), request.clone(), db) {
            started_fills += 1;
        }
    }
    // Wait (bounded) for the fills to land, so /ready means warm.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(cache.config.warmup_ready_ms);
    while cache.store.len() < started_fills && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(
        saved = saved.len(),
        filled = cache.store.len(),
        ms = started.elapsed().as_millis() as u64,
        "near cache warmed from the saved list"
    );
}

/// The fleet's hot keys not already in `saved`, each with its GET request.
async fn fleet_hot(ctx: &Ctx, saved: &[(Bytes, Bytes)]) -> Vec<(Bytes, Bytes)> {
    // The other instances answer this one's ask within a round trip; a
    // window's worth of waiting covers one that only speaks every window.
    if let (Some(f), Some(d)) = (&ctx.fleet, &ctx.hotkeys) {
        f.settled(Duration::from_millis(d.config.window_ms.saturating_mul(2)))
            .await;
    }
    let entries = match crate::hotkey::fleet::read(ctx).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "near cache warm-up: fleet hot set unavailable");
            return Vec::new();
        }
    };
    let known: std::collections::HashSet<&[u8]> = saved.iter().map(|(k, _)| k.as_ref()).collect();
    entries
        .into_iter()
        .filter(|e| e.hot && !known.contains(e.key.as_slice()))
        .take(MAX_SAVED.saturating_sub(saved.len()))
        .map(|e| {
            let mut req = bytes::BytesMut::new();
            crate::resp::reply::command(&mut req, &[b"GET", &e.key]);
            (Bytes::from(e.key), req.freeze())
        })
        .collect()
}

fn load(path: &Path) -> Vec<(Bytes, Bytes)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(pairs) = serde_json::from_str::<Vec<(String, String)>>(&text) else {
        tracing::warn!(path = %path.display(), "near cache: saved list unreadable; starting cold");
        return Vec::new();
    };
    pairs
        .into_iter()
        .filter_map(|(k, r)| {
            Some((
                Bytes::from(crate::hex::decode(&k)?),
                Bytes::from(crate::hex::decode(&r)?),
            ))
        })
        .take(MAX_SAVED)
        .collect()
}

fn save(cache: &NearCache, dir: &str) {
    let pairs: Vec<(String, String)> = cache
        .store
        .requests()
        .into_iter()
        .take(MAX_SAVED)
        .map(|(k, r)| (crate::hex::encode(&k), crate::hex::encode(&r)))
        .collect();
    let path = file(dir);
    let tmp = path.with_extension("json.tmp");
    let res = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, serde_json::to_vec(&pairs).unwrap_or_default()))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "near cache: cannot save the warm-up list");
    }
}

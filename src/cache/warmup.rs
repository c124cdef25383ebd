//! Warm-up: the cached requests (keys and commands, never values) are saved
//! to the state folder every few seconds and at shutdown; at start keyward
//! declares those keys hot and refetches them through the fill path at a
//! bounded rate, so the cache serves hits right after a restart.

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
    if dir.is_empty() {
        cache.warm.store(true, Ordering::Release);
        return;
    }
    let saved = load(&file(&dir));
    if !saved.is_empty() {
        warm(&ctx, &cache, saved).await;
    }
    cache.warm.store(true, Ordering::Release);
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

async fn warm(ctx: &Ctx, cache: &NearCache, saved: Vec<(Bytes, Bytes)>) {
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
    let per_fill = Duration::from_secs_f64(1.0 / cache.config.warmup_rate.max(1) as f64);
    let mut pace = tokio::time::interval(per_fill);
    let mut started_fills = 0;
    for (key, request) in &saved {
        pace.tick().await;
        if cache.fill(key.clone(), request.clone()) {
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

//! The fleet view: every keyward in front of the same Redis publishes its
//! window summary there, and any of them can merge all live summaries.
//!
//! Summaries live in one Redis hash (`hotkeys.fleet_key`), a field per
//! instance holding `{"id","at_ms","window_ms","keys":[[hex key, rate],...]}`;
//! the hash's TTL is refreshed on every write, and readers ignore (and
//! remove) fields older than three windows, so instances that stopped drop
//! out on their own. Rates add up across instances: a key that is warm on
//! each of several proxies and hot in total shows up hot here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::types::OwnedFrame;
use serde::Serialize;

use crate::resp::{reply, Proto};
use crate::server::{Ctx, Sent};
use crate::topology::now_ms;

/// One key of the merged fleet view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetEntry {
    #[serde(serialize_with = "key_text")]
    pub key: Vec<u8>,
    /// Sum of the instances' estimated ops/s.
    pub rate: u64,
    /// Instances reporting the key.
    pub instances: usize,
    pub hot: bool,
}

fn key_text<S: serde::Serializer>(k: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(k))
}

#[derive(serde::Deserialize, Serialize)]
struct Summary {
    id: String,
    at_ms: u64,
    window_ms: u64,
    keys: Vec<(String, u64)>,
}

/// This process's fleet identity.
pub fn instance_id(ctx: &Ctx) -> String {
    format!("{}-{}", ctx.config.server.listen, std::process::id())
}

/// Send one command of keyward's own through the shared pool.
async fn call(ctx: &Ctx, args: &[&[u8]]) -> Result<OwnedFrame, String> {
    let mut out = BytesMut::new();
    reply::command(&mut out, args);
    let rx = match ctx.send(Proto::Resp2, 0, 0, &out, 1, None, 0).await {
        Ok(Sent::Queued(_, rx)) => rx,
        Ok(Sent::Moved(_)) => return Err("master changed".into()),
        Err(e) => return Err(e.resp_text()),
    };
    let bytes = rx
        .await
        .map_err(|_| "upstream dropped the request".to_string())?
        .map_err(|e| e.error.resp_text())?
        .bytes;
    match redis_protocol::resp2::decode::decode(&bytes) {
        Ok(Some((OwnedFrame::Error(e), _))) => Err(e),
        Ok(Some((f, _))) => Ok(f),
        _ => Err("undecodable reply".into()),
    }
}

/// Publish this instance's last window every window, until shutdown.
pub async fn run(ctx: Arc<Ctx>) {
    let Some(d) = ctx.hotkeys.clone() else { return };
    let window = Duration::from_millis(d.config.window_ms);
    let mut tick = tokio::time::interval(window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let id = instance_id(&ctx);
    let key = d.config.fleet_key.clone();
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = d.snapshot();
        if snap.windows == 0 {
            continue;
        }
        let summary = Summary {
            id: id.clone(),
            at_ms: now_ms(),
            window_ms: snap.window_ms,
            keys: snap
                .keys
                .iter()
                .filter(|e| e.rate > 0)
                .map(|e| (crate::hex::encode(&e.key), e.rate))
                .collect(),
        };
        let json = serde_json::to_string(&summary).unwrap_or_default();
        let ttl = (3 * d.config.window_ms).to_string();
        let res = async {
            call(
                &ctx,
                &[b"HSET", key.as_bytes(), id.as_bytes(), json.as_bytes()],
            )
            .await?;
            call(&ctx, &[b"PEXPIRE", key.as_bytes(), ttl.as_bytes()]).await
        }
        .await;
        match res {
            Ok(_) => last_error.clear(),
            Err(e) if e != last_error => {
                tracing::warn!(error = %e, key = %key, "cannot publish the hot-key summary");
                last_error = e;
            }
            Err(_) => {}
        }
    }
}

/// Merge every live instance's summary.
pub async fn read(ctx: &Ctx) -> Result<Vec<FleetEntry>, String> {
    let Some(d) = &ctx.hotkeys else {
        return Err("hot-key detection is disabled (hotkeys.enabled = false)".into());
    };
    let key = d.config.fleet_key.as_bytes();
    let frame = call(ctx, &[b"HGETALL", key]).await?;
    let OwnedFrame::Array(items) = frame else {
        return Err("unexpected HGETALL reply".into());
    };
    let now = now_ms();
    let mut merged: HashMap<Vec<u8>, (u64, usize)> = HashMap::new();
    let mut stale = Vec::new();
    for pair in items.chunks(2) {
        let [OwnedFrame::BulkString(field), OwnedFrame::BulkString(value)] = pair else {
            continue;
        };
        let Ok(s) = serde_json::from_slice::<Summary>(value) else {
            continue;
        };
        if now.saturating_sub(s.at_ms) > 3 * s.window_ms.max(1) {
            stale.push(field.clone());
            continue;
        }
        for (k, rate) in s.keys {
            if let Some(k) = crate::hex::decode(&k) {
                let e = merged.entry(k).or_default();
                e.0 += rate;
                e.1 += 1;
            }
        }
    }
    if !stale.is_empty() {
        let mut args: Vec<&[u8]> = vec![b"HDEL", key];
        args.extend(stale.iter().map(|f| f.as_slice()));
        let _ = call(ctx, &args).await;
    }
    let mut out: Vec<FleetEntry> = merged
        .into_iter()
        .map(|(key, (rate, instances))| FleetEntry {
            hot: rate >= d.config.threshold,
            key,
            rate,
            instances,
        })
        .collect();
    out.sort_by(|a, b| b.rate.cmp(&a.rate).then_with(|| a.key.cmp(&b.key)));
    Ok(out)
}

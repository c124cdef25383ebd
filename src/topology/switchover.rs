//! Planned switchover (`KEYWARD FAILOVER`, `POST /failover`): move the
//! master to a replica with no client error and no lost write.
//!
//! Steps: hold every new request; wait until the requests already sent have
//! their replies (those on dedicated connections that will be carried to
//! the new master too); `CLIENT PAUSE WRITE` on the old master so nothing else
//! writes to it; wait until a replica's replication offset has reached the
//! master's; `SENTINEL FAILOVER`; wait until the tracker has verified and
//! adopted the new master; release the held requests. Clients see a latency
//! blip. The old master is unpaused at the end whatever happened, and the
//! pause itself expires after `sentinel.hold_ms` as a safety net.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::sentinel::{decode, fields, items, role};
use super::State;
use crate::resp::Proto;
use crate::server::Ctx;
use crate::upstream::{connector, Settings};

/// What a completed switchover did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub old: String,
    pub new: String,
    /// How long new requests were held.
    pub held_ms: u64,
}

static RUNNING: AtomicBool = AtomicBool::new(false);

struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Run a planned switchover; the error text says which step failed.
pub async fn planned(ctx: Arc<Ctx>) -> Result<Outcome, String> {
    if !ctx.config.uses_sentinel() {
        return Err("KEYWARD FAILOVER needs Sentinel (sentinel.addresses is empty)".into());
    }
    if RUNNING.swap(true, Ordering::AcqRel) {
        return Err("a switchover is already running".into());
    }
    let _running = Running;
    let t = ctx.topology.snapshot();
    let (Some(old), State::Healthy) = (t.master.clone(), t.state) else {
        return Err(format!(
            "no healthy master to switch from (state: {})",
            t.state.name()
        ));
    };
    let started = Instant::now();
    tracing::info!(master = %old, "planned switchover: holding requests");
    ctx.set_hold_all(true);
    let upstream = settings(&ctx, &old);
    let result = steps(&ctx, &old, &upstream).await;
    // Best effort: the old master is a replica now (or still the master if
    // the failover failed); either way it must not stay paused.
    if let Ok(mut s) = connector::connect(&upstream, Proto::Resp2).await {
        let _ = connector::call(&mut s, &[b"CLIENT", b"UNPAUSE"]).await;
    }
    ctx.set_hold_all(false);
    let held_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(new) => {
            tracing::info!(old = %old, new = %new, held_ms, "planned switchover done");
            Ok(Outcome { old, new, held_ms })
        }
        Err(e) => {
            let now = ctx.topology.snapshot().master.clone().unwrap_or_default();
            tracing::warn!(master = %now, error = %e, held_ms, "planned switchover failed; traffic resumes");
            Err(e)
        }
    }
}

/// An error if keyward no longer follows `old`: the Sentinels failed over
/// by themselves (the master stopped answering) while the switchover ran,
/// and there is nothing left to switch from.
fn moved(ctx: &Ctx, old: &str) -> Result<(), String> {
    let t = ctx.topology.snapshot();
    match (&t.master, t.state) {
        (Some(m), _) if m != old => Err(format!(
            "the master changed to {m} while the switchover ran (the sentinels failed over \
             by themselves); no switchover was made"
        )),
        (_, State::Fenced | State::Switching) => Err(format!(
            "the sentinels are failing {old} over by themselves (state: {}); no switchover was made",
            t.state.name()
        )),
        _ => Ok(()),
    }
}

fn settings(ctx: &Ctx, address: &str) -> Settings {
    let timeout = Duration::from_millis(ctx.config.sentinel.timeout_ms);
    Settings {
        address: address.to_string(),
        username: ctx.config.upstream.username.clone(),
        password: ctx.config.upstream.password.clone(),
        connect_timeout: timeout,
        command_timeout: timeout,
    }
}

async fn steps(ctx: &Arc<Ctx>, old: &str, upstream: &Settings) -> Result<String, String> {
    let hold = Duration::from_millis(ctx.config.sentinel.hold_ms);
    // 1. Replies for everything already sent (on the shared pools, and on
    // the dedicated connections that will be carried over).
    let deadline = Instant::now() + ctx.config.command_timeout();
    let carried = &ctx.carried_in_flight;
    if let Some(up) = ctx.upstream.load_full() {
        while up.pending() + carried.load(Ordering::Acquire) > 0 {
            moved(ctx, old)?;
            if Instant::now() > deadline {
                return Err(
                    "requests in flight did not finish within upstream.command_timeout_ms".into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // 2. Nothing else may write to the old master.
    let mut conn = connector::connect(upstream, Proto::Resp2)
        .await
        .map_err(|e| format!("cannot reach the master: {}", e.detail))?;
    let pause_ms = hold.as_millis().to_string();
    let reply = connector::call(
        &mut conn,
        &[b"CLIENT", b"PAUSE", pause_ms.as_bytes(), b"WRITE"],
    )
    .await
    .map_err(|e| format!("CLIENT PAUSE failed: {}", e.detail))?;
    decode(&reply).map_err(|e| format!("CLIENT PAUSE refused: {}", e.detail))?;
    moved(ctx, old)?;
    // 3. Every replica the Sentinels could promote has everything the
    // master has: SENTINEL FAILOVER picks by its own view (priority, its
    // last INFO), not the one that caught up.
    let candidates = promotable(ctx).await?;
    if candidates.is_empty() {
        return Err("the sentinels know no replica they could promote".into());
    }
    let caught_up = Instant::now() + Duration::from_secs(2).min(hold);
    loop {
        let info = connector::call(&mut conn, &[b"INFO", b"replication"])
            .await
            .map_err(|e| format!("INFO replication failed: {}", e.detail))?;
        let text = String::from_utf8_lossy(&info);
        let master_offset: u64 = field(&text, "master_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let online = online_offsets(&text);
        let behind: Vec<&String> = candidates
            .iter()
            .filter(|c| online.get(c.as_str()).is_none_or(|o| *o < master_offset))
            .collect();
        if behind.is_empty() {
            break;
        }
        moved(ctx, old)?;
        if Instant::now() > caught_up {
            return Err(format!(
                "replica(s) {} the sentinels could promote did not catch up with the master's \
                 offset {master_offset} within 2 s (not connected, or lagging)",
                behind
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // 4. Ask the Sentinels to promote it.
    let name = ctx.config.sentinel.master_name.clone();
    let mut asked = Err("no sentinel reachable".to_string());
    let sentinels: Vec<String> = ctx
        .topology
        .snapshot()
        .sentinels
        .iter()
        .map(|s| s.address.clone())
        .collect();
    for addr in sentinels {
        let mut s = settings(ctx, &addr);
        s.username = ctx.config.sentinel.username.clone();
        s.password = ctx.config.sentinel.password.clone();
        let Ok(mut c) = connector::connect(&s, Proto::Resp2).await else {
            continue;
        };
        match connector::call(&mut c, &[b"SENTINEL", b"FAILOVER", name.as_bytes()]).await {
            Ok(r) => match decode(&r) {
                Ok(_) => {
                    asked = Ok(());
                    break;
                }
                Err(e) => asked = Err(format!("SENTINEL FAILOVER refused by {addr}: {}", e.detail)),
            },
            Err(e) => asked = Err(format!("SENTINEL FAILOVER failed on {addr}: {}", e.detail)),
        }
    }
    asked?;
    // 5. The tracker adopts the new master (ROLE verified).
    let deadline = tokio::time::Instant::now() + hold;
    let mut changed = ctx.topology.subscribe();
    loop {
        let t = ctx.topology.snapshot();
        if let (Some(m), State::Healthy) = (&t.master, t.state) {
            if m != old && matches!(role(upstream, m).await.as_deref(), Ok("master")) {
                return Ok(m.clone());
            }
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            return Err(format!(
                "the new master was not adopted within {} ms (sentinel.hold_ms)",
                hold.as_millis()
            ));
        }
    }
}

/// Online replicas' offsets from the master's `INFO replication`, by
/// `ip:port` (`slave0:ip=...,port=...,state=online,offset=...,lag=...`).
fn online_offsets(info: &str) -> std::collections::HashMap<String, u64> {
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
        .filter_map(|l| {
            let (_, kvs) = l.split_once(':')?;
            let get = |k: &str| kvs.split(',').find_map(|kv| kv.strip_prefix(k));
            let addr = format!("{}:{}", get("ip=")?, get("port=")?);
            Some((addr, get("offset=")?.trim().parse().ok()?))
        })
        .collect()
}

/// The replicas a Sentinel could promote, as the first reachable one sees
/// them: not down or disconnected, priority not 0, and a link to the master
/// not down longer than Sentinel's own cut-off (10 x down-after-milliseconds).
async fn promotable(ctx: &Ctx) -> Result<Vec<String>, String> {
    let name = ctx.config.sentinel.master_name.as_bytes();
    let mut last = "no sentinel reachable".to_string();
    for s in ctx.topology.snapshot().sentinels.iter() {
        let mut settings = settings(ctx, &s.address);
        settings.username = ctx.config.sentinel.username.clone();
        settings.password = ctx.config.sentinel.password.clone();
        let Ok(mut c) = connector::connect(&settings, Proto::Resp2).await else {
            continue;
        };
        let asked = async {
            let master = decode(&connector::call(&mut c, &[b"SENTINEL", b"MASTER", name]).await?)?;
            let replicas =
                decode(&connector::call(&mut c, &[b"SENTINEL", b"REPLICAS", name]).await?)?;
            Ok::<_, crate::error::Error>((master, replicas))
        };
        match asked.await {
            Ok((master, replicas)) => {
                let down_after: u64 = fields(&master)
                    .get("down-after-milliseconds")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(30_000);
                return Ok(items(&replicas)
                    .iter()
                    .map(fields)
                    .filter(|f| eligible(f, down_after))
                    .filter_map(|f| Some(format!("{}:{}", f.get("ip")?, f.get("port")?)))
                    .collect());
            }
            Err(e) => last = format!("{}: {}", s.address, e.detail),
        }
    }
    Err(format!("cannot ask the sentinels for the replicas: {last}"))
}

/// Could Sentinel promote this replica (`SENTINEL REPLICAS` fields)?
fn eligible(f: &std::collections::BTreeMap<String, String>, down_after_ms: u64) -> bool {
    let flags = f.get("flags").map(String::as_str).unwrap_or("");
    let bad = flags
        .split(',')
        .any(|x| matches!(x, "s_down" | "o_down" | "disconnected"));
    let priority: u64 = f
        .get("slave-priority")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100);
    let link_down_ms: u64 = f
        .get("master-link-down-time")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    !bad && priority != 0 && link_down_ms <= down_after_ms * 10
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_replica_offsets_by_address() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
slave0:ip=127.0.0.1,port=7001,state=online,offset=120,lag=0\r\n\
slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
master_repl_offset:120\r\n";
        let o = online_offsets(info);
        assert_eq!(o.get("127.0.0.1:7001"), Some(&120));
        assert_eq!(o.len(), 1, "{o:?}");
    }

    #[test]
    fn replicas_sentinel_could_promote() {
        let f = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = f(&[
            ("flags", "slave"),
            ("slave-priority", "100"),
            ("master-link-down-time", "0"),
        ]);
        assert!(eligible(&ok, 1000));
        // A link down for 160 ms: Sentinel may still pick it.
        assert!(eligible(
            &f(&[("flags", "slave"), ("master-link-down-time", "160")]),
            1000
        ));
        assert!(!eligible(&f(&[("flags", "slave,s_down")]), 1000));
        assert!(!eligible(&f(&[("flags", "slave,disconnected")]), 1000));
        assert!(!eligible(
            &f(&[("flags", "slave"), ("slave-priority", "0")]),
            1000
        ));
        assert!(!eligible(
            &f(&[("flags", "slave"), ("master-link-down-time", "10001")]),
            1000
        ));
    }
}

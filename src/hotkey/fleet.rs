//! The fleet view: every keyward in front of the same Redis publishes its
//! window summary on one pub/sub channel (`hotkeys.fleet_channel`), and each
//! listens there and merges the live summaries with its own.
//!
//! A channel, not a key: nothing lands in the clients' keyspace (DBSIZE,
//! KEYS, SCAN, RANDOMKEY, persistence and replication see nothing of it),
//! and a FLUSHALL cannot wipe it. Messages are JSON: a summary
//! `{"id","at_ms","window_ms","keys":[[hex key, rate],...]}` every window,
//! or `{"ask":"<id>"}` from an instance that just subscribed, which every
//! other instance answers at once with its summary, so a new proxy learns
//! the fleet's hot keys within a round trip instead of a window (the
//! near cache's warm-up uses that). An instance's summary counts while it
//! is younger than three windows by the listener's clock (clocks of other
//! hosts are not compared), so instances that stopped drop out on their
//! own. Rates add up across instances: a key that is warm on each of
//! several proxies and hot in total shows up hot here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::resp::scan::{elements, parse_int, string_of};
use crate::resp::{Proto, Scanner};
use crate::server::Ctx;
use crate::topology::now_ms;
use crate::upstream::connector;

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

/// A message on the channel: a summary, or an ask.
#[derive(serde::Deserialize, Serialize, Default)]
struct Message {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    id: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    at_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    window_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    ask: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Another instance's last summary.
struct Seen {
    at: Instant,
    window: Duration,
    keys: Vec<(Vec<u8>, u64)>,
}

/// The link's state before the first try.
const NOT_YET: &str = "not subscribed yet";

/// This process's part in the fleet: what the others said, and the state
/// of its subscription.
pub struct Fleet {
    pub channel: String,
    /// This instance, as other instances see it.
    pub id: String,
    others: Mutex<HashMap<String, Seen>>,
    /// Subscribed now, or why not.
    link: Mutex<Result<(), String>>,
    /// Instances besides this one that heard its last ask (PUBLISH's count).
    expected: Mutex<Option<usize>>,
    /// Another instance asked: publish now.
    asked: tokio::sync::Notify,
    /// A summary arrived, or the link changed.
    changed: tokio::sync::Notify,
    /// keyward's own connection for PUBLISH (see `publish`).
    publisher: tokio::sync::Mutex<Option<Publisher>>,
}

/// A connection for PUBLISH on one master (by its generation): one
/// request at a time, each read back before the next.
struct Publisher {
    generation: u64,
    stream: tokio::net::TcpStream,
}

impl Fleet {
    pub fn new(channel: String, id: String) -> Fleet {
        Fleet {
            channel,
            id,
            others: Mutex::new(HashMap::new()),
            link: Mutex::new(Err(NOT_YET.into())),
            expected: Mutex::new(None),
            asked: tokio::sync::Notify::new(),
            changed: tokio::sync::Notify::new(),
            publisher: tokio::sync::Mutex::new(None),
        }
    }

    fn set_link(&self, state: Result<(), String>) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = state;
        self.changed.notify_waiters();
    }

    fn link(&self) -> Result<(), String> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The link's state, after its first try if that is under way (at
    /// most `limit`): right after start the view is a moment away, not
    /// unavailable.
    async fn first_link(&self, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            match self.link() {
                Err(e) if e == NOT_YET => {}
                state => return state,
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.link();
            }
        }
    }

    /// Apply one message's payload from the channel.
    fn on_message(&self, payload: &[u8]) {
        let Ok(m) = serde_json::from_slice::<Message>(payload) else {
            return;
        };
        if !m.ask.is_empty() {
            if m.ask != self.id {
                self.asked.notify_one();
            }
            return;
        }
        if m.id.is_empty() || m.id == self.id {
            return;
        }
        let keys = m
            .keys
            .into_iter()
            .filter_map(|(k, rate)| Some((crate::hex::decode(&k)?, rate)))
            .collect();
        let seen = Seen {
            at: Instant::now(),
            window: Duration::from_millis(m.window_ms.max(1)),
            keys,
        };
        let mut others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        others.insert(m.id, seen);
        // Bounded: instances that stopped are dropped as new ones speak.
        others.retain(|_, s| s.at.elapsed() <= 3 * s.window);
        drop(others);
        self.changed.notify_waiters();
    }

    /// Wait (at most `limit`) until subscribed and every instance that heard
    /// the ask has answered: the view is then as complete as it gets.
    pub async fn settled(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            let heard = self.others.lock().map(|o| o.len()).unwrap_or(0);
            let expected = *self.expected.lock().unwrap_or_else(|e| e.into_inner());
            if self.link().is_ok() && expected.is_some_and(|n| heard >= n) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }
}

/// This process's fleet identity.
pub fn instance_id(listen: &str) -> String {
    format!("{listen}-{}", std::process::id())
}

/// PUBLISH on the fleet channel; how many subscribers heard it. On a
/// connection of keyward's own, not the clients' shared one: Redis holds a
/// PUBLISH back under `CLIENT PAUSE WRITE`, and the clients' reads queued
/// behind it on a shared connection would wait (and fail at the command
/// timeout) with it, though no client wrote anything.
async fn publish(ctx: &Ctx, fleet: &Fleet, m: &Message) -> Result<usize, String> {
    let json = serde_json::to_string(m).unwrap_or_default();
    // Through a failover's hold, as the clients' requests wait.
    let up = ctx.upstream(1, 0).await.map_err(|e| e.resp_text())?;
    let settings = &up.node.settings;
    let mut link = fleet.publisher.lock().await;
    if link.as_ref().is_some_and(|l| l.generation != up.generation) {
        *link = None;
    }
    let p = match link.as_mut() {
        Some(p) => p,
        None => link.insert(Publisher {
            generation: up.generation,
            stream: connector::connect(settings, Proto::Resp2)
                .await
                .map_err(|e| e.resp_text())?,
        }),
    };
    let args: [&[u8]; 3] = [b"PUBLISH", fleet.channel.as_bytes(), json.as_bytes()];
    let exchange = connector::call(&mut p.stream, &args);
    let reply = match tokio::time::timeout(settings.command_timeout, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            *link = None;
            return Err(e.resp_text());
        }
        Err(_) => {
            // Held back (a pause) or lost: the reply may still come, so the
            // connection is not used again.
            *link = None;
            return Err(format!(
                "{}: no reply for {} ms (upstream.command_timeout_ms)",
                settings.address,
                settings.command_timeout.as_millis()
            ));
        }
    };
    if reply.first() == Some(&b'-') {
        return Err(String::from_utf8_lossy(reply.trim_ascii_end()[1..].as_ref()).into());
    }
    let n = reply
        .strip_prefix(b":")
        .and_then(|r| parse_int(r.trim_ascii_end()))
        .ok_or("unexpected PUBLISH reply")?;
    Ok(n.max(0) as usize)
}

/// Publish this instance's last window every window, and when another
/// instance asks, until shutdown.
pub async fn run(ctx: Arc<Ctx>) {
    let (Some(d), Some(fleet)) = (ctx.hotkeys.clone(), ctx.fleet.clone()) else {
        return;
    };
    tokio::spawn(listen(ctx.clone(), fleet.clone()));
    let window = Duration::from_millis(d.config.window_ms);
    let mut tick = tokio::time::interval(window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    let mut last_sent: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = fleet.asked.notified() => {
                // Answer asks at most ten times a window: a crowd starting
                // together must not turn into a storm.
                if last_sent.is_some_and(|t| t.elapsed() < window / 10) {
                    continue;
                }
            }
        }
        let snap = d.snapshot();
        if snap.windows == 0 {
            continue;
        }
        let summary = Message {
            id: fleet.id.clone(),
            at_ms: now_ms(),
            window_ms: snap.window_ms,
            keys: snap
                .keys
                .iter()
                .filter(|e| e.rate > 0)
                .map(|e| (crate::hex::encode(&e.key), e.rate))
                .collect(),
            ..Message::default()
        };
        last_sent = Some(Instant::now());
        match publish(&ctx, &fleet, &summary).await {
            Ok(_) => last_error.clear(),
            Err(e) if e != last_error => {
                tracing::warn!(error = %e, channel = %fleet.channel, "cannot publish the hot-key summary");
                last_error = e;
            }
            Err(_) => {}
        }
    }
}

/// Stay subscribed to the fleet channel on the current master.
async fn listen(ctx: Arc<Ctx>, fleet: Arc<Fleet>) {
    let mut changed = ctx.topology.subscribe();
    let window = ctx.hotkeys.as_ref().map_or(Duration::from_secs(1), |d| {
        Duration::from_millis(d.config.window_ms)
    });
    let mut last_error = String::new();
    // Short after a link that was up (a summary lives three windows), and
    // doubled after each try that never got subscribed (a refusal by the
    // ACL would otherwise reconnect ten times a second for ever).
    const FIRST: Duration = Duration::from_millis(100);
    let mut pause = FIRST;
    loop {
        let up = loop {
            if let Some(up) = ctx.current() {
                break up;
            }
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = changed.changed() => {}
            }
        };
        let why = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            why = session(&ctx, &fleet, &up.node.settings, window) => why,
            _ = async {
                while changed.changed().await.is_ok()
                    && ctx.current().map(|u| u.generation) == Some(up.generation)
                {}
            } => "the master changed".to_string(),
        };
        let was_up = fleet.link().is_ok();
        fleet.set_link(Err(why.clone()));
        if why != last_error {
            tracing::warn!(error = %why, channel = %fleet.channel, "fleet hot-key channel lost");
            last_error = why;
        }
        pause = if was_up {
            FIRST
        } else {
            (pause * 2).min(Duration::from_secs(30))
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One subscription's life; why it ended.
async fn session(
    ctx: &Ctx,
    fleet: &Fleet,
    settings: &connector::Settings,
    window: Duration,
) -> String {
    let channel = fleet.channel.as_bytes();
    let mut stream = match connector::connect(settings, Proto::Resp2).await {
        Ok(s) => s,
        Err(e) => return e.resp_text(),
    };
    let (mut buf, mut scanner) = (BytesMut::with_capacity(4096), Scanner::new());
    if let Err(e) = connector::send(&mut stream, &[b"SUBSCRIBE", channel]).await {
        return e.resp_text();
    }
    match connector::read_frame(&mut stream, &mut buf, &mut scanner).await {
        Ok(f) if f.starts_with(b"*") => {}
        Ok(f) => {
            return format!(
                "SUBSCRIBE {}: {}",
                fleet.channel,
                String::from_utf8_lossy(f.trim_ascii_end())
            )
        }
        Err(e) => return e.resp_text(),
    }
    // Ask the others for their summaries now, and learn how many there are.
    let ask = Message {
        ask: fleet.id.clone(),
        ..Message::default()
    };
    match publish(ctx, fleet, &ask).await {
        Ok(n) => {
            *fleet.expected.lock().unwrap_or_else(|e| e.into_inner()) = Some(n.saturating_sub(1));
            fleet.set_link(Ok(()));
            tracing::info!(channel = %fleet.channel, "fleet hot-key channel subscribed");
        }
        Err(e) => return format!("PUBLISH {}: {e}", fleet.channel),
    }
    // A silent dead link is found by its unanswered PING.
    let mut tick = tokio::time::interval(window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_owed = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if ping_owed {
                    return format!("no reply to PING within {} ms", window.as_millis());
                }
                if let Err(e) = stream.write_all(b"*1\r\n$4\r\nPING\r\n").await {
                    return e.to_string();
                }
                ping_owed = true;
            }
            f = connector::read_frame(&mut stream, &mut buf, &mut scanner) => {
                let f = match f {
                    Ok(f) => f,
                    Err(e) => return e.resp_text(),
                };
                let mut e = elements(&f);
                match e.next().and_then(string_of) {
                    Some(b"message") => {
                        if let Some(payload) = e.nth(1).and_then(string_of) {
                            fleet.on_message(payload);
                        }
                    }
                    Some(b"pong") => ping_owed = false,
                    _ => {}
                }
            }
        }
    }
}

/// Merge this instance's summary with every live one the others published.
pub async fn read(ctx: &Ctx) -> Result<Vec<FleetEntry>, String> {
    let Some(d) = &ctx.hotkeys else {
        return Err("hot-key detection is disabled (hotkeys.enabled = false)".into());
    };
    let Some(fleet) = &ctx.fleet else {
        return Err("the fleet view is off (hotkeys.fleet = false)".into());
    };
    fleet
        .first_link(Duration::from_secs(2))
        .await
        .map_err(|e| format!("not subscribed to '{}': {e}", fleet.channel))?;
    let mut merged: HashMap<Vec<u8>, (u64, usize)> = HashMap::new();
    let mine = d.snapshot();
    for e in mine.keys.iter().filter(|e| e.rate > 0) {
        merged.insert(e.key.to_vec(), (e.rate, 1));
    }
    {
        let others = fleet.others.lock().unwrap_or_else(|e| e.into_inner());
        for s in others.values().filter(|s| s.at.elapsed() <= 3 * s.window) {
            for (k, rate) in &s.keys {
                let e = merged.entry(k.clone()).or_default();
                e.0 += rate;
                e.1 += 1;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_others_count_and_asks_are_answered() {
        let f = Fleet::new("ch".into(), "me".into());
        f.on_message(br#"{"ask":"me"}"#);
        f.on_message(br#"{"id":"me","window_ms":1000,"keys":[["6b",5]]}"#);
        f.on_message(b"not json");
        assert!(f.others.lock().unwrap().is_empty());
        f.on_message(br#"{"id":"b","at_ms":1,"window_ms":1000,"keys":[["6b",7],["zz",1]]}"#);
        let others = f.others.lock().unwrap();
        // The key that is not hex is skipped, the other kept.
        assert_eq!(others["b"].keys, vec![(b"k".to_vec(), 7)]);
        drop(others);
        // Another instance's ask wakes the publisher.
        f.on_message(br#"{"ask":"b"}"#);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), f.asked.notified())
                .await
                .expect("the ask is answered");
        });
    }

    #[test]
    fn a_summary_round_trips_and_an_ask_is_small() {
        let ask = Message {
            ask: "x".into(),
            ..Message::default()
        };
        assert_eq!(serde_json::to_string(&ask).unwrap(), r#"{"ask":"x"}"#);
        let s = Message {
            id: "a".into(),
            at_ms: 2,
            window_ms: 1000,
            keys: vec![("6b".into(), 3)],
            ..Message::default()
        };
        let back: Message = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(
            (back.id, back.keys),
            ("a".to_string(), vec![("6b".to_string(), 3)])
        );
    }
}

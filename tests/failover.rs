//! keyward in Sentinel mode, as a Redis client sees it through a failover:
//! keyward finds the master by asking the Sentinels (no `--upstream`), moves
//! writes to the new master after a planned failover or a master crash,
//! never acknowledges a write that is then lost (a write accepted by the old
//! master after the switch would be), never sends a write to a node that
//! answers `-READONLY`, and answers every request within a bounded time,
//! with `+OK` or a clear error, while no master is available.
//!
//! Each test runs a real master, a replica and three real sentinels
//! (tests/support/sentinel.rs). `sentinel_kit_starts_and_fails_over` checks
//! that kit on its own, without keyward.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A request through keyward must be answered within this long, even while
/// there is no master: a hold that outlasts it counts as a hang.
const REPLY_LIMIT: Duration = Duration::from_secs(8);

/// After the Sentinels agree on a new master, keyward must take writes
/// again within this long.
const RESUME_LIMIT: Duration = Duration::from_secs(10);

/// How long the Sentinels may take to complete a failover.
const SWITCH_LIMIT: Duration = Duration::from_secs(15);

/// keyward has to ask the Sentinels and verify the master before it is
/// ready; allow for a slow start on a loaded box.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// Error replies a client may get while no master takes writes: keyward's
/// own `-ERR ...` (e.g. outcome unknown), `-MASTERDOWN` once a hold runs
/// out, `-TRYAGAIN`. Notably not `-READONLY`, which would mean a write
/// reached a replica.
const OUTAGE_ERRORS: [&[u8]; 3] = [b"-ERR", b"-MASTERDOWN", b"-TRYAGAIN"];

/// Run blocking kit code (process start/stop, Sentinel polling, the HTTP
/// getter) from an async test without stalling the runtime's other tasks:
/// the writer must keep running meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Await `fut`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {limit:?}"),
    }
}

/// Poll `/ready` until 200 (keyward found and verified a master).
async fn wait_ready(kw: &Keyward) {
    let admin = kw.admin_port();
    wait_until("keyward /ready answers 200", READY_LIMIT, || async move {
        blocking(|| http_get(admin, "/ready").0) == 200
    })
    .await;
}

/// `/topology`, panicking with the reason if it is not 200 JSON.
fn topology(kw: &Keyward) -> TopologyView {
    get_topology(kw.admin_port()).unwrap_or_else(|e| panic!("GET /topology: {e}"))
}

/// A master, one replica of it, and three sentinels watching the master
/// with `down-after-milliseconds` = `down_after_ms`.
fn replicated_group(down_after_ms: u64) -> (Redis, Redis, Sentinels) {
    let master = Redis::start();
    let replica = Redis::start_replica_of(&master);
    let sentinels = Sentinels::start_down_after(&master, down_after_ms);
    (master, replica, sentinels)
}

/// How one write through keyward ended, as the client saw it.
#[derive(Debug, Clone)]
enum Answer {
    /// One complete RESP reply.
    Reply(Vec<u8>),
    /// keyward closed or reset the client connection instead of replying.
    Closed(String),
    /// No reply within [`REPLY_LIMIT`].
    Hang,
}

/// One `SET fo:<i> <i>` through keyward.
#[derive(Debug, Clone)]
struct Write {
    i: u64,
    sent: Instant,
    answered: Instant,
    answer: Answer,
}

impl Write {
    fn ok(&self) -> bool {
        matches!(&self.answer, Answer::Reply(r) if r == b"+OK\r\n")
    }
    fn error(&self) -> Option<&[u8]> {
        match &self.answer {
            Answer::Reply(r) if r.starts_with(b"-") => Some(r),
            _ => None,
        }
    }
}

/// A background task writing `SET fo:<i> <i>` through keyward, one request
/// at a time as fast as replies come back, on one client connection (a new
/// one only if keyward drops it). Every outcome is recorded so the test can
/// check each acknowledged write afterwards.
struct Writer {
    log: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Writer {
    fn start(port: u16) -> Writer {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_loop(port, log.clone(), stop.clone()));
        Writer { log, stop, task }
    }

    fn oks(&self) -> usize {
        self.log.lock().unwrap().iter().filter(|w| w.ok()).count()
    }

    /// The first acknowledged write whose request was sent at or after `t`.
    fn first_ok_sent_after(&self, t: Instant) -> Option<Write> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|w| w.sent >= t && w.ok())
            .cloned()
    }

    /// Acknowledged writes sent at or after `t`.
    fn oks_sent_after(&self, t: Instant) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.sent >= t && w.ok())
            .count()
    }

    /// Stop after the request in flight and return the full record.
    async fn stop(self) -> Vec<Write> {
        self.stop.store(true, Ordering::SeqCst);
        within(REPLY_LIMIT * 2, "stopping the writer", self.task)
            .await
            .expect("writer task panicked");
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

async fn write_loop(port: u16, log: Arc<Mutex<Vec<Write>>>, stop: Arc<AtomicBool>) {
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match tokio::time::timeout(REPLY_LIMIT, TcpStream::connect(("127.0.0.1", port))).await {
                Ok(Ok(s)) => {
                    s.set_nodelay(true).expect("set_nodelay");
                    conn = Some((s, Vec::new()));
                }
                _ => {
                    // keyward itself unreachable: not a write outcome; the
                    // test notices through its own deadlines.
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            }
        }
        let (stream, buf) = conn.as_mut().expect("connected");
        i += 1;
        let (key, val) = (format!("fo:{i}"), i.to_string());
        let request = cmd(&[b"SET", key.as_bytes(), val.as_bytes()]);
        let sent = Instant::now();
        let answer = match tokio::time::timeout(REPLY_LIMIT, roundtrip(stream, buf, &request)).await
        {
            Ok(Ok(reply)) => Answer::Reply(reply),
            Ok(Err(e)) => Answer::Closed(e),
            Err(_) => Answer::Hang,
        };
        if !matches!(answer, Answer::Reply(_)) {
            conn = None; // the connection's state is unknown; start afresh
        }
        log.lock().unwrap().push(Write {
            i,
            sent,
            answered: Instant::now(),
            answer,
        });
    }
}

/// Send `request` and read exactly one reply frame.
async fn roundtrip(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> Result<Vec<u8>, String> {
    s.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(n) = frame_len(buf)? {
            return Ok(buf.drain(..n).collect());
        }
        match s.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed by keyward; partial reply: {}", esc(buf))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}; partial reply: {}", esc(buf))),
        }
    }
}

/// Every write in `writes` (all acknowledged) checked on the node at
/// `port`: those whose key is missing or holds another value, with what was
/// found.
fn missing_on(port: u16, writes: &[&Write]) -> Vec<(u64, Option<String>)> {
    let mut bad = Vec::new();
    for batch in writes.chunks(500) {
        let keys: Vec<String> = batch.iter().map(|w| format!("fo:{}", w.i)).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        let reply = redis_cmd(port, &args);
        let values = parse_reply(&reply)
            .ok()
            .and_then(Reply::array)
            .unwrap_or_else(|| panic!("MGET on 127.0.0.1:{port}: {}", esc(&reply)));
        assert_eq!(values.len(), batch.len(), "MGET reply length");
        for (w, v) in batch.iter().zip(values) {
            let got = v.text();
            if got.as_deref() != Some(w.i.to_string().as_str()) {
                bad.push((w.i, got));
            }
        }
    }
    bad
}

/// Client-visible facts about a writer's record that every failover test
/// asserts: no hang, no dropped connection, only the errors in `allowed`.
fn assert_answers_bounded(writes: &[Write], allowed: &[&[u8]]) {
    let hangs: Vec<u64> = writes
        .iter()
        .filter(|w| matches!(w.answer, Answer::Hang))
        .map(|w| w.i)
        .collect();
    assert!(
        hangs.is_empty(),
        "writes through keyward got no reply within {REPLY_LIMIT:?}: {hangs:?}"
    );
    let closed: Vec<(u64, String)> = writes
        .iter()
        .filter_map(|w| match &w.answer {
            Answer::Closed(e) => Some((w.i, e.clone())),
            _ => None,
        })
        .collect();
    assert!(
        closed.is_empty(),
        "keyward dropped the client connection instead of replying: {closed:?}"
    );
    let readonly: Vec<u64> = writes
        .iter()
        .filter(|w| w.error().is_some_and(|e| e.starts_with(b"-READONLY")))
        .map(|w| w.i)
        .collect();
    assert!(
        readonly.is_empty(),
        "writes through keyward reached a replica (-READONLY): {} of them, first {:?}",
        readonly.len(),
        &readonly[..readonly.len().min(10)]
    );
    let odd: Vec<(u64, String)> = writes
        .iter()
        .filter_map(|w| match &w.answer {
            Answer::Reply(r)
                if !w.ok()
                    && !w
                        .error()
                        .is_some_and(|e| allowed.iter().any(|p| e.starts_with(p))) =>
            {
                Some((w.i, esc(r)))
            }
            _ => None,
        })
        .collect();
    assert!(
        odd.is_empty(),
        "unexpected replies to SET through keyward (allowed: +OK or errors starting {:?}): {} of them, first {:?}",
        allowed.iter().map(|p| esc(p)).collect::<Vec<_>>(),
        odd.len(),
        &odd[..odd.len().min(10)]
    );
}

/// Longest time between two consecutive acknowledgements: the write outage
/// a client saw.
fn longest_ack_gap(writes: &[Write]) -> Duration {
    let acks: Vec<Instant> = writes
        .iter()
        .filter(|w| w.ok())
        .map(|w| w.answered)
        .collect();
    acks.windows(2)
        .map(|p| p[1].duration_since(p[0]))
        .max()
        .unwrap_or_default()
}

fn error_summary(writes: &[Write]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for e in writes.iter().filter_map(Write::error) {
        let text = String::from_utf8_lossy(e);
        let head: String = text.trim_end().chars().take(60).collect();
        match kinds.iter_mut().find(|(k, _)| *k == head) {
            Some((_, n)) => *n += 1,
            None => kinds.push((head, 1)),
        }
    }
    format!("{kinds:?}")
}

/// Kit self-test, no keyward: a replica syncs, the sentinel group settles,
/// a planned failover promotes the replica and raises the config epoch, and
/// the group still answers with one sentinel killed.
#[test]
fn sentinel_kit_starts_and_fails_over() {
    let master = Redis::start();
    let replica = Redis::start_replica_of(&master);
    assert!(replica_link_up(replica.port()));
    assert_eq!(role_of(master.port()).as_deref(), Some("master"));
    assert_eq!(role_of(replica.port()).as_deref(), Some("slave"));
    assert_eq!(master.call(&[b"SET", b"seed", b"1"]), b"+OK\r\n");
    wait_until_sync("the replica has the seed key", DEADLINE, || {
        replica.call(&[b"GET", b"seed"]) == b"$1\r\n1\r\n"
    });

    let started = std::time::Instant::now();
    let mut sentinels = Sentinels::start(&master);
    eprintln!("sentinel group settled in {:?}", started.elapsed());
    assert_eq!(sentinels.len(), 3);
    let ports = sentinels.ports();
    assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    assert_eq!(sentinels.addrs()[0], format!("127.0.0.1:{}", ports[0]));
    assert_eq!(sentinels.master_addr(), master.addr());
    for i in 0..3 {
        assert_eq!(sentinels.master_seen_by(i), Some(master.addr()));
    }
    let epoch0 = sentinels.config_epoch();
    // Sentinel rewrites its config with what it learned; the file must be
    // writable for that.
    let conf = std::fs::read_to_string(sentinels.dir(0).join("sentinel.conf")).unwrap();
    assert!(
        conf.contains("known-sentinel"),
        "sentinel.conf not rewritten:\n{conf}"
    );

    let t = std::time::Instant::now();
    sentinels.failover();
    let new = sentinels.wait_master_change(&master.addr(), SWITCH_LIMIT);
    eprintln!(
        "planned failover: sentinels report {new} as master {:?} after SENTINEL FAILOVER",
        t.elapsed()
    );
    assert_eq!(new, replica.addr());
    assert_eq!(role_of(replica.port()).as_deref(), Some("master"));
    assert!(
        sentinels.config_epoch() > epoch0,
        "config epoch did not rise"
    );
    assert!(sentinels.logs().contains("+switch-master"));

    sentinels.kill(0);
    assert!(!sentinels.is_running(0));
    assert_eq!(sentinels.master_seen_by(0), None);
    assert_eq!(sentinels.master_addr(), replica.addr());
}

/// Started with only `--sentinel` addresses, keyward asks the Sentinels for
/// the master, becomes ready, and a write through it lands on that master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_sentinel_at_start() {
    let (master, _replica, sentinels) = blocking(|| replicated_group(1000));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw).await;

    let c = client(kw.port()).await;
    let _: () = c
        .set("greeting", "hello", None, None, false)
        .await
        .expect("SET through keyward");
    let got: Option<String> = c.get("greeting").await.expect("GET through keyward");
    assert_eq!(got.as_deref(), Some("hello"));
    assert_eq!(
        blocking(|| master.call(&[b"GET", b"greeting"])),
        b"$5\r\nhello\r\n",
        "the write through keyward is not on the master Sentinel names"
    );

    let topo = blocking(|| topology(&kw));
    assert_eq!(
        topo.master.as_deref(),
        Some(master.addr().as_str()),
        "/topology: {}",
        topo.raw
    );
}

/// `SENTINEL FAILOVER` while a client writes through keyward: writes move
/// to the new master within a bounded time, `/topology` follows with a
/// higher epoch, no write is ever answered `-READONLY`, and every write
/// keyward acknowledged is on the new master: none went to the old master
/// after the switch (it stays a writable master for seconds, but its data is
/// discarded when Sentinel demotes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failover_moves_writes_to_the_new_master() {
    let (master, replica, sentinels) = blocking(|| replicated_group(1000));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw).await;
    let before = blocking(|| topology(&kw));
    assert_eq!(
        before.master.as_deref(),
        Some(master.addr().as_str()),
        "/topology: {}",
        before.raw
    );
    let epoch_before = before
        .epoch
        .unwrap_or_else(|| panic!("/topology has no epoch: {}", before.raw));

    let writer = Writer::start(kw.port());
    wait_until("writes flow through keyward", DEADLINE, || {
        let w = &writer;
        async move { w.oks() >= 200 }
    })
    .await;

    let old = master.addr();
    let t_failover = Instant::now();
    blocking(|| sentinels.failover());
    let new = blocking(|| sentinels.wait_master_change(&old, SWITCH_LIMIT));
    let t_reported = Instant::now();
    assert_eq!(new, replica.addr());

    wait_until(
        "a write sent after the switch is acknowledged",
        RESUME_LIMIT,
        || {
            let w = &writer;
            async move { w.first_ok_sent_after(t_reported).is_some() }
        },
    )
    .await;
    let first = writer
        .first_ok_sent_after(t_reported)
        .expect("checked above");

    wait_until("/topology names the new master", RESUME_LIMIT, || {
        let (admin, new) = (kw.admin_port(), new.clone());
        async move {
            blocking(|| get_topology(admin))
                .map(|t| t.master.as_deref() == Some(new.as_str()))
                .unwrap_or(false)
        }
    })
    .await;
    let after = blocking(|| topology(&kw));
    let epoch_after = after
        .epoch
        .unwrap_or_else(|| panic!("/topology has no epoch: {}", after.raw));
    assert!(
        epoch_after > epoch_before,
        "/topology epoch did not rise ({epoch_before} -> {epoch_after}): {}",
        after.raw
    );

    // Keep writing a little longer on the new master, then check it all.
    wait_until("more writes land after the switch", DEADLINE, || {
        let w = &writer;
        async move { w.oks_sent_after(t_reported) >= 200 }
    })
    .await;
    let writes = writer.stop().await;

    eprintln!(
        "planned failover: sentinels reported {new} {:?} after SENTINEL FAILOVER; \
         keyward's first write on it acknowledged {:?} after that; \
         longest gap between acknowledged writes {:?}; {} writes, {} acknowledged, errors {}",
        t_reported.duration_since(t_failover),
        first.answered.saturating_duration_since(t_reported),
        longest_ack_gap(&writes),
        writes.len(),
        writes.iter().filter(|w| w.ok()).count(),
        error_summary(&writes)
    );

    assert_answers_bounded(&writes, &OUTAGE_ERRORS);
    let acked: Vec<&Write> = writes.iter().filter(|w| w.ok()).collect();
    let lost = blocking(|| missing_on(replica.port(), &acked));
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are not on the new master {new} (key index, value found): first {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
}

/// The master process dies while a client writes through keyward: every
/// request is answered within [`REPLY_LIMIT`] with `+OK` or an outage error
/// (never a hang or `-READONLY`), writes succeed again soon after the
/// Sentinels promote the replica, and every write acknowledged after the
/// crash is on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_writes_resume_after_promotion() {
    let (mut master, replica, sentinels) = blocking(|| replicated_group(500));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw).await;

    let writer = Writer::start(kw.port());
    wait_until("writes flow through keyward", DEADLINE, || {
        let w = &writer;
        async move { w.oks() >= 200 }
    })
    .await;

    let old = master.addr();
    let t_kill = Instant::now();
    blocking(|| master.kill());
    // From here on nothing can have been acknowledged by the old master.
    let t_dead = Instant::now();
    let new = blocking(|| sentinels.wait_master_change(&old, SWITCH_LIMIT));
    let t_reported = Instant::now();
    assert_eq!(new, replica.addr());

    wait_until(
        "a write sent after the promotion is acknowledged",
        RESUME_LIMIT,
        || {
            let w = &writer;
            async move { w.first_ok_sent_after(t_reported).is_some() }
        },
    )
    .await;
    let first = writer
        .first_ok_sent_after(t_reported)
        .expect("checked above");
    wait_until("more writes land after the promotion", DEADLINE, || {
        let w = &writer;
        async move { w.oks_sent_after(t_reported) >= 200 }
    })
    .await;
    let writes = writer.stop().await;

    eprintln!(
        "master killed: sentinels reported {new} {:?} after the kill; \
         keyward's first write on it acknowledged {:?} after that; \
         longest gap between acknowledged writes {:?}; {} writes, {} acknowledged, errors {}",
        t_reported.duration_since(t_kill),
        first.answered.saturating_duration_since(t_reported),
        longest_ack_gap(&writes),
        writes.len(),
        writes.iter().filter(|w| w.ok()).count(),
        error_summary(&writes)
    );

    assert_answers_bounded(&writes, &OUTAGE_ERRORS);
    let acked_after_crash: Vec<&Write> = writes
        .iter()
        .filter(|w| w.sent >= t_dead && w.ok())
        .collect();
    assert!(!acked_after_crash.is_empty());
    let lost = blocking(|| missing_on(replica.port(), &acked_after_crash));
    assert!(
        lost.is_empty(),
        "{} of {} writes acknowledged after the crash are not on the new master {new}: first {:?}",
        lost.len(),
        acked_after_crash.len(),
        &lost[..lost.len().min(20)]
    );
}

/// `KEYWARD TOPOLOGY` over RESP names the master keyward follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_topology_command() {
    let (master, _replica, sentinels) = blocking(|| replicated_group(1000));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw).await;

    let mut raw = Raw::connect(kw.port()).await;
    let reply = raw.call(&[b"KEYWARD", b"TOPOLOGY"]).await;
    assert!(
        !reply.starts_with(b"-"),
        "KEYWARD TOPOLOGY failed: {}",
        esc(&reply)
    );
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains(&master.addr()),
        "KEYWARD TOPOLOGY does not name the master {}: {}",
        master.addr(),
        esc(&reply)
    );
}

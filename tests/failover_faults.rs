//! keyward in Sentinel mode under the faults a failover is made of, as a
//! client sees them:
//!
//! - a master that freezes (SIGSTOP) and wakes up after the Sentinels
//!   replaced it (a "zombie"): no write keyward sent after adopting the new
//!   master reaches it, and no acknowledged write is lost;
//! - a dead Sentinel (one of three, quorum still there): traffic does not
//!   notice, a planned switchover still works, `/topology` reports it
//!   unreachable;
//! - requests in flight when the master dies: writes (and anything that is
//!   not a read) get an error saying their outcome is unknown and are not
//!   replayed, while a read is retried on the new master and gets its value;
//! - subscribers (RESP2 and RESP3) keep their subscriptions across a planned
//!   switchover and a crash, on the same connection, without an error or a
//!   stray (un)subscribe frame; once keyward has them on the new master, no
//!   message published through it is lost while the Sentinels finish.
//!
//! Each test runs a master, two replicas synced *before* the Sentinels start
//! (so they know both at once), three real sentinels with
//! `down-after-milliseconds` 1000 (tests/support/sentinel.rs) and keyward
//! following them. Nothing waits by sleeping: every wait polls what keyward
//! (`/ready`, `/topology`), Redis (`ROLE`, `INFO`, `PUBSUB`) or the Sentinels
//! report, against a deadline, and every test bounds its own run time.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// Upper bound on each test's whole run (setup included), so a hang fails
/// the test instead of stalling the suite.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// The text keyward's error for a request whose connection died after it
/// was sent carries (README: "an error saying its outcome is unknown").
const OUTCOME_UNKNOWN: &str = "outcome of this command is unknown";

/// Two replicas of `master`, synced, then three sentinels watching it with
/// `down-after-milliseconds` 1000.
fn group_of(master: &Redis) -> (Vec<Redis>, Sentinels) {
    let replicas = vec![
        Redis::start_replica_of(master),
        Redis::start_replica_of(master),
    ];
    let sentinels = Sentinels::start(master);
    (replicas, sentinels)
}

/// The replica among `replicas` listening at `addr`.
fn node_at<'a>(replicas: &'a [Redis], addr: &str) -> &'a Redis {
    replicas
        .iter()
        .find(|r| r.addr() == addr)
        .unwrap_or_else(|| {
            panic!(
                "{addr} is none of the replicas {:?}",
                replicas.iter().map(Redis::addr).collect::<Vec<_>>()
            )
        })
}

/// Assert `a` is a successful switchover away from `old` to one of
/// `candidates`; return the new master's address.
fn assert_switched(a: &FailoverAnswer, old: &str, candidates: &[String]) -> String {
    assert_eq!(a.status, 200, "POST /failover: {}", a.body);
    assert_eq!(a.ok, Some(true), "POST /failover: {}", a.body);
    assert_eq!(a.old.as_deref(), Some(old), "POST /failover: {}", a.body);
    let new = a
        .new
        .clone()
        .unwrap_or_else(|| panic!("POST /failover names no new master: {}", a.body));
    assert!(
        candidates.contains(&new),
        "POST /failover promoted {new}, expected one of the replicas {candidates:?}: {}",
        a.body
    );
    new
}

/// Poll until the node on `replica_port` is a replica of `master_port`
/// with its link up and every sentinel lists it as a healthy replica (what
/// Sentinel's replica selection needs before the next failover can pick it).
async fn wait_replica_known(sentinels: &Sentinels, replica_port: u16, master_port: u16) {
    wait_until(
        &format!(
            "127.0.0.1:{replica_port} is a synced replica of 127.0.0.1:{master_port} known to every sentinel"
        ),
        Duration::from_secs(15),
        || async move {
            blocking(|| {
                let info = match try_redis_cmd(
                    replica_port,
                    &[b"INFO", b"replication"],
                    Duration::from_millis(500),
                ) {
                    Ok(r) => String::from_utf8_lossy(&r).into_owned(),
                    Err(_) => return false,
                };
                if !(info.contains("master_link_status:up")
                    && info.contains(&format!("master_port:{master_port}\r\n")))
                {
                    return false;
                }
                sentinels.all_know_healthy_replica(replica_port, Some(master_port))
            })
        },
    )
    .await;
}

/// Every write was answered (no hang, no dropped connection), none with
/// `-READONLY`, and errors only of the kinds in `allowed`.
///
/// Each offender is shown with when it was sent relative to `event` (the
/// fault the test injected at `at`).
fn assert_answers_bounded(
    writes: &[Exchange],
    allowed: &[&[u8]],
    (event, at): (&str, Instant),
    kw: &Keyward,
) {
    let when = |w: &Exchange| {
        if w.sent >= at {
            format!("sent {:?} after {event}", w.sent - at)
        } else {
            format!("sent {:?} before {event}", at - w.sent)
        }
    };
    let bad: Vec<String> = writes
        .iter()
        .filter(|w| !w.ok())
        .filter(|w| match &w.answer {
            Answer::Reply(r) => {
                r.starts_with(b"-READONLY") || !allowed.iter().any(|p| r.starts_with(p))
            }
            _ => true,
        })
        .map(|w| match &w.answer {
            Answer::Reply(r) => format!("#{} ({}): {}", w.i, when(w), esc(r)),
            Answer::Closed(e) => format!("#{} ({}): connection closed ({e})", w.i, when(w)),
            Answer::Hang => format!("#{} ({}): no reply within {REPLY_LIMIT:?}", w.i, when(w)),
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} SETs through keyward were not answered +OK or an allowed outage error \
         (allowed: {:?}); first: {:?}\n--- keyward log (tail) ---\n{}",
        bad.len(),
        writes.len(),
        allowed.iter().map(|p| esc(p)).collect::<Vec<_>>(),
        &bad[..bad.len().min(10)],
        log_tail(kw)
    );
}

/// The last 8 KiB of keyward's log, for failure messages.
fn log_tail(kw: &Keyward) -> String {
    tail(&kw.log(), 8 * 1024).to_string()
}

// ---------------------------------------------------------------------------
// 1. A frozen master that wakes up after the switch.
// ---------------------------------------------------------------------------

/// What a background poller of `/topology` saw first: when keyward left the
/// healthy state and when it named a master other than the original one
/// (each time taken when the answer had arrived, so keyward had changed
/// its mind at or before it).
#[derive(Debug, Default, Clone)]
struct TopologyTimeline {
    left_healthy: Option<(Instant, String)>,
    new_master: Option<(Instant, String)>,
    polls: usize,
}

/// Poll `/topology` every [`POLL`] on a thread of its own until `stop`.
fn watch_topology(
    admin_port: u16,
    old: String,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<TopologyTimeline>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(TopologyTimeline::default()));
    let out = seen.clone();
    let handle = std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let t = get_topology(admin_port);
            let at = Instant::now();
            let mut s = out.lock().unwrap();
            s.polls += 1;
            if let Ok(t) = t {
                if s.left_healthy.is_none() {
                    if let Some(state) = t.state.as_deref().filter(|st| *st != "healthy") {
                        s.left_healthy = Some((at, state.to_string()));
                    }
                }
                if s.new_master.is_none() {
                    if let Some(m) = t.master.as_deref().filter(|m| *m != old) {
                        s.new_master = Some((at, m.to_string()));
                    }
                }
            }
            drop(s);
            std::thread::sleep(POLL);
        }
    });
    (seen, handle)
}

/// `ROLE` and `KEYS <pattern>` in one pipeline on one connection (Redis runs
/// them back to back, no other client in between): the role the node had
/// when it listed its keys, and the keys.
fn role_and_keys(port: u16, pattern: &[u8]) -> Result<(String, Vec<String>), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut out = cmd(&[b"ROLE"]);
    out.extend_from_slice(&cmd(&[b"KEYS", pattern]));
    std::io::Write::write_all(&mut s, &out).map_err(|e| format!("write {addr}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while frames.len() < 2 {
        if let Some(n) = frame_len(&buf)? {
            frames.push(buf.drain(..n).collect::<Vec<u8>>());
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{addr}: no ROLE + KEYS reply within {timeout:?}"));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match std::io::Read::read(&mut s, &mut chunk) {
            Ok(0) => return Err(format!("{addr}: closed; got {}", esc(&buf))),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(format!("{addr}: read: {e}")),
        }
    }
    let role = parse_reply(&frames[0])
        .ok()
        .and_then(Reply::array)
        .and_then(|a| a.first().and_then(Reply::text))
        .ok_or_else(|| format!("{addr}: odd ROLE reply {}", esc(&frames[0])))?;
    let keys = parse_reply(&frames[1])
        .ok()
        .and_then(Reply::array)
        .ok_or_else(|| format!("{addr}: odd KEYS reply {}", esc(&frames[1])))?
        .iter()
        .filter_map(Reply::text)
        .collect();
    Ok((role, keys))
}

/// The master freezes (SIGSTOP) while a client writes through keyward; the
/// Sentinels promote a replica and keyward moves writes there. The old
/// master then wakes up (SIGCONT) still believing it is the master, until a
/// Sentinel reconfigures it seconds later. Read at once, its keyspace holds
/// only writes the client sent before keyward's `/topology` named the new
/// master: nothing keyward sent after adopting the new master reached the
/// zombie. And every acknowledged write is on the new master (except at
/// most the one acknowledged just as the master froze, which Redis's
/// asynchronous replication may not have shipped: that loss is Redis's,
/// not keyward's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_master_gets_no_write_after_the_switch() {
    within(TEST_LIMIT, "the whole test", zombie_master_body()).await;
}

async fn zombie_master_body() {
    let t_test = Instant::now();
    let master = blocking(Redis::start);
    let (replicas, sentinels) = blocking(|| group_of(&master));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    let old = master.addr();
    let pid = master.pid().expect("master is running");
    assert_eq!(
        blocking(|| topology(&kw)).master.as_deref(),
        Some(old.as_str())
    );
    let t_setup = t_test.elapsed();

    let writer = ClientLoop::writer(kw.port(), "z");
    wait_until("writes flow through keyward", DEADLINE, || {
        let w = &writer;
        async move { w.oks() >= 200 }
    })
    .await;

    let stop_watch = Arc::new(AtomicBool::new(false));
    let (timeline, watcher) = watch_topology(kw.admin_port(), old.clone(), stop_watch.clone());

    blocking(|| send_signal(pid, "STOP"));
    // From here on the old master executes nothing until SIGCONT.
    let t_stopped = Instant::now();
    let new = blocking(|| sentinels.wait_master_change(&old, SWITCH_LIMIT));
    let t_reported = Instant::now();
    let new_node = node_at(&replicas, &new);

    wait_until(
        "a write sent after the Sentinels promoted a replica is acknowledged through keyward",
        RESUME_LIMIT,
        || {
            let w = &writer;
            async move { w.oks_sent_after(t_reported) >= 1 }
        },
    )
    .await;
    wait_until("/topology names the new master", RESUME_LIMIT, || {
        let tl = timeline.clone();
        async move { tl.lock().unwrap().new_master.is_some() }
    })
    .await;
    let (t_switch, topo_master) = timeline.lock().unwrap().new_master.clone().unwrap();
    assert_eq!(
        topo_master, new,
        "/topology names {topo_master}, the Sentinels {new}"
    );

    // Wake the zombie and read its keyspace before a Sentinel demotes it
    // (it has to notice the stale master in an INFO poll first). Two reads:
    // the second one runs at least one event-loop turn after everything
    // queued in the zombie's sockets while it was frozen.
    blocking(|| send_signal(pid, "CONT"));
    let t_cont = Instant::now();
    let first = blocking(|| role_and_keys(master.port(), b"z:*"));
    let second = blocking(|| role_and_keys(master.port(), b"z:*"));
    let read_after = t_cont.elapsed();
    let mut zombie_keys: Vec<String> = Vec::new();
    let mut readings = Vec::new();
    for r in [&first, &second] {
        match r {
            Ok((role, keys)) => {
                readings.push(format!("role {role}, {} z:* keys", keys.len()));
                if role == "master" {
                    zombie_keys.extend(keys.iter().cloned());
                }
            }
            Err(e) => readings.push(format!("error: {e}")),
        }
    }
    assert!(
        matches!(&first, Ok((role, _)) if role == "master"),
        "the woken old master {old} did not answer ROLE master + KEYS at once \
         (read {read_after:?} after SIGCONT): {first:?}; the check needs it still a master"
    );
    zombie_keys.sort();
    zombie_keys.dedup();

    // Keep writing a little on the new master, then stop everything.
    wait_until("more writes land after the switch", DEADLINE, || {
        let w = &writer;
        async move { w.oks_sent_after(t_cont) >= 100 }
    })
    .await;
    let writes = writer.stop().await;
    stop_watch.store(true, Ordering::SeqCst);
    watcher.join().expect("topology watcher panicked");
    let tl = timeline.lock().unwrap().clone();

    let by_seq = |k: &str| -> Option<&Exchange> {
        let i: u64 = k.strip_prefix("z:")?.parse().ok()?;
        writes.iter().find(|w| w.i == i)
    };
    let rel = |t: Instant, base: Instant| -> String {
        if t >= base {
            format!("+{:?}", t - base)
        } else {
            format!("-{:?}", base - t)
        }
    };
    let sent_during_freeze = zombie_keys
        .iter()
        .filter_map(|k| by_seq(k))
        .filter(|w| w.sent >= t_stopped)
        .count();
    eprintln!(
        "zombie master: setup {t_setup:?}; sentinels reported {new} {:?} after SIGSTOP; keyward left \
         healthy at {:?} and /topology named the new master {:?} after SIGSTOP ({} polls); \
         zombie read {read_after:?} after SIGCONT: {readings:?}; {} z:* keys on it, {sent_during_freeze} \
         of them sent while it was frozen; {} writes, {} acknowledged, errors {}",
        t_reported - t_stopped,
        tl.left_healthy
            .as_ref()
            .map(|(t, s)| format!("{} ({s})", rel(*t, t_stopped))),
        t_switch - t_stopped,
        tl.polls,
        zombie_keys.len(),
        writes.len(),
        writes.iter().filter(|w| w.ok()).count(),
        error_summary(&writes)
    );

    // 1. Nothing sent after the switch reached the zombie.
    let late: Vec<String> = zombie_keys
        .iter()
        .filter_map(|k| match by_seq(k) {
            None => Some(format!("{k}: not a key the writer sent")),
            Some(w) if w.sent >= t_switch => Some(format!(
                "{k}: sent {} after /topology named {new} (SIGSTOP {}), answered {:?}",
                rel(w.sent, t_switch),
                rel(w.sent, t_stopped),
                match &w.answer {
                    Answer::Reply(r) => esc(r),
                    other => format!("{other:?}"),
                }
            )),
            Some(_) => None,
        })
        .collect();
    assert!(
        late.is_empty(),
        "{} of the {} z:* keys on the woken old master {old} were written by requests sent after \
         keyward adopted the new master {new}: {:?}\n--- keyward log (tail) ---\n{}",
        late.len(),
        zombie_keys.len(),
        &late[..late.len().min(10)],
        log_tail(&kw)
    );

    // 2. Every acknowledged write is on the new master, except possibly the
    // last one acknowledged by the old master just as it froze.
    let unreplicated_ok = writes
        .iter()
        .filter(|w| w.ok() && w.sent < t_stopped)
        .map(|w| w.i)
        .max();
    let acked: Vec<&Exchange> = writes
        .iter()
        .filter(|w| w.ok() && Some(w.i) != unreplicated_ok)
        .collect();
    let lost = blocking(|| missing_on(new_node.port(), "z", &acked));
    let describe: Vec<String> = lost
        .iter()
        .take(10)
        .map(|(i, got)| {
            let w = writes.iter().find(|w| w.i == *i).unwrap();
            format!(
                "z:{i} (found {got:?}; sent {} / answered {} relative to SIGSTOP; on the zombie: {})",
                rel(w.sent, t_stopped),
                rel(w.answered, t_stopped),
                zombie_keys.contains(&format!("z:{i}"))
            )
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are not on the new master {new}: {describe:?}\n\
         --- keyward log (tail) ---\n{}",
        lost.len(),
        acked.len(),
        log_tail(&kw)
    );

    // 3. Every write was answered, never by a replica.
    assert_answers_bounded(&writes, &OUTAGE_ERRORS, ("SIGSTOP", t_stopped), &kw);
}

// ---------------------------------------------------------------------------
// 2. One of the three Sentinels dies.
// ---------------------------------------------------------------------------

/// One Sentinel (the first keyward was given) is killed while a client
/// writes through keyward; two of three remain, so the quorum holds. Every
/// write is still acknowledged, `/topology` reports that Sentinel
/// unreachable (and the other two reachable), and a planned switchover
/// (`POST /failover`) still moves the master with no client error; every
/// acknowledged write is on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sentinel_keyward_talks_to_changes_nothing() {
    within(TEST_LIMIT, "the whole test", dead_sentinel_body()).await;
}

async fn dead_sentinel_body() {
    let master = blocking(Redis::start);
    let (replicas, mut sentinels) = blocking(|| group_of(&master));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    let admin = kw.admin_port();
    let addrs = sentinels.addrs();
    let dead = addrs[0].clone();
    wait_until(
        "/topology lists the three sentinels, all reachable",
        DEADLINE,
        || {
            let addrs = addrs.clone();
            async move {
                blocking(|| get_topology(admin)).is_ok_and(|t| {
                    addrs
                        .iter()
                        .all(|a| t.sentinels.iter().any(|(s, r)| s == a && *r))
                })
            }
        },
    )
    .await;

    let writer = ClientLoop::writer(kw.port(), "ds");
    wait_until("writes flow through keyward", DEADLINE, || {
        let w = &writer;
        async move { w.oks() >= 200 }
    })
    .await;

    let t_kill = Instant::now();
    blocking(|| sentinels.kill(0));
    wait_until(
        &format!("/topology shows the killed sentinel {dead} unreachable"),
        DEADLINE,
        || {
            let dead = dead.clone();
            async move {
                blocking(|| get_topology(admin))
                    .is_ok_and(|t| t.sentinels.iter().any(|(s, r)| *s == dead && !*r))
            }
        },
    )
    .await;
    let noticed = t_kill.elapsed();
    let topo = blocking(|| topology(&kw));
    for a in &addrs[1..] {
        assert!(
            topo.sentinels.iter().any(|(s, r)| s == a && *r),
            "/topology does not show the live sentinel {a} reachable: {}",
            topo.raw
        );
    }
    assert_eq!(
        topo.master.as_deref(),
        Some(master.addr().as_str()),
        "/topology after a sentinel died: {}",
        topo.raw
    );
    assert_eq!(
        topo.state.as_deref(),
        Some("healthy"),
        "/topology after a sentinel died: {}",
        topo.raw
    );
    let t_noticed = Instant::now();
    wait_until("writes keep flowing with a sentinel down", DEADLINE, || {
        let w = &writer;
        async move { w.oks_sent_after(t_noticed) >= 200 }
    })
    .await;

    // A planned switchover with one sentinel dead.
    let candidates: Vec<String> = replicas.iter().map(Redis::addr).collect();
    let t_post = Instant::now();
    let answer = blocking(|| post_failover(admin));
    let t_done = Instant::now();
    let new = assert_switched(&answer, &master.addr(), &candidates);
    let new_node = node_at(&replicas, &new);
    assert_eq!(role_of(new_node.port()).as_deref(), Some("master"));
    let topo = blocking(|| topology(&kw));
    assert_eq!(
        topo.master.as_deref(),
        Some(new.as_str()),
        "/topology after the switchover: {}",
        topo.raw
    );
    wait_until("writes flow on the new master", RESUME_LIMIT, || {
        let w = &writer;
        async move { w.oks_sent_after(t_done) >= 200 }
    })
    .await;
    let writes = writer.stop().await;

    eprintln!(
        "dead sentinel: /topology showed {dead} unreachable {noticed:?} after the kill; \
         POST /failover -> {new} took {:?}; {} writes, {} acknowledged, errors {}",
        t_done - t_post,
        writes.len(),
        writes.iter().filter(|w| w.ok()).count(),
        error_summary(&writes)
    );

    // Not one error: a dead sentinel and a planned switchover are invisible.
    assert_answers_bounded(&writes, &[], ("the sentinel's kill", t_kill), &kw);
    let acked: Vec<&Exchange> = writes.iter().filter(|w| w.ok()).collect();
    let lost = blocking(|| missing_on(new_node.port(), "ds", &acked));
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are not on the new master {new}: first {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
}

// ---------------------------------------------------------------------------
// 3. Requests in flight when the master dies.
// ---------------------------------------------------------------------------

/// One client pipelines `DEBUG SLEEP 3`, `SET inflight 1` and `GET before`
/// through keyward; while the master sleeps in DEBUG (so all three have
/// reached it and none has been answered) it is SIGKILLed. `DEBUG` and
/// `SET` (not reads) get an error saying their outcome is unknown and are
/// not replayed (`inflight` exists on no node); `GET` (a read) is retried
/// on the new master after the failover and returns the value `before` had
/// (replicated to both replicas before the kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_read_is_retried_and_write_reported_unknown_on_failover() {
    within(TEST_LIMIT, "the whole test", in_flight_body()).await;
}

async fn in_flight_body() {
    let mut master = blocking(|| Redis::start_with(&["--enable-debug-command", "yes"]));
    let (replicas, sentinels) = blocking(|| group_of(&master));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    let old = master.addr();

    let mut setup = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&setup.call(&[b"SET", b"before", b"value-before"]).await),
        "+OK\\r\\n",
        "SET before through keyward"
    );
    for r in &replicas {
        let port = r.port();
        blocking(|| {
            wait_until_sync(
                &format!("replica 127.0.0.1:{port} has `before`"),
                DEADLINE,
                || {
                    try_redis_cmd(port, &[b"GET", b"before"], Duration::from_millis(500))
                        .is_ok_and(|r| r == b"$12\r\nvalue-before\r\n")
                },
            )
        });
    }

    let mut c = Raw::connect(kw.port()).await;
    let mut pipeline = cmd(&[b"DEBUG", b"SLEEP", b"3"]);
    pipeline.extend_from_slice(&cmd(&[b"SET", b"inflight", b"1"]));
    pipeline.extend_from_slice(&cmd(&[b"GET", b"before"]));
    c.send(&pipeline).await;
    let t_sent = Instant::now();

    // The master is inside DEBUG SLEEP once it stops answering: a PING
    // straight to it that gets no reply within 400 ms (a healthy local Redis
    // answers in well under a millisecond). Until DEBUG starts, PINGs come
    // back and the poll goes on. The kill then comes well before keyward's
    // own ROLE checks (every 250 ms, 500 ms timeout, 2 failures) could call
    // the master suspect: to keyward it is a crash out of the blue, as a
    // real one is.
    let port = master.port();
    let mut pongs = 0;
    blocking(|| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let probe = Instant::now();
            match try_redis_cmd(port, &[b"PING"], Duration::from_millis(400)) {
                Ok(r) if r == b"+PONG\r\n" => pongs += 1,
                Ok(r) => panic!("PING to the master: {}", esc(&r)),
                // A read that ran into the probe's timeout (reported as a
                // timeout or as EAGAIN, depending on the platform).
                Err(_) if probe.elapsed() >= Duration::from_millis(350) => return,
                Err(e) => panic!("PING to the master: {e}"),
            }
            if Instant::now() >= deadline {
                panic!("the master never blocked in DEBUG SLEEP 3 sent through keyward ({pongs} PINGs answered)\n--- keyward log ---\n{}", log_tail(&kw));
            }
            std::thread::sleep(POLL);
        }
    });
    let t_blocked = t_sent.elapsed();
    let state_at_kill = blocking(|| topology(&kw)).state;
    blocking(|| master.kill());
    let t_kill = Instant::now();

    let (debug, set, get) = within(
        Duration::from_secs(20),
        "the replies to the pipeline in flight when the master died",
        async {
            let debug = c.read_reply().await;
            let t1 = t_kill.elapsed();
            let set = c.read_reply().await;
            let t2 = t_kill.elapsed();
            let get = c.read_reply().await;
            let t3 = t_kill.elapsed();
            ((debug, t1), (set, t2), (get, t3))
        },
    )
    .await;
    let new = blocking(|| sentinels.wait_master_change(&old, SWITCH_LIMIT));
    let new_node = node_at(&replicas, &new);
    eprintln!(
        "in flight at the crash: master blocked {t_blocked:?} after the pipeline was sent; \
         keyward's state just before the kill {state_at_kill:?}; replies after the kill: DEBUG {:?} {:?}; SET {:?} {:?}; GET {:?} {:?}; new master {new}",
        debug.1,
        String::from_utf8_lossy(&debug.0).trim_end(),
        set.1,
        String::from_utf8_lossy(&set.0).trim_end(),
        get.1,
        String::from_utf8_lossy(&get.0).trim_end(),
    );

    let unknown =
        |r: &[u8]| r.starts_with(b"-") && String::from_utf8_lossy(r).contains(OUTCOME_UNKNOWN);
    assert!(
        unknown(&debug.0),
        "DEBUG SLEEP in flight when the master died: expected an error containing {OUTCOME_UNKNOWN:?}, got {}\n--- keyward log (tail) ---\n{}",
        esc(&debug.0),
        log_tail(&kw)
    );
    assert!(
        unknown(&set.0),
        "SET in flight when the master died: expected an error containing {OUTCOME_UNKNOWN:?}, got {}\n--- keyward log (tail) ---\n{}",
        esc(&set.0),
        log_tail(&kw)
    );
    assert_eq!(
        esc(&get.0),
        esc(b"$12\r\nvalue-before\r\n"),
        "GET in flight when the master died: expected it retried on the new master {new} and \
         answered with the value of `before`\n--- keyward log (tail) ---\n{}",
        log_tail(&kw)
    );

    // The write was not replayed: `inflight` is on no node.
    assert_eq!(
        esc(&blocking(|| new_node.call(&[b"GET", b"inflight"]))),
        "$-1\\r\\n",
        "SET inflight (outcome unknown, never executed by the dead master) is on the new master {new}: keyward replayed it"
    );
    // The connection is still usable, on the new master.
    assert_eq!(
        esc(&c.call(&[b"GET", b"before"]).await),
        esc(b"$12\r\nvalue-before\r\n"),
        "GET on the same connection after the failover"
    );
}

// ---------------------------------------------------------------------------
// 4. Subscribers across a planned switchover and a crash.
// ---------------------------------------------------------------------------

/// The frames a subscriber to `news` and `n*` gets for one `PUBLISH news
/// <payload>`: the channel message, then the pattern message (Redis's order).
fn deliveries(resp3: bool, payload: &str) -> Vec<u8> {
    let kind = if resp3 { '>' } else { '*' };
    format!(
        "{kind}3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n${n}\r\n{payload}\r\n\
         {kind}4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n${n}\r\n{payload}\r\n",
        n = payload.len()
    )
    .into_bytes()
}

/// Read the next two frames from `sub` and compare them with the delivery
/// of `payload`: anything else first (an error, an (un)subscribe frame, an
/// older message) fails the test.
async fn expect_delivery(sub: &mut Raw, resp3: bool, payload: &str, phase: &str, kw: &Keyward) {
    let frames = within(
        REPLY_LIMIT,
        &format!(
            "{phase}: the {} subscriber receiving {payload:?}",
            if resp3 { "RESP3" } else { "RESP2" }
        ),
        sub.read_replies(2),
    )
    .await;
    let got: Vec<u8> = frames.concat();
    let want = deliveries(resp3, payload);
    assert!(
        got == want,
        "{phase}: the {} subscriber's next frames after PUBLISH news {payload:?}\n  expected: {}\n       got: {}\n\
         --- keyward log (tail) ---\n{}",
        if resp3 { "RESP3" } else { "RESP2" },
        esc(&want),
        esc(&got),
        log_tail(kw)
    );
}

/// On the node at `port`: how many connections are subscribed to `news`
/// (`PUBSUB NUMSUB news`) and how many hold a pattern subscription (`psub=`
/// in `CLIENT LIST`; `PUBSUB NUMPAT` counts distinct patterns, not
/// subscribers).
fn subscriptions_on(port: u16) -> Option<(i64, i64)> {
    let numsub = try_redis_cmd(
        port,
        &[b"PUBSUB", b"NUMSUB", b"news"],
        Duration::from_millis(500),
    )
    .ok()?;
    let n = match parse_reply(&numsub).ok()?.array()?.as_slice() {
        [_, Reply::Int(n)] => *n,
        _ => return None,
    };
    let list = try_redis_cmd(port, &[b"CLIENT", b"LIST"], Duration::from_millis(500)).ok()?;
    let text = parse_reply(&list).ok()?.text()?;
    let p = text
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.strip_prefix("psub=").is_some_and(|v| v != "0"))
        })
        .count() as i64;
    Some((n, p))
}

/// Poll until both subscribers' subscriptions are on the node at `port`.
async fn wait_subscribed_on(port: u16, phase: &str) {
    let deadline = Instant::now() + RESUME_LIMIT;
    loop {
        let seen = blocking(|| subscriptions_on(port));
        if seen == Some((2, 2)) {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{phase}: both subscribers were not subscribed on 127.0.0.1:{port} within {RESUME_LIMIT:?}: \
                 expected (PUBSUB NUMSUB news, clients with psub) = (2, 2), last seen {seen:?}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Until every Sentinel names `new` (their failover is over: the leader
/// announces `+switch-master` last, the others follow through hello
/// messages) and once more after that: `PUBLISH news <tag>-<n>` through
/// keyward must reach both subscribers' channel and pattern subscriptions
/// (`:4`), and each subscriber's next frames must be exactly that message
/// and pmessage. keyward may adopt the new master before the Sentinels
/// have finished; from then on a subscriber must not lose a message.
/// Returns a summary: how many messages, how long until the Sentinels
/// settled, and the `/topology` states seen meanwhile.
async fn publish_until_settled(
    kw: &Keyward,
    publisher: &mut Raw,
    subs: [&mut Raw; 2],
    sentinels: &Sentinels,
    new: &str,
    tag: &str,
    phase: &str,
) -> String {
    let [sub2, sub3] = subs;
    let started = Instant::now();
    let admin = kw.admin_port();
    let mut states: Vec<String> = Vec::new();
    let mut n = 0usize;
    let settled_after = loop {
        let settled = blocking(|| {
            (0..sentinels.len()).all(|i| sentinels.master_seen_by(i).as_deref() == Some(new))
        });
        let state = blocking(|| get_topology(admin))
            .map(|t| {
                format!(
                    "{} {}",
                    t.state.unwrap_or_default(),
                    t.master.unwrap_or_default()
                )
            })
            .unwrap_or_else(|e| e);
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        n += 1;
        let payload = format!("{tag}-{n}");
        let receivers = publisher
            .call(&[b"PUBLISH", b"news", payload.as_bytes()])
            .await;
        assert_eq!(
            esc(&receivers),
            ":4\\r\\n",
            "{phase}: PUBLISH news {payload} through keyward {:?} after the subscribers were on \
             {new}: receivers (2 subscribers x channel + pattern); sentinels all name {new}: \
             {settled}; /topology states so far: {states:?}\n--- keyward log (tail) ---\n{}",
            started.elapsed(),
            log_tail(kw)
        );
        expect_delivery(sub2, false, &payload, phase, kw).await;
        expect_delivery(sub3, true, &payload, phase, kw).await;
        if settled {
            break Some(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        tokio::time::sleep(POLL).await;
    };
    format!(
        "{n} messages delivered while the sentinels settled (all named {new} after \
         {settled_after:?}; /topology states {states:?})"
    )
}

/// A RESP2 subscriber (`SUBSCRIBE news`, `PSUBSCRIBE n*`) and a RESP3 one
/// (`HELLO 3` first: push frames) through keyward. They receive what is
/// published on the master; then after a planned switchover
/// (`POST /failover`), and again after the new master is SIGKILLed and the
/// Sentinels promote another node, keyward has subscribed them again on the
/// new master, and every `PUBLISH news` through keyward from then until
/// all Sentinels name that master (and once more) reaches both, on the same
/// connections, as exactly a `message` and a `pmessage` frame: no error, no
/// (un)subscribe confirmation, no closed connection, nothing in between.
/// (Messages published during the switch itself may be lost: README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_keeps_receiving_after_failover() {
    within(TEST_LIMIT, "the whole test", subscriber_body()).await;
}

async fn subscriber_body() {
    let t_test = Instant::now();
    let master = blocking(Redis::start);
    let (mut replicas, sentinels) = blocking(|| group_of(&master));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    let admin = kw.admin_port();

    let mut sub2 = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&sub2.call(&[b"SUBSCRIBE", b"news"]).await),
        esc(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"),
        "RESP2 SUBSCRIBE news through keyward"
    );
    assert_eq!(
        esc(&sub2.call(&[b"PSUBSCRIBE", b"n*"]).await),
        esc(b"*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n"),
        "RESP2 PSUBSCRIBE n* through keyward"
    );
    let mut sub3 = Raw::connect_resp3(kw.port()).await;
    assert_eq!(
        esc(&sub3.call(&[b"SUBSCRIBE", b"news"]).await),
        esc(b">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"),
        "RESP3 SUBSCRIBE news through keyward"
    );
    assert_eq!(
        esc(&sub3.call(&[b"PSUBSCRIBE", b"n*"]).await),
        esc(b">3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n"),
        "RESP3 PSUBSCRIBE n* through keyward"
    );

    // Published straight on the master: both subscribers get it.
    wait_subscribed_on(master.port(), "at start").await;
    assert_eq!(
        esc(&blocking(|| master.call(&[b"PUBLISH", b"news", b"m0"]))),
        ":4\\r\\n",
        "PUBLISH news m0 on the master: receivers"
    );
    expect_delivery(&mut sub2, false, "m0", "before any failover", &kw).await;
    expect_delivery(&mut sub3, true, "m0", "before any failover", &kw).await;
    let t_setup = t_test.elapsed();

    // Part 1: a planned switchover.
    let candidates: Vec<String> = replicas.iter().map(Redis::addr).collect();
    let t_post = Instant::now();
    let answer = blocking(|| post_failover(admin));
    let took_post = t_post.elapsed();
    let new = assert_switched(&answer, &master.addr(), &candidates);
    let new_port = addr_port(&new).expect("port of the new master");
    let t1 = Instant::now();
    wait_subscribed_on(new_port, "after the planned switchover").await;
    let resub1 = t1.elapsed();
    let mut publisher = Raw::connect(kw.port()).await;
    let tail1 = publish_until_settled(
        &kw,
        &mut publisher,
        [&mut sub2, &mut sub3],
        &sentinels,
        &new,
        "m1",
        "after the planned switchover",
    )
    .await;

    // Part 2: the new master crashes. The other replica must be known to
    // the Sentinels as a healthy replica of it first, or they would have
    // nothing to promote.
    let other_port = replicas
        .iter()
        .map(Redis::port)
        .find(|p| *p != new_port)
        .expect("the other replica");
    let t_known = Instant::now();
    wait_replica_known(&sentinels, other_port, new_port).await;
    let known = t_known.elapsed();
    let t_kill = Instant::now();
    let victim = replicas
        .iter_mut()
        .find(|r| r.port() == new_port)
        .expect("the new master among the replicas");
    blocking(|| victim.kill());
    let newer = blocking(|| sentinels.wait_master_change(&new, SWITCH_LIMIT));
    let switched = t_kill.elapsed();
    let newer_port = addr_port(&newer).expect("port of the newest master");
    let t2 = Instant::now();
    wait_subscribed_on(newer_port, "after the crash failover").await;
    let resub2 = t2.elapsed();
    let tail2 = publish_until_settled(
        &kw,
        &mut publisher,
        [&mut sub2, &mut sub3],
        &sentinels,
        &newer,
        "m2",
        "after the crash failover",
    )
    .await;

    // The subscribers' connections are still subscriber connections:
    // (in RESP2 subscribed mode PING answers with a "pong" array).
    assert_eq!(
        esc(&sub2.call(&[b"PING"]).await),
        esc(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
        "PING on the RESP2 subscriber after both failovers"
    );
    eprintln!(
        "subscribers: setup {t_setup:?}; POST /failover -> {new} took {took_post:?}, both \
         subscribed there {resub1:?} later, then {tail1}; other replica known to the sentinels \
         {known:?} later; {new} killed: sentinels promoted {newer} {switched:?} later, subscribers \
         there {resub2:?} after that, then {tail2}"
    );
}

/// Wait until keyward is healthy on `master`.
async fn wait_following(kw: &Keyward, master: &str) {
    let admin = kw.admin_port();
    wait_until(
        &format!("keyward healthy on {master}"),
        DEADLINE,
        || async {
            blocking(|| get_topology(admin)).is_ok_and(|t| {
                t.master.as_deref() == Some(master) && t.state.as_deref() == Some("healthy")
            })
        },
    )
    .await;
}

/// Two Sentinel failovers back to back: the second is asked as soon as
/// every Sentinel names the first one's new master, while the first one's
/// leader is still finishing (its `+switch-master` can arrive after the
/// second has begun). keyward must never go back to a master it left: every
/// write it acknowledged is on the final master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_failovers_lose_no_acknowledged_write() {
    let (master, r1, r2) = blocking(master_with_two_replicas);
    let sentinels = blocking(|| Sentinels::start_down_after(&master, 1000));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    wait_sentinels_know(&sentinels, master.port(), &[r1.port(), r2.port()]).await;
    let writer = ClientLoop::writer(kw.port(), "bb");
    wait_until("writes flow", DEADLINE, || async { writer.oks() > 100 }).await;

    let old = sentinels.master_addr();
    blocking(|| sentinels.failover());
    let first = blocking(|| sentinels.wait_master_change(&old, DEADLINE));
    wait_following(&kw, &first).await;
    wait_until("every sentinel names the new master", DEADLINE, || async {
        blocking(|| {
            (0..sentinels.len())
                .all(|i| sentinels.master_seen_by(i).as_deref() == Some(first.as_str()))
        })
    })
    .await;
    blocking(|| sentinels.failover());
    let second = blocking(|| sentinels.wait_master_change(&first, Duration::from_secs(25)));
    wait_following(&kw, &second).await;
    let settled = Instant::now();
    wait_until("writes flow on the final master", DEADLINE, || async {
        writer.oks_sent_after(settled) > 100
    })
    .await;
    let writes = writer.stop().await;
    let acked: Vec<&Exchange> = writes.iter().filter(|w| w.ok()).collect();
    let final_port = addr_port(&second).expect("port");
    let lost = blocking(|| missing_on(final_port, "bb", &acked));
    eprintln!(
        "back-to-back failovers {old} -> {first} -> {second}: {} writes, {} acknowledged, {} lost, errors {}",
        writes.len(),
        acked.len(),
        lost.len(),
        error_summary(&writes)
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged writes are missing on the final master {second} (first {:?})\n--- keyward log (tail) ---\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        log_tail(&kw)
    );
}

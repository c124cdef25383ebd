//! Planned switchover through keyward, as Redis clients and an operator see
//! it: `POST /failover` on the admin port and `KEYWARD FAILOVER` over RESP
//! move the master to its replica while clients keep writing, with no error
//! reply, no lost and no duplicated write; a switchover that cannot run
//! (no replica, one already running) is refused with 409 and leaves traffic
//! flowing; a client in the middle of a transaction on the old master never
//! sees it commit there; and when there is no verified master for longer
//! than `sentinel.hold_ms`, requests get a bounded `-MASTERDOWN` and writes
//! resume once the Sentinels see the master back.
//!
//! Each test runs real `redis-server` processes (a master, usually one
//! replica) and three real sentinels (tests/support/sentinel.rs), and
//! keyward following the sentinels. Nothing waits by sleeping: every wait
//! polls what keyward (`/ready`, `/topology`), Redis (`ROLE`, `INFO`) or
//! the Sentinels report, against a deadline.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// After a switchover, Sentinel turns the old master into a replica only
/// once it notices it still claims to be a master (about 8 s after the
/// switch: `SENTINEL_PUBLISH_PERIOD * 4`), and the replica then has to sync.
const DEMOTE_LIMIT: Duration = Duration::from_secs(25);

/// `/topology`'s epoch, which must be present.
fn topology_epoch(kw: &Keyward) -> u64 {
    let t = topology(kw);
    t.epoch
        .unwrap_or_else(|| panic!("/topology has no epoch: {}", t.raw))
}

/// Assert a successful switchover answer from `old` to `new`.
fn assert_switched(a: &FailoverAnswer, old: &str, new: &str) -> f64 {
    assert_eq!(a.status, 200, "POST /failover: {}", a.body);
    assert_eq!(a.ok, Some(true), "POST /failover: {}", a.body);
    assert_eq!(a.old.as_deref(), Some(old), "POST /failover: {}", a.body);
    assert_eq!(a.new.as_deref(), Some(new), "POST /failover: {}", a.body);
    a.held_ms
        .unwrap_or_else(|| panic!("POST /failover has no numeric held_ms: {}", a.body))
}

/// Poll `/topology` until its epoch is above `before`; how long it took.
async fn wait_epoch_above(kw: &Keyward, before: u64) -> Duration {
    let t = Instant::now();
    let admin = kw.admin_port();
    wait_until(
        &format!("/topology epoch rises above {before}"),
        DEADLINE,
        || async move {
            blocking(|| get_topology(admin))
                .ok()
                .and_then(|t| t.epoch)
                .is_some_and(|e| e > before)
        },
    )
    .await;
    t.elapsed()
}

/// Which request a recorded operation was.
#[derive(Debug, Clone)]
enum OpKind {
    /// `INCR ctr:<writer>`.
    Incr,
    /// `SET sw:<writer>:<i> <writer>-<i>`.
    Set(u64),
    /// `GET ctr:0`.
    Get,
}

/// One request through keyward and how it ended.
#[derive(Debug, Clone)]
struct Op {
    kind: OpKind,
    sent: Instant,
    answered: Instant,
    answer: Answer,
}

impl Op {
    fn latency(&self) -> Duration {
        self.answered.duration_since(self.sent)
    }

    /// The reply the request must get when nothing went wrong.
    fn acknowledged(&self) -> bool {
        match (&self.kind, self.answer.bytes()) {
            (OpKind::Incr, Some(r)) => r.starts_with(b":"),
            (OpKind::Set(_), Some(r)) => r == b"+OK\r\n",
            (OpKind::Get, Some(r)) => r.starts_with(b"$"),
            _ => false,
        }
    }
}

/// A background client task: a writer (`INCR` its counter, `SET` a unique
/// key, repeat) or a reader (`GET ctr:0`), on its own connection, as fast
/// as replies come back; a writer may first SELECT a database (its own
/// upstream connection through keyward, carried to the new master). Every outcome is recorded; after the first failed
/// exchange (closed, hang) the task stops, since the connection's state is
/// unknown.
struct Worker {
    id: usize,
    db: i64,
    ops: Arc<std::sync::Mutex<Vec<Op>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Worker {
    fn writer(port: u16, id: usize) -> Worker {
        Worker::spawn(port, id, false, 0)
    }

    /// A writer in database `db`.
    fn writer_in(port: u16, id: usize, db: i64) -> Worker {
        Worker::spawn(port, id, false, db)
    }

    fn reader(port: u16, id: usize) -> Worker {
        Worker::spawn(port, id, true, 0)
    }

    fn spawn(port: u16, id: usize, reader: bool, db: i64) -> Worker {
        let ops = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (ops.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut conn = Conn::connect(port).await;
            if db != 0 {
                let select = conn.call(&[b"SELECT", db.to_string().as_bytes()]).await;
                assert!(
                    matches!(&select, Answer::Reply(r) if r == b"+OK\r\n"),
                    "SELECT {db}: {select:?}"
                );
            }
            let ctr = format!("ctr:{id}");
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                let mut round: Vec<(OpKind, Vec<Vec<u8>>)> = Vec::new();
                if reader {
                    round.push((OpKind::Get, vec![b"GET".to_vec(), b"ctr:0".to_vec()]));
                } else {
                    i += 1;
                    round.push((
                        OpKind::Incr,
                        vec![b"INCR".to_vec(), ctr.clone().into_bytes()],
                    ));
                    round.push((
                        OpKind::Set(i),
                        vec![
                            b"SET".to_vec(),
                            format!("sw:{id}:{i}").into_bytes(),
                            format!("{id}-{i}").into_bytes(),
                        ],
                    ));
                }
                for (kind, args) in round {
                    let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                    let sent = Instant::now();
                    let answer = conn.call(&refs).await;
                    let broken = !matches!(answer, Answer::Reply(_));
                    o.lock().unwrap().push(Op {
                        kind,
                        sent,
                        answered: Instant::now(),
                        answer,
                    });
                    if broken {
                        return;
                    }
                }
            }
        });
        Worker {
            id,
            db,
            ops,
            stop,
            task,
        }
    }

    /// Acknowledged requests sent at or after `t`.
    fn acked_since(&self, t: Instant) -> usize {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.sent >= t && o.acknowledged())
            .count()
    }

    /// Whether the task ended by itself (a failed exchange).
    fn gave_up(&self) -> bool {
        self.task.is_finished()
    }

    /// Stop after the request in flight; the full record.
    async fn stop(self) -> (usize, Vec<Op>) {
        let (id, _, ops) = self.stop_in().await;
        (id, ops)
    }

    /// `stop`, with the writer's database.
    async fn stop_in(self) -> (usize, i64, Vec<Op>) {
        self.stop.store(true, Ordering::SeqCst);
        within(REPLY_LIMIT * 2, "stopping a client task", self.task)
            .await
            .expect("client task panicked");
        let ops = std::mem::take(&mut *self.ops.lock().unwrap());
        (self.id, self.db, ops)
    }
}

/// Every reply in `ops` that is not the one a healthy server gives (an
/// error reply, a closed connection, a hang, an unexpected type), with
/// what it was.
fn unexpected(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .enumerate()
        .filter(|(_, o)| !o.acknowledged())
        .map(|(n, o)| match &o.answer {
            Answer::Reply(r) => format!("#{n} {:?}: {}", o.kind, esc(r)),
            Answer::Closed(e) => format!("#{n} {:?}: connection closed ({e})", o.kind),
            Answer::Hang => format!("#{n} {:?}: no reply within {REPLY_LIMIT:?}", o.kind),
        })
        .collect()
}

/// The integer of a `:n` reply.
fn int_reply(r: &[u8]) -> Option<i64> {
    match parse_reply(r).ok()? {
        Reply::Int(n) => Some(n),
        _ => None,
    }
}

/// Wait until the node on `old_port` is a replica of `new_port` with its
/// link up, the new master lists it `state=online`, and every sentinel
/// lists it as a replica that is not down or disconnected (what Sentinel's
/// replica selection needs before it accepts `SENTINEL FAILOVER`).
async fn wait_demoted_and_known(sentinels: &Sentinels, old_port: u16, new_port: u16) -> Duration {
    let t = Instant::now();
    wait_until(
        &format!("127.0.0.1:{old_port} is a synced replica of 127.0.0.1:{new_port} known to every sentinel"),
        DEMOTE_LIMIT,
        || async move {
            blocking(|| {
                if !replica_link_up(old_port) {
                    return false;
                }
                let info = match try_redis_cmd(new_port, &[b"INFO", b"replication"], DEADLINE) {
                    Ok(r) => String::from_utf8_lossy(&r).into_owned(),
                    Err(_) => return false,
                };
                let online = info.lines().any(|l| {
                    l.starts_with("slave")
                        && l.contains(&format!("port={old_port},"))
                        && l.contains("state=online")
                });
                if !online {
                    return false;
                }
                sentinels.all_know_healthy_replica(old_port, None)
            })
        },
    )
    .await;
    t.elapsed()
}

/// Four writers and a reader through keyward while `POST /failover` moves
/// the master to the replica: not one error reply, closed connection or
/// hang; `/topology` names the new master with a higher epoch; every
/// acknowledged `SET` is on the new master with its value; every counter on
/// the new master equals the last `INCR` reply its writer got, and the
/// `INCR` replies count 1, 2, 3, ... without a gap or a repeat (no
/// acknowledged write lost, none applied twice); the reader never sees the
/// counter go backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_has_zero_client_errors() {
    let (master, replica, _sentinels, kw) = sentinel_stack(1000).await;
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

    // Writer 3 works in database 3: its upstream connection is its own,
    // held and carried to the new master like the shared pool's requests.
    let writers: Vec<Worker> = (0..4)
        .map(|w| match w {
            3 => Worker::writer_in(kw.port(), w, 3),
            _ => Worker::writer(kw.port(), w),
        })
        .collect();
    let reader = Worker::reader(kw.port(), 99);
    let t0 = Instant::now();
    wait_until(
        "every client has 100 acknowledged requests",
        DEADLINE,
        || {
            let (ws, r) = (&writers, &reader);
            async move {
                ws.iter()
                    .chain([r])
                    .all(|w| w.acked_since(t0) >= 100 || w.gave_up())
            }
        },
    )
    .await;

    let admin = kw.admin_port();
    let t_post = Instant::now();
    let answer = blocking(|| post_failover(admin));
    let t_done = Instant::now();
    let held_ms = assert_switched(&answer, &master.addr(), &replica.addr());

    // The switchover answered only after keyward adopted the new master.
    let after = blocking(|| topology(&kw));
    assert_eq!(
        after.master.as_deref(),
        Some(replica.addr().as_str()),
        "/topology right after the switchover: {}",
        after.raw
    );
    assert_eq!(
        after.state.as_deref(),
        Some("healthy"),
        "/topology: {}",
        after.raw
    );
    let epoch_delay = wait_epoch_above(&kw, epoch_before).await;

    // Keep the clients going a little on the new master.
    wait_until(
        "every client has 50 acknowledged requests after the switchover",
        DEADLINE,
        || {
            let (ws, r) = (&writers, &reader);
            async move {
                ws.iter()
                    .chain([r])
                    .all(|w| w.acked_since(t_done) >= 50 || w.gave_up())
            }
        },
    )
    .await;
    let mut records = Vec::new();
    for w in writers {
        records.push(w.stop_in().await);
    }
    let (_, reads) = reader.stop().await;

    let all: Vec<&Op> = records
        .iter()
        .flat_map(|(_, _, ops)| ops.iter())
        .chain(reads.iter())
        .collect();
    let slowest = all.iter().map(|o| o.latency()).max().unwrap_or_default();
    let during = all
        .iter()
        .filter(|o| o.answered >= t_post && o.sent <= t_done)
        .count();
    eprintln!(
        "planned switchover {} -> {}: held_ms {held_ms} (keyward), POST /failover took {:?}, \
         /topology epoch rose {:?} after it returned; {} requests in total, {during} of them \
         overlapping the switchover, slowest reply {slowest:?}",
        master.addr(),
        replica.addr(),
        t_done.duration_since(t_post),
        epoch_delay,
        all.len()
    );

    // Not one error: every client saw only ordinary replies.
    for (id, _, ops) in records.iter() {
        let bad = unexpected(ops);
        assert!(
            bad.is_empty(),
            "writer {id}: {} of {} requests did not get their normal reply during a planned switchover: first {:?}",
            bad.len(),
            ops.len(),
            &bad[..bad.len().min(10)]
        );
    }
    let bad = unexpected(&reads);
    assert!(
        bad.is_empty(),
        "reader: {} of {} GETs did not get their normal reply: first {:?}",
        bad.len(),
        reads.len(),
        &bad[..bad.len().min(10)]
    );

    // The reader never went back in time.
    let mut last = 0i64;
    for (n, o) in reads.iter().enumerate() {
        let v = match parse_reply(o.answer.bytes().unwrap()) {
            Ok(Reply::Bulk(Some(b))) => String::from_utf8_lossy(&b)
                .parse::<i64>()
                .unwrap_or_else(|_| panic!("GET ctr:0 #{n}: not a number: {}", esc(&b))),
            Ok(Reply::Bulk(None)) => 0,
            other => panic!("GET ctr:0 #{n}: {other:?}"),
        };
        assert!(
            v >= last,
            "GET ctr:0 #{n} went backwards across the switchover: {last} then {v}"
        );
        last = v;
    }

    // Nothing acknowledged was lost or applied twice.
    let new_port = replica.port();
    for (id, db, ops) in &records {
        // Read back on the new master, in the writer's database.
        let db = db.to_string();
        let on_new = |args: &[&[u8]]| blocking(|| redis_cmd_in(new_port, &db, args));
        let incrs: Vec<i64> = ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Incr))
            .map(|o| int_reply(o.answer.bytes().unwrap()).expect("checked: integer reply"))
            .collect();
        for (k, v) in incrs.iter().enumerate() {
            assert_eq!(
                *v,
                k as i64 + 1,
                "writer {id}: INCR reply #{k} was {v}, expected {} (an INCR lost or applied twice); replies around it: {:?}",
                k + 1,
                &incrs[k.saturating_sub(3)..(k + 3).min(incrs.len())]
            );
        }
        let on_master = on_new(&[b"GET", format!("ctr:{id}").as_bytes()]);
        let expected = incrs.last().copied().unwrap_or(0).to_string();
        assert_eq!(
            esc(&on_master),
            esc(format!("${}\r\n{expected}\r\n", expected.len()).as_bytes()),
            "writer {id}: counter ctr:{id} on the new master {} differs from the last acknowledged INCR",
            replica.addr()
        );

        let sets: Vec<u64> = ops
            .iter()
            .filter_map(|o| match o.kind {
                OpKind::Set(i) => Some(i),
                _ => None,
            })
            .collect();
        let mut missing = Vec::new();
        for batch in sets.chunks(500) {
            let keys: Vec<String> = batch.iter().map(|i| format!("sw:{id}:{i}")).collect();
            let mut args: Vec<&[u8]> = vec![b"MGET"];
            args.extend(keys.iter().map(|k| k.as_bytes()));
            let reply = on_new(&args);
            let values = parse_reply(&reply)
                .ok()
                .and_then(Reply::array)
                .unwrap_or_else(|| panic!("MGET on the new master: {}", esc(&reply)));
            assert_eq!(values.len(), batch.len(), "MGET reply length");
            for (i, v) in batch.iter().zip(values) {
                let want = format!("{id}-{i}");
                if v.text().as_deref() != Some(want.as_str()) {
                    missing.push((*i, v.text()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "writer {id}: {} of {} acknowledged SETs are not on the new master {} (index, value found): first {:?}",
            missing.len(),
            sets.len(),
            replica.addr(),
            &missing[..missing.len().min(20)]
        );
    }
}

/// Two switchovers one after the other: `KEYWARD FAILOVER` over RESP
/// (while it runs, a second request, `POST /failover`, is refused with 409
/// "already running"), then, once Sentinel has turned the old master into
/// a synced replica, `POST /failover` again: both succeed and the master is
/// back where it started, with the data written in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_twice_goes_back() {
    let (master, replica, sentinels, kw) = sentinel_stack(1000).await;
    let admin = kw.admin_port();
    let epoch0 = blocking(|| topology_epoch(&kw));

    // First switchover over RESP, from a client of its own.
    let port = kw.port();
    let t1 = Instant::now();
    let first = tokio::spawn(async move {
        let mut c = Conn::connect(port).await;
        c.call(&[b"KEYWARD", b"FAILOVER"]).await
    });
    // While it runs (requests are held: /ready says no verified master),
    // a second one is refused.
    wait_until("/ready reports the switchover's hold", DEADLINE, || {
        let first = &first;
        async move {
            let (status, body) = blocking(|| http_get(admin, "/ready"));
            (status == 503 && body.contains("no verified master")) || first.is_finished()
        }
    })
    .await;
    assert!(
        !first.is_finished(),
        "the first switchover finished before a second one could be tried"
    );
    let second = blocking(|| post_failover(admin));
    assert_eq!(
        second.status, 409,
        "POST /failover during a running switchover: {}",
        second.body
    );
    assert_eq!(second.ok, Some(false), "{}", second.body);
    assert!(
        second
            .error
            .as_deref()
            .is_some_and(|e| e.contains("already running")),
        "409 body should say a switchover is already running: {}",
        second.body
    );

    let reply = within(REPLY_LIMIT, "KEYWARD FAILOVER", first)
        .await
        .expect("KEYWARD FAILOVER task panicked");
    let took1 = t1.elapsed();
    assert!(
        matches!(&reply, Answer::Reply(r) if r == b"+OK\r\n"),
        "KEYWARD FAILOVER answered {reply:?}, expected +OK"
    );
    let topo = blocking(|| topology(&kw));
    assert_eq!(
        topo.master.as_deref(),
        Some(replica.addr().as_str()),
        "/topology after the first switchover: {}",
        topo.raw
    );
    wait_epoch_above(&kw, epoch0).await;
    let epoch1 = blocking(|| topology_epoch(&kw));

    let mut c = Conn::connect(kw.port()).await;
    let set = c.call(&[b"SET", b"between", b"1"]).await;
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n"),
        "SET after the first switchover: {set:?}"
    );

    // Sentinel demotes the old master and it resyncs from the new one.
    let settle = wait_demoted_and_known(&sentinels, master.port(), replica.port()).await;

    let t2 = Instant::now();
    let back = blocking(|| post_failover(admin));
    let took2 = t2.elapsed();
    let held2 = assert_switched(&back, &replica.addr(), &master.addr());
    let topo = blocking(|| topology(&kw));
    assert_eq!(
        topo.master.as_deref(),
        Some(master.addr().as_str()),
        "/topology after the second switchover: {}",
        topo.raw
    );
    wait_epoch_above(&kw, epoch1).await;
    assert_eq!(role_of(master.port()).as_deref(), Some("master"));

    let get = c.call(&[b"GET", b"between"]).await;
    assert!(
        matches!(&get, Answer::Reply(r) if r == b"$1\r\n1\r\n"),
        "GET through keyward after going back to the original master: {get:?}"
    );
    let set = c.call(&[b"SET", b"after", b"2"]).await;
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n"),
        "SET after the second switchover: {set:?}"
    );
    assert_eq!(
        blocking(|| master.call(&[b"GET", b"after"])),
        b"$1\r\n2\r\n",
        "the write after going back is not on the original master"
    );
    eprintln!(
        "two switchovers: KEYWARD FAILOVER took {took1:?}; old master demoted, synced and known to the sentinels {settle:?} later; \
         POST /failover back took {took2:?} (held_ms {held2})"
    );
}

/// With no replica, `POST /failover` (and `KEYWARD FAILOVER`) are refused
/// with 409 / an error reply, and the hold and the `CLIENT PAUSE WRITE` on
/// the master are released: writes go through at once, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_refused_without_a_replica() {
    let master = blocking(Redis::start);
    let sentinels = blocking(|| Sentinels::start(&master));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    let admin = kw.admin_port();

    let refused = blocking(|| post_failover(admin));
    assert_eq!(
        refused.status, 409,
        "POST /failover without a replica: {}",
        refused.body
    );
    assert_eq!(refused.ok, Some(false), "{}", refused.body);
    assert!(
        refused.error.as_deref().is_some_and(|e| !e.is_empty()),
        "409 body has no error text: {}",
        refused.body
    );

    // Traffic is not held any more, and the master is not paused (the pause
    // would last sentinel.hold_ms = 5 s).
    let mut c = Conn::connect(kw.port()).await;
    let t = Instant::now();
    let set = c.call(&[b"SET", b"after-refusal", b"v"]).await;
    let set_took = t.elapsed();
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n"),
        "SET after a refused switchover: {set:?}"
    );
    assert!(
        set_took < Duration::from_secs(2),
        "SET after a refused switchover took {set_took:?}: still held or the master still paused"
    );
    let get = c.call(&[b"GET", b"after-refusal"]).await;
    assert!(
        matches!(&get, Answer::Reply(r) if r == b"$1\r\nv\r\n"),
        "GET after a refused switchover: {get:?}"
    );
    assert_eq!(
        blocking(|| master.call(&[b"GET", b"after-refusal"])),
        b"$1\r\nv\r\n"
    );
    assert_eq!(blocking(|| http_get(admin, "/ready").0), 200);

    // The RESP form is refused the same way, then traffic flows again.
    let refusal = c.call(&[b"KEYWARD", b"FAILOVER"]).await;
    assert!(
        matches!(&refusal, Answer::Reply(r) if r.starts_with(b"-ERR switchover failed")),
        "KEYWARD FAILOVER without a replica: {refusal:?}"
    );
    let t = Instant::now();
    let set = c.call(&[b"SET", b"after-refusal", b"w"]).await;
    let set_took2 = t.elapsed();
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n") && set_took2 < Duration::from_secs(2),
        "SET after a refused KEYWARD FAILOVER: {set:?} after {set_took2:?}"
    );
    eprintln!(
        "refused switchover: {}; SET after it took {set_took:?} (and {set_took2:?} after the RESP refusal)",
        refused.body
    );
}

/// `sentinel.hold_ms = 800`, no replica, the master killed: once keyward
/// has noticed, a `SET` is held and then answered
/// `-MASTERDOWN no verified master for 'mymaster' (state: ...) after 800 ms
/// (sentinel.hold_ms)`, not before about hold_ms and within 5 s, and so is
/// every request of a pipeline of 10 (the hold bounds the wait, not each
/// request in turn); `/ready` is 503. The master restarted on the same
/// port: the Sentinels see it back, keyward verifies it and writes work
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_get_masterdown_after_hold_ms() {
    let mut master = blocking(Redis::start);
    let sentinels = blocking(|| Sentinels::start_down_after(&master, 500));
    let kw = blocking(|| start_keyward_sentinel_config(&sentinels, "[sentinel]\nhold_ms = 800\n"));
    wait_ready(&kw, READY_LIMIT).await;
    let admin = kw.admin_port();
    let mut c = Conn::connect(kw.port()).await;
    let set = c.call(&[b"SET", b"k", b"before"]).await;
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n"),
        "SET before the crash: {set:?}"
    );

    blocking(|| master.kill());
    let t_kill = Instant::now();
    wait_until(
        "/topology leaves the healthy state",
        DEADLINE,
        || async move {
            blocking(|| get_topology(admin))
                .ok()
                .and_then(|t| t.state)
                .is_some_and(|s| s != "healthy")
        },
    )
    .await;
    let noticed = t_kill.elapsed();
    let state = blocking(|| topology(&kw)).state;

    let t = Instant::now();
    let answer = c.call(&[b"SET", b"k", b"during"]).await;
    let took = t.elapsed();
    let reply = match &answer {
        Answer::Reply(r) => String::from_utf8_lossy(r).into_owned(),
        other => panic!("SET with no master: expected -MASTERDOWN, got {other:?}"),
    };
    assert!(
        reply.starts_with("-MASTERDOWN no verified master for 'mymaster' (state: ")
            && reply.ends_with(" after 800 ms (sentinel.hold_ms)\r\n"),
        "SET with no master answered {:?} after {took:?}, expected \
         -MASTERDOWN no verified master for 'mymaster' (state: ...) after 800 ms (sentinel.hold_ms)",
        reply
    );
    assert!(
        took >= Duration::from_millis(600),
        "-MASTERDOWN came after only {took:?}: the request was not held for sentinel.hold_ms = 800"
    );
    assert!(
        took <= Duration::from_secs(5),
        "-MASTERDOWN came after {took:?}: held far longer than sentinel.hold_ms = 800"
    );
    let (status, body) = blocking(|| http_get(admin, "/ready"));
    assert_eq!(status, 503, "/ready with no master: {body}");
    let text = blocking(|| get_metrics(admin));
    let held_out = metric(
        &text,
        "keyward_limit_reached_total{limit=\"sentinel.hold_ms\"}",
    );
    assert!(
        held_out.is_some_and(|n| n >= 1.0),
        "the SET answered MASTERDOWN after sentinel.hold_ms is counted: {held_out:?}"
    );

    // A pipeline is held as a whole, not request after request: all of it
    // is answered within the same bound. Measured now, asserted at the end
    // so that the recovery below is exercised either way.
    let pipeline = pipelined_sets(kw.port(), PIPELINE, Duration::from_secs(15)).await;
    eprintln!(
        "master killed: keyward left healthy {noticed:?} after the kill (state {state:?}); \
         SET answered {:?} after {took:?}; /ready: {status} {}; \
         a pipeline of {PIPELINE} SETs: replies after {:?}",
        reply.trim_end(),
        body.trim_end(),
        pipeline.iter().map(|(d, _)| *d).collect::<Vec<_>>()
    );

    // The master comes back (empty: no persistence) on the same port.
    blocking(|| master.restart());
    let t_back = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let a = c.call(&[b"SET", b"k", b"after"]).await;
        match &a {
            Answer::Reply(r) if r == b"+OK\r\n" => break,
            Answer::Reply(r) if r.starts_with(b"-MASTERDOWN") || r.starts_with(b"-ERR") => {
                let text = String::from_utf8_lossy(r).trim_end().to_string();
                if !seen.contains(&text) {
                    seen.push(text);
                }
            }
            other => panic!("SET while the master comes back: {other:?}"),
        }
        if t_back.elapsed() > Duration::from_secs(20) {
            panic!(
                "writes through keyward did not resume within 20 s of the master's restart; replies: {seen:?}; /topology: {}",
                blocking(|| topology(&kw)).raw
            );
        }
        // Each attempt is itself held up to hold_ms: no extra pause needed.
    }
    let resumed = t_back.elapsed();
    assert_eq!(
        blocking(|| master.call(&[b"GET", b"k"])),
        b"$5\r\nafter\r\n",
        "the write after the restart is not on the master"
    );
    let get = c.call(&[b"GET", b"k"]).await;
    assert!(
        matches!(&get, Answer::Reply(r) if r == b"$5\r\nafter\r\n"),
        "GET through keyward after the restart: {get:?}"
    );
    let admin2 = admin;
    wait_until("/ready is 200 again", DEADLINE, || async move {
        blocking(|| http_get(admin2, "/ready").0) == 200
    })
    .await;
    eprintln!("master restarted: writes through keyward resumed {resumed:?} later; replies meanwhile: {seen:?}");

    let masterdown = |r: &[u8]| {
        r.starts_with(b"-MASTERDOWN no verified master for 'mymaster' (state: ")
            && r.ends_with(b" after 800 ms (sentinel.hold_ms)\r\n")
    };
    let summary: Vec<(Duration, String)> = pipeline.iter().map(|(d, r)| (*d, esc(r))).collect();
    assert!(
        pipeline.len() == PIPELINE
            && pipeline
                .iter()
                .all(|(d, r)| masterdown(r) && *d <= Duration::from_secs(5)),
        "a pipeline of {PIPELINE} SETs sent while there was no master (sentinel.hold_ms = 800): \
         expected {PIPELINE} -MASTERDOWN replies, each within 5 s of sending; got {} replies \
         (time after sending, reply): {summary:?}",
        pipeline.len()
    );
}

/// Pipeline length for the hold check in `requests_get_masterdown_after_hold_ms`.
const PIPELINE: usize = 10;

/// Send `n` `SET pk:<i> <i>` in one write on a fresh connection and read
/// replies until `n` arrived, the connection closed or `limit` passed;
/// each reply with its time after sending.
async fn pipelined_sets(port: u16, n: usize, limit: Duration) -> Vec<(Duration, Vec<u8>)> {
    let mut conn = Conn::connect(port).await;
    let mut bytes = Vec::new();
    for i in 0..n {
        let (k, v) = (format!("pk:{i}"), i.to_string());
        bytes.extend_from_slice(&cmd(&[b"SET", k.as_bytes(), v.as_bytes()]));
    }
    let sent = Instant::now();
    conn.stream
        .write_all(&bytes)
        .await
        .expect("write the pipeline to keyward");
    let deadline = sent + limit;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < n {
        if let Some(len) = frame_len(&conn.buf).expect("valid RESP from keyward") {
            out.push((sent.elapsed(), conn.buf.drain(..len).collect()));
            continue;
        }
        match tokio::time::timeout_at(deadline, conn.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => conn.buf.extend_from_slice(&chunk[..k]),
        }
    }
    out
}

/// A client that sent `MULTI` and `SET` (queued, no `EXEC` yet) through
/// keyward when a planned switchover runs: its transaction must not commit
/// on the old master. Its `EXEC` gets an error reply or its connection is
/// closed, the key is on neither node, and other clients work on the new
/// master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_on_old_master_fails_cleanly_on_switchover() {
    let (master, replica, _sentinels, kw) = sentinel_stack(1000).await;

    let mut tx = Conn::connect(kw.port()).await;
    let multi = tx.call(&[b"MULTI"]).await;
    assert!(
        matches!(&multi, Answer::Reply(r) if r == b"+OK\r\n"),
        "MULTI: {multi:?}"
    );
    let queued = tx.call(&[b"SET", b"txkey", b"from-multi"]).await;
    assert!(
        matches!(&queued, Answer::Reply(r) if r == b"+QUEUED\r\n"),
        "SET in MULTI: {queued:?}"
    );

    let admin = kw.admin_port();
    let answer = blocking(|| post_failover(admin));
    let held_ms = assert_switched(&answer, &master.addr(), &replica.addr());

    let exec = tx.call(&[b"EXEC"]).await;
    let acceptable = match &exec {
        Answer::Reply(r) => r.starts_with(b"-"),
        Answer::Closed(_) => true,
        Answer::Hang => false,
    };
    assert!(
        acceptable,
        "EXEC of a transaction opened on the old master, after the switchover: {exec:?} \
         (expected an error reply or a closed connection)"
    );
    // Checked before Sentinel demotes the old master (which would discard
    // its data): the transaction ran nowhere.
    let on_old = blocking(|| try_redis_cmd(master.port(), &[b"GET", b"txkey"], DEADLINE));
    assert_eq!(
        on_old.as_deref().map(esc),
        Ok("$-1\\r\\n".to_string()),
        "the transaction's key on the old master {}",
        master.addr()
    );
    assert_eq!(
        esc(&blocking(|| replica.call(&[b"GET", b"txkey"]))),
        "$-1\\r\\n",
        "the transaction's key on the new master {}",
        replica.addr()
    );

    // Other clients (new and the same one reconnecting) work on the new master.
    let mut other = Conn::connect(kw.port()).await;
    let set = other.call(&[b"SET", b"other", b"ok"]).await;
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n"),
        "SET from another client after the switchover: {set:?}"
    );
    assert_eq!(
        blocking(|| replica.call(&[b"GET", b"other"])),
        b"$2\r\nok\r\n",
        "the write after the switchover is not on the new master"
    );
    let mut again = Conn::connect(kw.port()).await;
    let multi = again.call(&[b"MULTI"]).await;
    let queued = again.call(&[b"SET", b"txkey", b"retry"]).await;
    let exec2 = again.call(&[b"EXEC"]).await;
    assert!(
        matches!(&multi, Answer::Reply(r) if r == b"+OK\r\n")
            && matches!(&queued, Answer::Reply(r) if r == b"+QUEUED\r\n")
            && matches!(&exec2, Answer::Reply(r) if r == b"*1\r\n+OK\r\n"),
        "a new transaction after the switchover: MULTI {multi:?}, SET {queued:?}, EXEC {exec2:?}"
    );
    assert_eq!(
        blocking(|| replica.call(&[b"GET", b"txkey"])),
        b"$5\r\nretry\r\n"
    );
    eprintln!("transaction across a switchover: EXEC got {exec:?}; switchover held_ms {held_ms}");
}

/// A replica the Sentinels could promote, and would prefer (lower
/// `replica-priority`), whose link to the master is down: writes
/// acknowledged since are not on it. The switchover is refused with 409
/// naming it, though another replica has caught up, instead of letting
/// SENTINEL FAILOVER pick the cut-off one and lose those writes; traffic
/// goes on on the old master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_refused_while_a_promotable_replica_is_cut_off() {
    let (master, healthy, preferred) = blocking(master_with_two_replicas);
    assert_eq!(
        blocking(|| preferred.call(&[b"CONFIG", b"SET", b"replica-priority", b"1"])),
        b"+OK\r\n"
    );
    let sentinels = blocking(|| Sentinels::start_down_after(&master, 1000));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    let (mport, pport) = (master.port(), preferred.port());
    wait_sentinels_know(&sentinels, mport, &[healthy.port(), pport]).await;
    // The preferred replica cannot reconnect: it now authenticates as a
    // user that does not exist.
    for args in [
        &[&b"CONFIG"[..], b"SET", b"masteruser", b"nosuch"][..],
        &[b"CONFIG", b"SET", b"masterauth", b"wrong"],
    ] {
        assert_eq!(blocking(|| preferred.call(args)), b"+OK\r\n");
    }
    blocking(|| master.call(&[b"CLIENT", b"KILL", b"TYPE", b"replica"]));
    wait_until("the preferred replica's link is down", DEADLINE, || async {
        !blocking(|| replica_link_up(pport))
    })
    .await;
    let mut c = Conn::connect(kw.port()).await;
    let set = c.call(&[b"SET", b"acked-while-cut-off", b"v"]).await;
    assert!(
        matches!(&set, Answer::Reply(r) if r == b"+OK\r\n"),
        "{set:?}"
    );

    let admin = kw.admin_port();
    let refused = blocking(|| post_failover(admin));
    assert_eq!(refused.status, 409, "POST /failover: {}", refused.body);
    let error = refused.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("127.0.0.1:{pport}")) && error.contains("did not catch up"),
        "the refusal should name the replica that did not catch up: {}",
        refused.body
    );
    assert_eq!(blocking(|| role_of(mport)).as_deref(), Some("master"));
    let get = c.call(&[b"GET", b"acked-while-cut-off"]).await;
    assert!(
        matches!(&get, Answer::Reply(r) if r == b"$1\r\nv\r\n"),
        "GET after the refusal: {get:?}"
    );
}

/// A write in database 3 (a dedicated connection keyward carries to the new
/// master) is already at the master, waiting there, when the switchover
/// starts: the switchover waits for its reply before it pauses the master,
/// as it does for the shared pool's, and the client gets `+OK`, not an
/// "outcome unknown" error. The write waits behind the test's own short
/// `CLIENT PAUSE WRITE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_waits_for_a_carried_clients_write_in_flight() {
    let (master, replica, _sentinels, kw) = sentinel_stack(1000).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(esc(&c.call(&[b"SELECT", b"3"]).await), esc(b"+OK\r\n"));
    let master_port = master.port();
    assert_eq!(
        esc(&blocking(|| redis_cmd(
            master_port,
            &[b"CLIENT", b"PAUSE", b"1000", b"WRITE"]
        ))),
        esc(b"+OK\r\n")
    );
    c.send(&cmd(&[b"SET", b"in-flight", b"v"])).await;
    wait_until(
        "the SET waits at the master (CLIENT LIST: db=3, blocked, cmd=set)",
        DEADLINE,
        || async move {
            let list = blocking(|| redis_cmd(master_port, &[b"CLIENT", b"LIST"]));
            String::from_utf8_lossy(&list)
                .lines()
                .any(|l| l.contains(" db=3 ") && l.contains(" flags=b ") && l.contains(" cmd=set "))
        },
    )
    .await;
    let admin = kw.admin_port();
    let answer = blocking(|| post_failover(admin));
    assert_switched(&answer, &master.addr(), &replica.addr());
    assert_eq!(
        esc(&c.read_reply().await),
        esc(b"+OK\r\n"),
        "the SET's reply"
    );
    let new_port = replica.port();
    let on_new = blocking(|| redis_cmd_in(new_port, "3", &[b"GET", b"in-flight"]));
    assert_eq!(esc(&on_new), esc(b"$1\r\nv\r\n"), "db 3 of the new master");
    // The client goes on, in database 3, on the new master.
    assert_eq!(
        esc(&c.call(&[b"GET", b"in-flight"]).await),
        esc(b"$1\r\nv\r\n")
    );
}

/// A client in database 3, idle, sends `SELECT 0` and a write in one go
/// while a planned switchover holds requests: the `SELECT 0` ends its
/// state before its reply has come, and the write behind it must be held
/// too (the connection is carried over), not written to the paused old
/// master and answered "outcome unknown". Another, also in db 3, sends
/// `CLIENT REPLY SKIP` and two writes: the first stays silent on the new
/// master's connection too, and the second gets its `+OK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_ending_requests_sent_during_the_hold_get_no_error() {
    let (master, replica, _sentinels, kw) = sentinel_stack(1000).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(esc(&c.call(&[b"SELECT", b"3"]).await), esc(b"+OK\r\n"));
    // Another one silences its next write with CLIENT REPLY SKIP.
    let mut skipping = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&skipping.call(&[b"SELECT", b"3"]).await),
        esc(b"+OK\r\n")
    );
    // A third, in db 4, subscribed to two channels, unsubscribes from all.
    let mut subscriber = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&subscriber.call(&[b"SELECT", b"4"]).await),
        esc(b"+OK\r\n")
    );
    subscriber.send(&cmd(&[b"SUBSCRIBE", b"c1", b"c2"])).await;
    assert_eq!(
        subscriber.read_replies(2).await.concat(),
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nc2\r\n:2\r\n"
    );
    let admin = kw.admin_port();
    let switchover = tokio::task::spawn_blocking(move || post_failover(admin));
    // A request of another client waits in the hold: the switchover is on.
    let mut probe = Raw::connect(kw.port()).await;
    probe.send(&cmd(&[b"PING"])).await;
    wait_until("a request is held", DEADLINE, || async {
        metric(&metrics(&kw).await, "keyward_held_requests").unwrap_or(0.0) >= 1.0
    })
    .await;
    c.send(
        &[
            cmd(&[b"SELECT", b"0"]),
            cmd(&[b"SET", b"after-select", b"v"]),
        ]
        .concat(),
    )
    .await;
    skipping
        .send(
            &[
                cmd(&[b"CLIENT", b"REPLY", b"SKIP"]),
                cmd(&[b"SET", b"skipped", b"1"]),
                cmd(&[b"SET", b"answered", b"2"]),
            ]
            .concat(),
        )
        .await;
    subscriber
        .send(&[cmd(&[b"UNSUBSCRIBE"]), cmd(&[b"SET", b"in4", b"w"])].concat())
        .await;
    let answer = within(REPLY_LIMIT * 4, "the switchover", switchover)
        .await
        .expect("post_failover panicked");
    assert_switched(&answer, &master.addr(), &replica.addr());
    let replies = c.read_replies(2).await;
    assert_eq!(
        replies.iter().map(|r| esc(r)).collect::<Vec<_>>(),
        [esc(b"+OK\r\n"), esc(b"+OK\r\n")],
        "SELECT 0 and SET sent during the hold"
    );
    assert_eq!(esc(&probe.read_reply().await), esc(b"+PONG\r\n"));
    // One confirmation per channel (Redis picks the order), counting down
    // to 0, then the SET in db 4.
    let confirmations = subscriber.read_replies(2).await;
    let got: Vec<String> = confirmations.iter().map(|r| esc(r)).collect();
    let ok = |first: &[u8], second: &[u8]| {
        let want = |ch: &[u8], n: u8| {
            let mut r = b"*3\r\n$11\r\nunsubscribe\r\n$2\r\n".to_vec();
            r.extend_from_slice(ch);
            r.extend_from_slice(format!("\r\n:{n}\r\n").as_bytes());
            esc(&r)
        };
        got == [want(first, 1), want(second, 0)]
    };
    assert!(
        ok(b"c1", b"c2") || ok(b"c2", b"c1"),
        "UNSUBSCRIBE of both channels: {got:?}"
    );
    assert_eq!(esc(&subscriber.read_reply().await), esc(b"+OK\r\n"));
    // Only the second SET is answered, then the client goes on in db 3.
    assert_eq!(esc(&skipping.read_reply().await), esc(b"+OK\r\n"));
    assert_eq!(
        esc(&skipping.call(&[b"MGET", b"skipped", b"answered"]).await),
        esc(b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n")
    );
    let new_port = replica.port();
    let on_new = blocking(|| redis_cmd(new_port, &[b"GET", b"after-select"]));
    assert_eq!(esc(&on_new), esc(b"$1\r\nv\r\n"), "db 0 of the new master");
}

/// A client connects, enters database 3, writes, goes back to 0 and writes,
/// all pipelined, again and again through a planned switchover: the rounds
/// that meet the hold are carried over, and every reply is the normal one.
/// Where in a round the hold lands is up to timing; the case of a `SELECT 0`
/// met by the hold is pinned down in
/// `state_ending_requests_sent_during_the_hold_get_no_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_its_database_mid_switchover_gets_no_error() {
    let (master, replica, _sentinels, kw) = sentinel_stack(1000).await;
    let port = kw.port();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s, d) = (stop.clone(), done.clone());
    let client = tokio::spawn(async move {
        let mut rounds = 0u64;
        while !s.load(Ordering::SeqCst) {
            rounds += 1;
            let mut c = Raw::connect(port).await;
            let i = rounds.to_string();
            let frames: Vec<u8> = [
                cmd(&[b"SELECT", b"3"]),
                cmd(&[b"SET", b"in3", i.as_bytes()]),
                cmd(&[b"SELECT", b"0"]),
                cmd(&[b"SET", b"in0", i.as_bytes()]),
            ]
            .concat();
            c.send(&frames).await;
            let replies = c.read_replies(4).await;
            for (n, r) in replies.iter().enumerate() {
                assert_eq!(
                    esc(r),
                    esc(b"+OK\r\n"),
                    "round {rounds}: reply {n} of SELECT 3, SET, SELECT 0, SET"
                );
            }
            d.store(rounds, Ordering::SeqCst);
        }
        rounds
    });
    let rounds_done = |n: u64| {
        let d = done.clone();
        async move { d.load(Ordering::SeqCst) >= n }
    };
    wait_until("20 rounds before the switchover", DEADLINE, || {
        rounds_done(20)
    })
    .await;
    let admin = kw.admin_port();
    let answer = blocking(|| post_failover(admin));
    assert_switched(&answer, &master.addr(), &replica.addr());
    let after = done.load(Ordering::SeqCst) + 20;
    wait_until("20 more rounds after it", DEADLINE, || rounds_done(after)).await;
    stop.store(true, Ordering::SeqCst);
    let rounds = within(REPLY_LIMIT * 2, "the client task", client)
        .await
        .expect("the client saw a reply other than +OK");
    // The last round's writes are on the new master, each in its database.
    let new_port = replica.port();
    let last = rounds.to_string();
    let in3 = blocking(|| redis_cmd_in(new_port, "3", &[b"GET", b"in3"]));
    let in0 = blocking(|| redis_cmd(new_port, &[b"GET", b"in0"]));
    let want = format!("${}\r\n{last}\r\n", last.len());
    assert_eq!(esc(&in3), esc(want.as_bytes()), "db 3 on the new master");
    assert_eq!(esc(&in0), esc(want.as_bytes()), "db 0 on the new master");
}

/// Who is carried and who is not, and a switchover asked for by a client in
/// a database with a write pipelined behind it:
/// - after `MULTI; SELECT 5; DISCARD` the database is not known (the SELECT
///   never ran): that client is not carried (it is closed) rather than
///   carried into the wrong database; one more `SELECT` makes it known;
/// - `KEYWARD FAILOVER` + `SET` from a client in db 3: both answered, the
///   write lands in db 3 of the new master, and nothing stays counted in
///   flight (a stuck count made every later switchover wait and fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncertain_databases_are_not_carried_and_own_failover_requests_are() {
    let (master, replica, _sentinels, kw) = sentinel_stack(1000).await;
    let discard = pipeline_cmds(&[
        &[b"SELECT", b"3"],
        &[b"MULTI"],
        &[b"SELECT", b"5"],
        &[b"DISCARD"],
    ]);
    let mut unknown = Raw::connect(kw.port()).await;
    unknown.send(&discard).await;
    assert_eq!(
        unknown.read_replies(4).await.concat(),
        b"+OK\r\n+OK\r\n+QUEUED\r\n+OK\r\n"
    );
    let mut known = Raw::connect(kw.port()).await;
    known.send(&discard).await;
    known.read_replies(4).await;
    assert_eq!(esc(&known.call(&[b"SELECT", b"4"]).await), esc(b"+OK\r\n"));

    let mut asker = Raw::connect(kw.port()).await;
    assert_eq!(esc(&asker.call(&[b"SELECT", b"3"]).await), esc(b"+OK\r\n"));
    asker
        .send(&pipeline_cmds(&[
            &[b"KEYWARD", b"FAILOVER"],
            &[b"SET", b"own", b"x"],
        ]))
        .await;
    assert_eq!(
        asker.read_replies(2).await.concat(),
        b"+OK\r\n+OK\r\n",
        "KEYWARD FAILOVER, then the SET behind it"
    );
    let topology = blocking(|| topology(&kw));
    assert_eq!(topology.master.as_deref(), Some(replica.addr().as_str()));
    assert_ne!(master.addr(), replica.addr());

    assert!(
        unknown.is_closed_within(DEADLINE).await,
        "the client whose database was not known is closed"
    );
    assert_eq!(
        esc(&known.call(&[b"SET", b"known", b"k"]).await),
        esc(b"+OK\r\n")
    );
    let new_port = replica.port();
    let get_in = |db: &str, key: &[u8]| blocking(|| redis_cmd_in(new_port, db, &[b"GET", key]));
    assert_eq!(esc(&get_in("4", b"known")), esc(b"$1\r\nk\r\n"));
    assert_eq!(esc(&get_in("3", b"own")), esc(b"$1\r\nx\r\n"));
    wait_until("nothing counted in flight", DEADLINE, || async {
        metric(&metrics(&kw).await, "keyward_carried_requests_in_flight") == Some(0.0)
    })
    .await;
}

fn pipeline_cmds(cmds: &[&[&[u8]]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| cmd(c)).collect()
}

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

use std::time::Instant;

use fred::prelude::*;
use support::*;

/// Client-visible facts about a writer's record that every failover test
/// asserts: no hang, no dropped connection, only the errors in `allowed`.
fn assert_answers_bounded(writes: &[Exchange], allowed: &[&[u8]]) {
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
    let (master, _replica, _sentinels, kw) = sentinel_stack(1000).await;

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
    let (master, replica, sentinels, kw) = sentinel_stack(1000).await;
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

    let writer = ClientLoop::writer(kw.port(), "fo");
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
    let acked: Vec<&Exchange> = writes.iter().filter(|w| w.ok()).collect();
    let lost = blocking(|| missing_on(replica.port(), "fo", &acked));
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
    let (mut master, replica, sentinels, kw) = sentinel_stack(500).await;

    let writer = ClientLoop::writer(kw.port(), "fo");
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
    let acked_after_crash: Vec<&Exchange> = writes
        .iter()
        .filter(|w| w.sent >= t_dead && w.ok())
        .collect();
    assert!(!acked_after_crash.is_empty());
    let lost = blocking(|| missing_on(replica.port(), "fo", &acked_after_crash));
    assert!(
        lost.is_empty(),
        "{} of {} writes acknowledged after the crash are not on the new master {new}: first {:?}",
        lost.len(),
        acked_after_crash.len(),
        &lost[..lost.len().min(20)]
    );
}

/// Clients in a database (on its shared connections) and clients whose own
/// upstream connection holds only a database and subscriptions ride through
/// a crashed master: keyward opens a connection to the new master, selects
/// the database and subscribes again, and the clients go on, on the same
/// connections, without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_and_subscriptions_are_carried_to_the_new_master() {
    let (mut master, replica, sentinels, kw) = sentinel_stack(500).await;
    let mut in_db = Raw::connect(kw.port()).await;
    assert_eq!(esc(&in_db.call(&[b"SELECT", b"2"]).await), esc(b"+OK\r\n"));
    // Refused: the client stays in database 2.
    assert_eq!(
        esc(&in_db.call(&[b"SELECT", b"99"]).await),
        esc(b"-ERR DB index is out of range\r\n")
    );
    assert_eq!(
        esc(&in_db.call(&[b"SET", b"carried", b"v"]).await),
        esc(b"+OK\r\n")
    );
    let mut subscriber = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&subscriber.call(&[b"SUBSCRIBE", b"news"]).await),
        esc(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
    );
    // RESP3: subscribed in database 2 and still reading there.
    let mut sub_in_db = Raw::connect_resp3(kw.port()).await;
    assert_eq!(
        esc(&sub_in_db.call(&[b"SELECT", b"2"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(
        esc(&sub_in_db.call(&[b"SUBSCRIBE", b"news3"]).await),
        esc(b">3\r\n$9\r\nsubscribe\r\n$5\r\nnews3\r\n:1\r\n")
    );
    // The write is on the replica before the master goes.
    let replica_port = replica.port();
    wait_until(
        "the SET in db 2 reached the replica",
        DEADLINE,
        || async move {
            blocking(|| redis_cmd_in(replica_port, "2", &[b"GET", b"carried"])) == b"$1\r\nv\r\n"
        },
    )
    .await;

    let old = master.addr();
    blocking(|| master.kill());
    let new = blocking(|| sentinels.wait_master_change(&old, SWITCH_LIMIT));
    assert_eq!(new, replica.addr());

    // Same connection, still database 2, now on the new master.
    assert_eq!(
        esc(&in_db.call(&[b"GET", b"carried"]).await),
        esc(b"$1\r\nv\r\n")
    );
    assert_eq!(
        esc(&in_db.call(&[b"SET", b"after", b"w"]).await),
        esc(b"+OK\r\n")
    );
    let r = blocking(|| redis_cmd_in(replica_port, "2", &[b"GET", b"after"]));
    assert_eq!(
        esc(&r),
        esc(b"$1\r\nw\r\n"),
        "the write went to db 2 of the new master"
    );
    // The subscriber hears what is published on the new master (once its
    // subscription is back: publish until someone receives it).
    wait_until(
        "a message published on the new master is received",
        DEADLINE,
        || async move {
            let r = blocking(|| redis_cmd(replica_port, &[b"PUBLISH", b"news", b"hello"]));
            r == b":1\r\n"
        },
    )
    .await;
    assert_eq!(
        esc(&subscriber.read_reply().await),
        esc(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n")
    );
    wait_until("a message on news3 is received", DEADLINE, || async move {
        let r = blocking(|| redis_cmd(replica_port, &[b"PUBLISH", b"news3", b"hi"]));
        r == b":1\r\n"
    })
    .await;
    assert_eq!(
        esc(&sub_in_db.read_reply().await),
        esc(b">3\r\n$7\r\nmessage\r\n$5\r\nnews3\r\n$2\r\nhi\r\n")
    );
    assert_eq!(
        esc(&sub_in_db.call(&[b"GET", b"carried"]).await),
        esc(b"$1\r\nv\r\n"),
        "the subscriber's connection was carried into database 2"
    );
}

/// `KEYWARD TOPOLOGY` over RESP names the master keyward follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_topology_command() {
    let (master, _replica, _sentinels, kw) = sentinel_stack(1000).await;

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

/// keyward's ROLE checks of the master (every `sentinel.ping_ms`) reuse one
/// connection instead of opening one each (four connects a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_checks_reuse_one_connection() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (master, _replica, _sentinels, _kw) = sentinel_stack(1000).await;
    let port = master.port();
    // Every call of this test is a connection of its own, counted here.
    let mine = std::sync::Arc::new(AtomicU64::new(0));
    let roles = {
        let mine = mine.clone();
        move || {
            mine.fetch_add(1, Ordering::Relaxed);
            blocking(move || redis_calls(port, "role"))
        }
    };
    let connects = || {
        mine.fetch_add(1, Ordering::Relaxed);
        let info =
            String::from_utf8_lossy(&blocking(move || redis_cmd(port, &[b"INFO", b"stats"])))
                .into_owned();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("total_connections_received")
    };
    // Settled: two checks since start-up.
    let r = roles();
    wait_until("two ROLE checks", DEADLINE, || {
        let roles = roles.clone();
        async move { roles() >= r + 2 }
    })
    .await;
    let c0 = connects();
    let mine0 = mine.load(Ordering::Relaxed);
    let r0 = roles();
    wait_until("eight more ROLE checks", DEADLINE, || {
        let roles = roles.clone();
        async move { roles() >= r0 + 8 }
    })
    .await;
    let c1 = connects();
    // Connections made since c0, less this test's own (from the roles()
    // after c0 up to and including the INFO that read c1).
    let own = mine.load(Ordering::Relaxed) - mine0;
    let keyward = (c1 - c0).saturating_sub(own);
    assert!(
        keyward <= 1,
        "keyward opened {keyward} connections for 8 ROLE checks"
    );
}

//! Clients in a database other than 0 share that database's pooled
//! connections (DESIGN.md decision 3), as clients in database 0 do: SELECT
//! costs no dedicated connection, state commands open one in the client's
//! database, and every client sees only its own database.

mod support;

use support::*;

const QUIET: &str = "[hotkeys]\nfleet = false\n[cache]\nmax_mb = 0\n";

/// Send `req` on `c` until it is answered `want` (within the deadline).
async fn call_until(c: &mut Raw, req: &[&[u8]], want: &[u8]) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let got = c.call(req).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} still answered {} after {DEADLINE:?}",
            esc(&cmd(req)),
            esc(&got)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Redis's connections (from `CLIENT LIST`, asked on `direct`) in database
/// `db`, not counting `direct` itself.
async fn connections_in(direct: &mut Raw, db: u32) -> usize {
    let list = direct.call(&[b"CLIENT", b"LIST"]).await;
    String::from_utf8_lossy(&list)
        .lines()
        .filter(|l| l.contains(&format!(" db={db} ")) && !l.contains(" cmd=client|list "))
        .count()
}

/// 60 clients spread over databases 1 to 4 with `upstream.max_pinned = 2`:
/// each reads and writes its own database, and Redis sees one pooled
/// connection per database and RESP version, not one per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_in_other_databases_share_pooled_connections() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, &format!("max_pinned = 2\n{QUIET}"), &[]);
    wait_ready(&kw, DEADLINE).await;

    let mut clients = Vec::new();
    for i in 0..60u32 {
        let db = (i % 4 + 1).to_string();
        let mut c = if (i / 4) % 2 == 0 {
            Raw::connect(kw.port()).await
        } else {
            Raw::connect_resp3(kw.port()).await
        };
        assert_eq!(
            esc(&c.call(&[b"SELECT", db.as_bytes()]).await),
            esc(b"+OK\r\n"),
            "client {i}: SELECT {db}"
        );
        clients.push((c, db));
    }
    for (i, (c, db)) in clients.iter_mut().enumerate() {
        let key = format!("k{i}");
        assert_eq!(
            esc(&c.call(&[b"SET", key.as_bytes(), db.as_bytes()]).await),
            esc(b"+OK\r\n")
        );
        let n = c.call(&[b"INCR", b"count"]).await;
        assert!(
            n.starts_with(b":"),
            "client {i}: INCR in db {db}: {}",
            esc(&n)
        );
    }
    // Every client reads back its own key, in its own database.
    for (i, (c, db)) in clients.iter_mut().enumerate() {
        let key = format!("k{i}");
        assert_eq!(
            esc(&c.call(&[b"GET", key.as_bytes()]).await),
            esc(&bulk(db.as_bytes()))
        );
        assert_eq!(
            esc(&redis_cmd_in(redis.port(), db, &[b"GET", key.as_bytes()])),
            esc(&bulk(db.as_bytes())),
            "k{i} is in database {db} upstream"
        );
        assert_eq!(
            esc(&redis.call(&[b"GET", key.as_bytes()])),
            esc(b"$-1\r\n"),
            "k{i} is not in database 0"
        );
    }
    for db in ["1", "2", "3", "4"] {
        assert_eq!(
            esc(&redis_cmd_in(redis.port(), db, &[b"GET", b"count"])),
            esc(&bulk(b"15")),
            "15 clients counted in database {db}"
        );
    }
    let mut direct = Raw::connect(redis.port()).await;
    for db in 1..=4 {
        // One RESP2 and one RESP3 pooled connection (pool_size = 1).
        assert_eq!(connections_in(&mut direct, db).await, 2, "database {db}");
    }
    let m = metrics(&kw).await;
    assert_eq!(
        metric(
            &m,
            "keyward_limit_reached_total{limit=\"upstream.max_pinned\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
}

/// A transaction and a blocking call from a client in database 3 run in
/// database 3 on a dedicated connection, and the client is back on the
/// database's shared pool afterwards (its connection given back, clean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_commands_in_another_database_run_there() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut c = Raw::connect(kw.port()).await;
    for (req, want) in [
        (&[&b"SELECT"[..], b"3"][..], &b"+OK\r\n"[..]),
        (&[b"SET", b"a", b"1"], b"+OK\r\n"),
        (&[b"MULTI"], b"+OK\r\n"),
        (&[b"INCR", b"a"], b"+QUEUED\r\n"),
        (&[b"GET", b"a"], b"+QUEUED\r\n"),
        (&[b"EXEC"], b"*2\r\n:2\r\n$1\r\n2\r\n"),
        (&[b"RPUSH", b"q", b"x"], b":1\r\n"),
        (&[b"BLPOP", b"q", b"1"], b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"),
        (&[b"INCR", b"a"], b":3\r\n"),
    ] {
        assert_eq!(esc(&c.call(req).await), esc(want), "{}", esc(&cmd(req)));
    }
    assert_eq!(
        esc(&redis_cmd_in(redis.port(), "3", &[b"GET", b"a"])),
        esc(b"$1\r\n3\r\n")
    );
    assert_eq!(esc(&redis.call(&[b"EXISTS", b"a", b"q"])), esc(b":0\r\n"));
    // Given back and RESET: kept for reuse in database 0.
    wait_until("the dedicated connection given back", DEADLINE, || async {
        metric(&metrics(&kw).await, "keyward_pinned_idle_connections") == Some(1.0)
    })
    .await;
    // A second client's transaction reuses it and is in database 0.
    let mut d = Raw::connect(kw.port()).await;
    for (req, want) in [
        (&[&b"MULTI"[..]][..], &b"+OK\r\n"[..]),
        (&[b"GET", b"a"], b"+QUEUED\r\n"),
        (&[b"EXEC"], b"*1\r\n$-1\r\n"),
    ] {
        assert_eq!(esc(&d.call(req).await), esc(want), "{}", esc(&cmd(req)));
    }
    // RESET takes the first client back to database 0.
    assert_eq!(esc(&c.call(&[b"RESET"]).await), esc(b"+RESET\r\n"));
    assert_eq!(esc(&c.call(&[b"GET", b"a"]).await), esc(b"$-1\r\n"));
}

/// SELECT answers as Redis does in every case, and a refused SELECT
/// leaves the client where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_replies_match_redis() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    assert_eq!(
        esc(&redis_cmd_in(redis.port(), "5", &[b"SET", b"where", b"5"])),
        esc(b"+OK\r\n")
    );
    let mut direct = Raw::connect(redis.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    let cases: [&[&[u8]]; 19] = [
        &[b"SELECT", b"5"],
        &[b"SELECT", b"16"],
        &[b"SELECT", b"-1"],
        &[b"SELECT", b"x"],
        &[b"SELECT", b"05"],
        &[b"SELECT", b"+5"],
        &[b"SELECT", b" 5"],
        &[b"SELECT", b"-0"],
        &[b"SELECT", b"1.0"],
        &[b"SELECT", b"0x1"],
        &[b"SELECT", b"99999999999999999999"],
        &[b"SELECT"],
        &[b"SELECT", b"1", b"2"],
        &[b"GET", b"where"],
        &[b"SELECT", b"0"],
        &[b"SELECT", b"9223372036854775807"],
        &[b"SELECT", b"-2147483649"],
        &[b"SELECT", b"2147483648"],
        &[b"SELECT", b"-9223372036854775809"],
    ];
    for req in cases {
        let want = direct.call(req).await;
        assert_eq!(esc(&c.call(req).await), esc(&want), "{}", esc(&cmd(req)));
    }
    assert_eq!(esc(&c.call(&[b"GET", b"where"]).await), esc(b"$-1\r\n"));
}

/// The shared connections of a database nobody uses any more are closed
/// after `upstream.db_pool_idle_ms`, and opened again on the next use; a
/// database in steady use keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_database_gives_its_connections_back() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, &format!("db_pool_idle_ms = 300\n{QUIET}"), &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut direct = Raw::connect(redis.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(esc(&c.call(&[b"SELECT", b"5"]).await), esc(b"+OK\r\n"));
    assert_eq!(esc(&c.call(&[b"SET", b"a", b"1"]).await), esc(b"+OK\r\n"));
    assert_eq!(connections_in(&mut direct, 5).await, 1);
    let ids = |list: Vec<u8>| -> Vec<String> {
        String::from_utf8_lossy(&list)
            .lines()
            .filter(|l| l.contains(" db=5 "))
            .filter_map(|l| l.split(' ').next().map(str::to_string))
            .collect()
    };
    let first = ids(direct.call(&[b"CLIENT", b"LIST"]).await);
    // In use for four idle periods: the same connection throughout.
    let busy_until = std::time::Instant::now() + std::time::Duration::from_millis(1200);
    let mut n = 0u32;
    while std::time::Instant::now() < busy_until {
        n += 1;
        assert_eq!(
            esc(&c.call(&[b"INCR", b"n"]).await),
            esc(format!(":{n}\r\n").as_bytes())
        );
    }
    assert_eq!(ids(direct.call(&[b"CLIENT", b"LIST"]).await), first);
    // Unused: closed.
    let deadline = std::time::Instant::now() + DEADLINE;
    while connections_in(&mut direct, 5).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "database 5's connection still open after {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    // Used again: opened again, in database 5.
    assert_eq!(esc(&c.call(&[b"GET", b"a"]).await), esc(b"$1\r\n1\r\n"));
    assert_eq!(connections_in(&mut direct, 5).await, 1);
    assert_eq!(esc(&redis.call(&[b"GET", b"a"])), esc(b"$-1\r\n"));
}

/// A client left in a database the upstream no longer has (it came back
/// with fewer `databases`) gets Redis's refusal at once on every request,
/// not a hang or a retry loop; SELECT then follows the new range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_the_upstream_lost_is_refused_at_once() {
    let mut redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(esc(&c.call(&[b"SELECT", b"9"]).await), esc(b"+OK\r\n"));
    assert_eq!(esc(&c.call(&[b"SET", b"a", b"1"]).await), esc(b"+OK\r\n"));
    redis.restart_with(&["--databases", "4"]);
    let refusal = format!(
        "-ERR upstream refused the connection: 127.0.0.1:{}: SELECT 9: ERR DB index is out of range\r\n",
        redis.port()
    );
    // First the lost connection may show, then the refusal, and it stays.
    call_until(&mut c, &[b"GET", b"a"], refusal.as_bytes()).await;
    for _ in 0..20 {
        assert_eq!(esc(&c.call(&[b"GET", b"a"]).await), esc(refusal.as_bytes()));
    }
    // A dedicated connection cannot open in database 9 either: nothing
    // runs in database 0 instead.
    for req in [
        &[&b"MULTI"[..]][..],
        &[b"CLIENT", b"SETNAME", b"x"],
        &[b"BLPOP", b"q", b"1"],
        &[b"SUBSCRIBE", b"ch"],
    ] {
        assert_eq!(
            esc(&c.call(req).await),
            esc(refusal.as_bytes()),
            "{}",
            esc(&cmd(req))
        );
        assert_eq!(
            esc(&c.call(&[b"SET", b"t", b"1"]).await),
            esc(refusal.as_bytes())
        );
    }
    assert_eq!(esc(&redis.call(&[b"DBSIZE"])), esc(b":0\r\n"));
    // keyward learns the new range when its first connection is back
    // (perhaps after the refusals above): SELECT then answers as Redis.
    let mut direct = Raw::connect(redis.port()).await;
    let want = direct.call(&[b"SELECT", b"9"]).await;
    assert_eq!(esc(&want), esc(b"-ERR DB index is out of range\r\n"));
    call_until(&mut c, &[b"SELECT", b"9"], &want).await;
    assert_eq!(esc(&c.call(&[b"SELECT", b"2"]).await), esc(b"+OK\r\n"));
    assert_eq!(esc(&c.call(&[b"SET", b"b", b"2"]).await), esc(b"+OK\r\n"));
    assert_eq!(
        esc(&redis_cmd_in(redis.port(), "2", &[b"GET", b"b"])),
        esc(b"$1\r\n2\r\n")
    );
}

//! The upstream going away and coming back, as a Redis client sees it
//! through keyward: a dead upstream gets fast error replies (never a hang),
//! in-flight writes are reported as having an unknown outcome instead of
//! being replayed, a stuck upstream is cut off by `upstream.command_timeout_ms`,
//! and keyward reconnects on its own so clients keep their connections.
//! Also the upstream password (`upstream.password`), right and wrong.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The error a request gets when it reached Redis but the connection died
/// before its reply (src/error.rs, `Kind::OutcomeUnknown`).
const OUTCOME_UNKNOWN: &[u8] = b"-ERR upstream connection lost before the reply; the outcome of this command is unknown and it was not retried (";

/// HTTP status of `GET path` on the admin port, off the runtime threads
/// (the kit's HTTP getter is blocking).
async fn admin_status(admin_port: u16, path: &'static str) -> u16 {
    tokio::task::spawn_blocking(move || http_get(admin_port, path).0)
        .await
        .expect("http_get task")
}

/// Poll `/ready` until it reports `status`.
async fn wait_ready_status(kw: &Keyward, status: u16, timeout: Duration) {
    let admin = kw.admin_port();
    wait_until(
        &format!("/ready answers {status}"),
        timeout,
        || async move { admin_status(admin, "/ready").await == status },
    )
    .await;
}

fn is_upstream_error(reply: &[u8]) -> bool {
    reply.starts_with(b"-ERR upstream ")
}

/// Does Redis on `port` look blocked (e.g. inside `DEBUG SLEEP`)? It is if a
/// fresh connection's PING gets no answer within 300 ms.
async fn redis_is_busy(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(300),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(&cmd(&[b"PING"])).await.is_err() {
        return false;
    }
    let mut b = [0u8; 64];
    tokio::time::timeout(Duration::from_millis(300), s.read(&mut b))
        .await
        .is_err()
}

/// keyward started while nothing listens on the upstream port: not ready,
/// but alive; requests fail fast with "upstream unavailable"; once Redis
/// comes up keyward connects by itself and the same client connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_at_start_fails_fast_then_recovers() {
    // The kit picks Redis's port, so reserve one by starting and killing a
    // server, and bring it back on the same port later.
    let mut redis = Redis::start();
    redis.kill();
    let kw = Keyward::start(&redis.addr());

    assert_eq!(
        admin_status(kw.admin_port(), "/ready").await,
        503,
        "/ready with no upstream"
    );
    assert_eq!(admin_status(kw.admin_port(), "/live").await, 200, "/live");

    let mut raw = Raw::connect(kw.port()).await;
    for _ in 0..3 {
        let reply = within(
            Duration::from_secs(2),
            "GET with the upstream down",
            raw.call(&[b"GET", b"k"]),
        )
        .await;
        assert!(
            reply.starts_with(b"-ERR upstream unavailable"),
            "GET with no upstream: expected -ERR upstream unavailable..., got {}",
            esc(&reply)
        );
    }
    assert_eq!(
        admin_status(kw.admin_port(), "/ready").await,
        503,
        "/ready still down"
    );

    tokio::task::block_in_place(|| redis.restart());
    assert_eq!(redis.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");

    // Same client connection: keyward reconnects upstream on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = within(
            Duration::from_secs(2),
            "GET while keyward reconnects",
            raw.call(&[b"GET", b"k"]),
        )
        .await;
        if reply == b"$1\r\nv\r\n" {
            break;
        }
        assert!(
            is_upstream_error(&reply),
            "GET while reconnecting: expected the value or an upstream error, got {}",
            esc(&reply)
        );
        assert!(
            Instant::now() < deadline,
            "GET did not work within 10 s of Redis starting; last reply {}",
            esc(&reply)
        );
        tokio::time::sleep(POLL).await;
    }
    wait_ready_status(&kw, 200, Duration::from_secs(10)).await;
}

/// What one looping client has seen.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
    ok_after_restart: AtomicU64,
}

/// Clients loop SET/GET while Redis is killed and restarted: every request
/// is answered within a deadline with either the right value or an upstream
/// error, never a wrong value; after the restart the same connections work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_traffic_then_restarted() {
    const CLIENTS: usize = 4;
    const REPLY_DEADLINE: Duration = Duration::from_secs(5);

    let mut redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    wait_ready_status(&kw, 200, DEADLINE).await;

    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let progress: Arc<Vec<Progress>> =
        Arc::new((0..CLIENTS).map(|_| Progress::default()).collect());

    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let mut raw = Raw::connect(kw.port()).await;
        let (stop, restarted, failures, progress) = (
            stop.clone(),
            restarted.clone(),
            failures.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let p = &progress[i];
            let key = format!("key:{i}");
            let fail = |msg: String| failures.lock().unwrap().push(format!("client {i}: {msg}"));
            // Values are "c<i>-<seq>". `confirmed` is the seq of the last SET
            // answered +OK: a GET may see it, a later write whose outcome is
            // unknown, or nothing (Redis restarted empty), never anything older.
            let mut seq = 0u64;
            let mut confirmed = 0u64;
            let mut pace = tokio::time::interval(Duration::from_millis(2));
            while !stop.load(Ordering::Acquire) {
                pace.tick().await;
                let after_restart = restarted.load(Ordering::Acquire);
                seq += 1;
                let value = format!("c{i}-{seq}");
                let set = match tokio::time::timeout(
                    REPLY_DEADLINE,
                    raw.call(&[b"SET", key.as_bytes(), value.as_bytes()]),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => return fail(format!("SET {key} {value}: no reply within {REPLY_DEADLINE:?}")),
                };
                let set_ok = if set == b"+OK\r\n" {
                    confirmed = seq;
                    true
                } else if is_upstream_error(&set) {
                    false
                } else {
                    return fail(format!("SET {key} {value}: unexpected reply {}", esc(&set)));
                };
                let get = match tokio::time::timeout(REPLY_DEADLINE, raw.call(&[b"GET", key.as_bytes()])).await {
                    Ok(r) => r,
                    Err(_) => return fail(format!("GET {key}: no reply within {REPLY_DEADLINE:?}")),
                };
                let get_ok = if is_upstream_error(&get) {
                    false
                } else if get == b"$-1\r\n" {
                    // Only a restarted (empty) Redis loses a confirmed value.
                    true
                } else {
                    // read_reply returns exactly one frame: "$<n>\r\n<body>\r\n".
                    let got = match get.iter().position(|&b| b == b'\n') {
                        Some(nl) if get.starts_with(b"$") => {
                            String::from_utf8_lossy(&get[nl + 1..get.len() - 2]).into_owned()
                        }
                        _ => return fail(format!("GET {key}: unexpected reply {}", esc(&get))),
                    };
                    let s = got
                        .strip_prefix(&format!("c{i}-"))
                        .and_then(|s| s.parse::<u64>().ok());
                    match s {
                        Some(s) if s >= confirmed && s <= seq => true,
                        _ => {
                            return fail(format!(
                                "GET {key}: WRONG VALUE {got:?} (last confirmed write c{i}-{confirmed}, last write c{i}-{seq})"
                            ))
                        }
                    }
                };
                if set_ok && get_ok {
                    p.ok.fetch_add(1, Ordering::AcqRel);
                    if after_restart {
                        p.ok_after_restart.fetch_add(1, Ordering::AcqRel);
                    }
                } else {
                    p.errors.fetch_add(1, Ordering::AcqRel);
                }
            }
        }));
    }

    let failed = || !failures.lock().unwrap().is_empty();
    let check_failures = || {
        let f = failures.lock().unwrap();
        assert!(f.is_empty(), "client failures:\n{}", f.join("\n"));
    };

    wait_until(
        "every client has succeeded a few times",
        DEADLINE,
        || async { failed() || progress.iter().all(|p| p.ok.load(Ordering::Acquire) >= 5) },
    )
    .await;
    check_failures();

    redis.kill();
    let errors_at_kill: Vec<u64> = progress
        .iter()
        .map(|p| p.errors.load(Ordering::Acquire))
        .collect();
    wait_until(
        "every client has seen an error reply with Redis dead",
        DEADLINE,
        || async {
            failed()
                || progress
                    .iter()
                    .zip(&errors_at_kill)
                    .all(|(p, &e)| p.errors.load(Ordering::Acquire) > e)
        },
    )
    .await;
    check_failures();

    tokio::task::block_in_place(|| redis.restart());
    restarted.store(true, Ordering::Release);
    wait_until(
        "every client succeeds again on its same connection after the restart",
        Duration::from_secs(10),
        || async {
            failed()
                || progress
                    .iter()
                    .all(|p| p.ok_after_restart.load(Ordering::Acquire) >= 5)
        },
    )
    .await;

    stop.store(true, Ordering::Release);
    for t in tasks {
        within(Duration::from_secs(10), "client task to stop", t)
            .await
            .expect("client task panicked");
    }
    check_failures();
    for (i, p) in progress.iter().enumerate() {
        eprintln!(
            "client {i}: {} ok rounds ({} after restart), {} rounds with an upstream error",
            p.ok.load(Ordering::Acquire),
            p.ok_after_restart.load(Ordering::Acquire),
            p.errors.load(Ordering::Acquire)
        );
    }
}

/// `DEBUG SLEEP` holds a pipelined `SET` and `GET` inside Redis when Redis
/// dies: the write's outcome is unknown and it is not replayed (the client is
/// told so), the read is retried once and fails fast because Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_write_gets_outcome_unknown_and_read_is_retried() {
    let mut redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    // Default settings (two shared connections per protocol): the retried
    // read must not be sent to the other connection to the dead server and
    // come back as "outcome unknown ... not retried".
    let kw = Keyward::start(&redis.addr());
    wait_ready_status(&kw, 200, DEADLINE).await;

    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(raw.call(&[b"SET", b"x", b"0"]).await, b"+OK\r\n");

    let mut pipeline = cmd(&[b"DEBUG", b"SLEEP", b"5"]);
    pipeline.extend(cmd(&[b"SET", b"x", b"1"]));
    pipeline.extend(cmd(&[b"GET", b"x"]));
    raw.send(&pipeline).await;
    let port = redis.port();
    wait_until("Redis is inside DEBUG SLEEP", DEADLINE, || {
        redis_is_busy(port)
    })
    .await;

    redis.kill();
    let replies = within(
        Duration::from_secs(3),
        "replies to DEBUG SLEEP, SET, GET after Redis died",
        raw.read_replies(3),
    )
    .await;
    assert!(
        replies[0].starts_with(OUTCOME_UNKNOWN),
        "DEBUG SLEEP in flight: expected {}..., got {}",
        esc(OUTCOME_UNKNOWN),
        esc(&replies[0])
    );
    assert!(
        replies[1].starts_with(OUTCOME_UNKNOWN),
        "SET in flight: expected {}..., got {}",
        esc(OUTCOME_UNKNOWN),
        esc(&replies[1])
    );
    assert!(
        replies[2].starts_with(b"-ERR upstream unavailable"),
        "GET in flight (retried once, Redis dead): expected -ERR upstream unavailable..., got {}",
        esc(&replies[2])
    );
    // Both causes: the connection lost under it, then the retry's.
    let text = String::from_utf8_lossy(&replies[2]).into_owned();
    assert!(
        text.contains("connection") && text.contains("; retried: "),
        "the retried GET's error should name the first failure too: {text}"
    );

    // The client connection survives; once Redis is back it works again.
    tokio::task::block_in_place(|| redis.restart());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = within(
            Duration::from_secs(3),
            "SET after restart",
            raw.call(&[b"SET", b"x", b"2"]),
        )
        .await;
        if reply == b"+OK\r\n" {
            break;
        }
        assert!(is_upstream_error(&reply), "SET: got {}", esc(&reply));
        assert!(
            Instant::now() < deadline,
            "SET did not work within 10 s of the restart: {}",
            esc(&reply)
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(raw.call(&[b"GET", b"x"]).await, b"$1\r\n2\r\n");
}

/// `upstream.command_timeout_ms = 300`: a 2 s `DEBUG SLEEP` gets an error
/// well before Redis would have answered, and requests work again once Redis
/// is responsive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_cuts_off_a_stuck_upstream() {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let kw = Keyward::start_for(&redis, "command_timeout_ms = 300\n", &[]);
    wait_ready_status(&kw, 200, DEADLINE).await;

    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(raw.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");

    let started = Instant::now();
    let reply = within(
        Duration::from_millis(1500),
        "DEBUG SLEEP 2 with command_timeout_ms = 300",
        raw.call(&[b"DEBUG", b"SLEEP", b"2"]),
    )
    .await;
    let took = started.elapsed();
    eprintln!("DEBUG SLEEP 2 answered after {took:?}: {}", esc(&reply));
    assert!(
        is_upstream_error(&reply),
        "expected an -ERR upstream ... error, got {}",
        esc(&reply)
    );
    let text = String::from_utf8_lossy(&reply).to_ascii_lowercase();
    assert!(
        text.contains("timed out") || text.contains("command_timeout_ms"),
        "the error should say the upstream timed out: {}",
        esc(&reply)
    );

    // Same connection, after Redis wakes up.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = within(
            Duration::from_secs(3),
            "GET after the timeout",
            raw.call(&[b"GET", b"k"]),
        )
        .await;
        if reply == b"$1\r\nv\r\n" {
            break;
        }
        assert!(is_upstream_error(&reply), "GET: got {}", esc(&reply));
        assert!(
            Instant::now() < deadline,
            "GET did not work again within {DEADLINE:?}: {}",
            esc(&reply)
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(raw.call(&[b"SET", b"k", b"w"]).await, b"+OK\r\n");
    assert_eq!(raw.call(&[b"GET", b"k"]).await, b"$1\r\nw\r\n");
}

/// `upstream.password` authenticates keyward's own connections: clients
/// need no AUTH. A wrong password makes requests fail fast and /ready 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_password_right_and_wrong() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let kw = Keyward::start_for(&redis, "password = \"s3cret\"\n", &[]);
    wait_ready_status(&kw, 200, DEADLINE).await;

    let c = client(kw.port()).await;
    let _: () = c.set("k", "v", None, None, false).await.unwrap();
    let v: Option<String> = c.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(raw.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    assert_eq!(raw.call(&[b"SET", b"k2", b"w"]).await, b"+OK\r\n");
    assert_eq!(
        redis_pipeline(redis.port(), &[&[b"AUTH", b"s3cret"], &[b"GET", b"k2"]])[1],
        b"$1\r\nw\r\n",
        "the SET reached Redis"
    );

    let bad = Keyward::start_for(&redis, "password = \"wrong\"\n", &[]);
    let mut raw = Raw::connect(bad.port()).await;
    for _ in 0..3 {
        let reply = within(
            Duration::from_secs(2),
            "GET through keyward with a wrong upstream password",
            raw.call(&[b"GET", b"k"]),
        )
        .await;
        assert!(
            reply.starts_with(b"-ERR upstream"),
            "wrong upstream password: expected -ERR upstream..., got {}",
            esc(&reply)
        );
    }
    assert_eq!(
        admin_status(bad.admin_port(), "/ready").await,
        503,
        "/ready with a wrong upstream password"
    );
}

/// A man in the middle between keyward and Redis that forwards everything,
/// except that a chunk from keyward naming `evil:huge` is answered with a
/// bulk string declaring a terabyte (three bytes of which follow).
async fn lying_upstream(redis_port: u16) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the lying upstream");
    let port = listener.local_addr().expect("local_addr").port();
    tokio::spawn(async move {
        while let Ok((from_keyward, _)) = listener.accept().await {
            let Ok(to_redis) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                continue;
            };
            let (mut kr, kw) = from_keyward.into_split();
            let (mut rr, mut rw) = to_redis.into_split();
            let kw = Arc::new(tokio::sync::Mutex::new(kw));
            let replies = kw.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = rr.read(&mut buf).await {
                    if n == 0 || replies.lock().await.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = kr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let ok = if buf[..n].windows(9).any(|w| w == b"evil:huge") {
                        kw.lock()
                            .await
                            .write_all(b"$1000000000000\r\nabc")
                            .await
                            .is_ok()
                    } else {
                        rw.write_all(&buf[..n]).await.is_ok()
                    };
                    if !ok {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A reply declaring a terabyte-long bulk string (a broken or hostile
/// upstream) costs keyward no terabyte: the request gets an error once the
/// connection is given up on, and keyward stays up and serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_declaring_a_terabyte_is_not_allocated() {
    let redis = Redis::start();
    let upstream = lying_upstream(redis.port()).await;
    let mut kw = Keyward::start_config(
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{upstream}\"\ncommand_timeout_ms = 1000\n\
             [hotkeys]\nfleet = false\n[cache]\nmax_mb = 0\n"
        ),
        &[],
    );
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(raw.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    let reply = within(
        Duration::from_secs(5),
        "GET evil:huge",
        raw.call(&[b"GET", b"evil:huge"]),
    )
    .await;
    assert!(
        is_upstream_error(&reply),
        "expected an -ERR upstream ... error, got {}",
        esc(&reply)
    );
    assert!(kw.is_running(), "keyward exited:\n{}", kw.log());
    let mut fresh = Raw::connect(kw.port()).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = fresh.call(&[b"GET", b"k"]).await;
        if reply == b"$1\r\nv\r\n" {
            break;
        }
        assert!(is_upstream_error(&reply), "GET k: got {}", esc(&reply));
        assert!(
            Instant::now() < deadline,
            "GET k did not work again: {}",
            esc(&reply)
        );
        tokio::time::sleep(POLL).await;
    }
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", kw.pid()))
        .expect("keyward's /proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    eprintln!("keyward RSS after the lie: {rss_kib} KiB");
    assert!(
        rss_kib < 100 * 1024,
        "keyward holds {rss_kib} KiB after a reply that declared a terabyte"
    );
    assert!(kw.is_running(), "keyward exited:\n{}", kw.log());
}

/// A stopped Redis (SIGSTOP) with `upstream.command_timeout_ms = 400`: a
/// transaction's EXEC and a WATCH on a new dedicated connection get an
/// error naming the timeout instead of hanging, and the clients are closed
/// (their connection state is gone), while a blocked BLPOP, which may wait
/// for ever, is left alone and gets its item once Redis runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_upstream_fails_dedicated_connections_but_not_blocked_calls() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "command_timeout_ms = 400\n", &[]);
    wait_ready_status(&kw, 200, DEADLINE).await;
    let pid = redis.pid().expect("redis pid");

    let mut multi = Raw::connect(kw.port()).await;
    assert_eq!(multi.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_eq!(multi.call(&[b"SET", b"k", b"v"]).await, b"+QUEUED\r\n");
    let mut blocked = Raw::connect(kw.port()).await;
    blocked.send(&cmd(&[b"BLPOP", b"q", b"0"])).await;
    wait_until("BLPOP blocked at Redis", DEADLINE, || async {
        String::from_utf8_lossy(&redis.call(&[b"INFO", b"clients"])).contains("blocked_clients:1")
    })
    .await;

    blocking(|| send_signal(pid, "STOP"));
    let mut watch = Raw::connect(kw.port()).await;
    for (name, conn, req) in [
        ("EXEC", &mut multi, &[&b"EXEC"[..]][..]),
        ("WATCH", &mut watch, &[b"WATCH", b"k"]),
    ] {
        let started = Instant::now();
        let reply = within(Duration::from_secs(3), name, conn.call(req)).await;
        let text = String::from_utf8_lossy(&reply).to_string();
        assert!(
            text.starts_with("-") && text.contains("command_timeout_ms"),
            "{name}: {}",
            esc(&reply)
        );
        eprintln!("{name} failed after {:?}: {text}", started.elapsed());
        assert!(
            within(DEADLINE, "the close", conn.is_closed()).await,
            "{name}'s client is closed"
        );
    }
    blocking(|| send_signal(pid, "CONT"));
    assert_eq!(esc(&redis.call(&[b"LPUSH", b"q", b"x"])), esc(b":1\r\n"));
    assert_eq!(
        esc(&blocked.read_reply().await),
        esc(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
    );
}

/// A Redis whose user `app` (password `pw`) may use every key and command
/// but only the channels `channels` allow (none: Redis 7's default for a
/// new user), and a keyward connecting as `app` with `upstream` settings.
async fn channel_restricted_stack(channels: &[&[u8]], upstream: &str) -> (Redis, Keyward) {
    let redis = Redis::start();
    let mut acl: Vec<&[u8]> = vec![
        b"ACL",
        b"SETUSER",
        b"app",
        b"on",
        b">pw",
        b"~*",
        b"+@all",
        b"resetchannels",
    ];
    acl.extend_from_slice(channels);
    assert_eq!(esc(&redis.call(&acl)), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(
        &redis,
        &format!(
            "username = \"app\"\npassword = \"pw\"\n{upstream}\
             [hotkeys]\nfleet = false\n[cache]\nmax_mb = 0\n"
        ),
        &[],
    );
    wait_ready_status(&kw, 200, DEADLINE).await;
    (redis, kw)
}

/// Under `CLIENT REPLY OFF`, Redis answers `SUBSCRIBE a b` from a user
/// without channel permissions with nothing at all (its error is silenced),
/// where keyward expects two confirmations (sent whatever CLIENT REPLY
/// says). With `upstream.command_timeout_ms = 300` the dedicated connection's watchdog
/// finds Redis still answering on the shared connection, so the client is
/// not cut off: after two such probes (PINGs Redis counts; nothing else
/// pings with the near cache off) it is served as by Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_redis_never_sends_does_not_cut_off_a_live_client() {
    let (redis, kw) = channel_restricted_stack(&[], "command_timeout_ms = 300\n").await;
    let mut direct = Raw::connect(redis.port()).await;
    assert_eq!(direct.call(&[b"AUTH", b"app", b"pw"]).await, b"+OK\r\n");
    let mut c = Raw::connect(kw.port()).await;
    let sub: &[&[u8]] = &[b"SUBSCRIBE", b"a", b"b"];
    let want = direct.call(sub).await;
    assert!(want.starts_with(b"-NOPERM"), "{}", esc(&want));
    let off = [&cmd(&[b"CLIENT", b"REPLY", b"OFF"])[..], &cmd(sub)].concat();
    direct.send(&off).await;
    c.send(&off).await;
    let port = redis.port();
    let probes = blocking(move || redis_calls(port, "ping"));
    wait_until("two watchdog probes", DEADLINE, || async move {
        blocking(move || redis_calls(port, "ping")) >= probes + 2
    })
    .await;
    for req in [
        &[&b"CLIENT"[..], b"REPLY", b"ON"][..],
        &[b"PING"],
        &[b"SET", b"k", b"v"],
    ] {
        let want = direct.call(req).await;
        assert_eq!(esc(&c.call(req).await), esc(&want), "{}", esc(&cmd(req)));
    }
}

/// A connection to Redis as `app` and one to keyward (which connects as
/// `app`), both switched to RESP3 if asked.
async fn app_pair(redis: &Redis, kw: &Keyward, resp3: bool) -> (Raw, Raw) {
    let mut direct = Raw::connect(redis.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(direct.call(&[b"AUTH", b"app", b"pw"]).await, b"+OK\r\n");
    if resp3 {
        direct.call(&[b"HELLO", b"3"]).await;
        c.call(&[b"HELLO", b"3"]).await;
    }
    (direct, c)
}

/// Send `requests` and a `PING <marker>` after them (answered in RESP2
/// subscriber mode too) to Redis directly and through keyward, and compare
/// everything up to the marker, HELLO ids masked.
async fn same_up_to_ping(
    direct: &mut Raw,
    c: &mut Raw,
    requests: &[&[&[u8]]],
    marker: &str,
    what: &str,
) {
    let mut all: Vec<u8> = requests.iter().flat_map(|r| cmd(r)).collect();
    all.extend(cmd(&[b"PING", marker.as_bytes()]));
    direct.send(&all).await;
    c.send(&all).await;
    let end = format!("{marker}\r\n");
    let want = direct.read_through(end.as_bytes()).await;
    assert_eq!(
        ids_masked(&c.read_through(end.as_bytes()).await),
        ids_masked(&want),
        "{what}"
    );
}

/// A user without channel permissions (Redis 7's default for a new ACL
/// user) gets one `-NOPERM` for a whole `SUBSCRIBE a b` and is not
/// subscribed: through keyward the client goes on exactly as on Redis
/// (no reply owed for ever, no subscriber mode), in RESP2 and RESP3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_the_acl_refuses_leaves_the_client_as_on_redis() {
    let (redis, kw) = channel_restricted_stack(&[b"&ok*"], "").await;
    // Refused, and nothing sent after it: the dedicated connection is given
    // back all the same (it held a max_pinned slot until the next request).
    let mut c = Raw::connect(kw.port()).await;
    assert!(c.call(&[b"SUBSCRIBE", b"a"]).await.starts_with(b"-NOPERM"));
    wait_until(
        "the refused subscriber's connection given back",
        DEADLINE,
        || async { metric(&metrics(&kw).await, "keyward_pinned_connections") == Some(0.0) },
    )
    .await;
    drop(c);
    let steps: &[&[&[u8]]] = &[
        &[b"SUBSCRIBE", b"a", b"b"],
        &[b"HELLO", b"3"],
        &[b"HELLO", b"2"],
        &[b"PING"],
        &[b"SET", b"x", b"1"],
        &[b"SELECT", b"2"],
        &[b"GET", b"x"],
        &[b"SUBSCRIBE", b"ok1", b"no"],
        &[b"PSUBSCRIBE", b"p*", b"q*"],
        &[b"UNSUBSCRIBE"],
        &[b"SUBSCRIBE", b"ok1", b"ok2"],
        &[b"SUBSCRIBE", b"ok1", b"nope"],
        &[b"PING"],
        &[b"UNSUBSCRIBE"],
        // Pipelined, these go out before the refusals come back: `ok4`,
        // added by a refused request, is kept by the one after it.
        &[b"SUBSCRIBE", b"ok3"],
        &[b"SUBSCRIBE", b"ok3", b"nope2"],
        &[b"SUBSCRIBE", b"nope3", b"ok4"],
        &[b"SUBSCRIBE", b"ok4"],
        &[b"UNSUBSCRIBE", b"ok3", b"ok5"],
        &[b"UNSUBSCRIBE"],
        &[b"SSUBSCRIBE", b"s1"],
        &[b"SELECT", b"0"],
        &[b"GET", b"x"],
        &[b"PING"],
    ];
    for resp3 in [false, true] {
        let (mut direct, mut c) = app_pair(&redis, &kw, resp3).await;
        // Each step and a PING that ends its replies (in subscriber mode
        // too), compared whole.
        for (i, req) in steps.iter().enumerate() {
            let what = format!("resp3 {resp3}, step {i}: {}", esc(&cmd(req)));
            same_up_to_ping(
                &mut direct,
                &mut c,
                &[req],
                &format!("end-of-step-{i}"),
                &what,
            )
            .await;
        }
        // A reply keyward makes itself comes after every reply owed: none
        // is owed for ever. (Redis's own connection id differs.)
        let hello: &[&[u8]] = if resp3 {
            &[b"HELLO", b"3"]
        } else {
            &[b"HELLO", b"2"]
        };
        let want = ids_masked(&direct.call(hello).await);
        assert!(want.contains("id\\r\\n:N"), "an id field: {want}");
        assert_eq!(ids_masked(&c.call(hello).await), want, "resp3 {resp3}");
        // Not subscribed: the dedicated connection is given back.
        wait_until("no dedicated connection", DEADLINE, || async {
            metric(&metrics(&kw).await, "keyward_pinned_connections") == Some(0.0)
        })
        .await;
        // The same steps as one pipeline, on fresh connections.
        let (mut direct, mut c) = app_pair(&redis, &kw, resp3).await;
        let what = format!("resp3 {resp3}, pipelined");
        same_up_to_ping(&mut direct, &mut c, steps, "end-of-steps", &what).await;
    }
}

/// A refusal Redis silences (`-NOPERM` for a SUBSCRIBE under CLIENT REPLY
/// OFF or SKIP) leaves confirmations keyward counted on that will never
/// come. A client that then waits behind them (RESET, or a SUBSCRIBE whose
/// count depends on them) is not left hanging: once Redis, answering PINGs
/// on the shared connection, has sent nothing for
/// `upstream.command_timeout_ms`, the owed replies fail as on a lost
/// connection and the client is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_replies_redis_never_sends_is_not_left_hanging() {
    let (_redis, kw) = channel_restricted_stack(&[b"&ok*"], "command_timeout_ms = 300\n").await;
    let sessions: [&[&[&[u8]]]; 2] = [
        &[
            &[b"CLIENT", b"REPLY", b"OFF"],
            &[b"SUBSCRIBE", b"bad1"],
            &[b"RESET"],
            &[b"PING", b"e"],
        ],
        &[
            &[b"CLIENT", b"REPLY", b"SKIP"],
            &[b"SUBSCRIBE", b"bad1"],
            &[b"SUBSCRIBE", b"bad1"],
            &[b"SUBSCRIBE", b"ok1"],
            &[b"PING", b"e"],
            // Waits for every reply before it (what the subscriptions are).
            &[b"RESET"],
        ],
    ];
    for (i, session) in sessions.iter().enumerate() {
        let mut c = Raw::connect(kw.port()).await;
        let all: Vec<u8> = session.iter().flat_map(|r| cmd(r)).collect();
        c.send(&all).await;
        let got = String::from_utf8_lossy(&c.read_to_close().await).to_string();
        assert!(
            got.contains("that Redis, answering others, did not send"),
            "session {i}: {got:?}"
        );
        wait_until("the connection given up", DEADLINE, || async {
            metric(&metrics(&kw).await, "keyward_pinned_connections") == Some(0.0)
        })
        .await;
    }
    // Others were never affected.
    let mut d = Raw::connect(kw.port()).await;
    assert_eq!(esc(&d.call(&[b"PING"]).await), esc(b"+PONG\r\n"));
}

/// A Redis that takes other clients' commands (a kill, or -BUSY for the
/// rest) once a script has run 100 ms.
fn busy_after_100_ms() -> Redis {
    let redis = Redis::start();
    assert_eq!(
        redis.call(&[b"CONFIG", b"SET", b"busy-reply-threshold", b"100"]),
        b"+OK\r\n"
    );
    redis
}

/// A script that runs for ever holds up the shared connection it came on:
/// `SCRIPT KILL` and `FUNCTION KILL` from another client still reach Redis
/// (on a connection of their own) and stop it, as they do on Redis itself;
/// the killed call gets Redis's error, and requests queued behind it on the
/// shared connection are served after, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_kill_and_function_kill_reach_a_busy_redis() {
    let redis = busy_after_100_ms();
    let lib: &[u8] =
        b"#!lua name=spinlib\nredis.register_function('spin', function() while true do end end)";
    assert_eq!(
        esc(&redis.call(&[b"FUNCTION", b"LOAD", lib])),
        esc(b"$7\r\nspinlib\r\n")
    );
    let kw = Keyward::start_for(&redis, "", &[]);
    // (the call that spins, the kill, the start of the call's error)
    type Case<'a> = (&'a [&'a [u8]], &'a [&'a [u8]], &'a str);
    let cases: [Case; 2] = [
        (
            &[b"EVAL", b"while true do end", b"0"],
            &[b"SCRIPT", b"KILL"],
            "-ERR Script killed by user with SCRIPT KILL...",
        ),
        (
            &[b"FCALL", b"spin", b"0"],
            &[b"FUNCTION", b"KILL"],
            "-ERR Script killed by user with SCRIPT KILL...",
        ),
    ];
    for (call, kill, killed) in cases {
        let mut spinner = Raw::connect(kw.port()).await;
        spinner.send(&cmd(call)).await;
        // Another client's write, queued behind the script on the shared
        // connection.
        let mut writer = Raw::connect(kw.port()).await;
        writer.send(&cmd(&[b"SET", b"after", b"1"])).await;
        let mut killer = Raw::connect(kw.port()).await;
        // -NOTBUSY until the script has run busy-reply-threshold.
        let last = killer
            .call_until(kill, |r| !r.starts_with(b"-NOTBUSY"))
            .await;
        assert_eq!(esc(&last), esc(b"+OK\r\n"), "{}", esc(&cmd(kill)));
        let got = spinner.read_reply().await;
        assert!(
            got.starts_with(killed.as_bytes()),
            "{}: {}",
            esc(&cmd(call)),
            esc(&got)
        );
        assert_eq!(esc(&writer.read_reply().await), esc(b"+OK\r\n"));
        assert_eq!(spinner.call(&[b"PING"]).await, b"+PONG\r\n");
        // Nothing to kill now: Redis's own answer.
        let idle = killer.call(kill).await;
        assert!(idle.starts_with(b"-NOTBUSY "), "{}", esc(&idle));
    }
}

/// A script that outlives `upstream.command_timeout_ms` costs its shared
/// connection (its caller and the requests behind it get the outcome-unknown
/// error), but keyward reconnects while Redis is still busy: clients then
/// get Redis's own `-BUSY`, as on Redis, until a `SCRIPT KILL` through
/// keyward ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_outliving_the_command_timeout_can_still_be_killed() {
    let redis = busy_after_100_ms();
    let kw = Keyward::start_for(&redis, "command_timeout_ms = 300\n", &[]);
    let mut spinner = Raw::connect(kw.port()).await;
    spinner
        .send(&cmd(&[b"EVAL", b"while true do end", b"0"]))
        .await;
    let got = spinner.read_reply().await;
    assert!(got.starts_with(OUTCOME_UNKNOWN), "{}", esc(&got));
    let mut c = Raw::connect(kw.port()).await;
    let busy = c
        .call_until(&[b"GET", b"k"], |r| r.starts_with(b"-BUSY "))
        .await;
    assert!(
        busy.starts_with(b"-BUSY Redis is busy running a script."),
        "{}",
        esc(&busy)
    );
    assert_eq!(c.call(&[b"SCRIPT", b"KILL"]).await, b"+OK\r\n");
    // Redis answers SCRIPT KILL before the script has unwound: a command
    // read in the same round of its event loop still gets -BUSY, directly
    // as through keyward. Then the data is served again.
    let after = c
        .call_until(&[b"GET", b"k"], |r| !r.starts_with(b"-BUSY "))
        .await;
    assert_eq!(esc(&after), esc(b"$-1\r\n"));
}

/// (UN)SUBSCRIBEs queued in MULTI run at EXEC: keyward learns their effect
/// (subscriber mode, the channels a bare UNSUBSCRIBE ends) and counts the
/// confirmations that follow EXEC's array (past each one's first), so the
/// replies keyward makes itself (HELLO, RESET) and the counts of later
/// (UN)SUBSCRIBEs come out as Redis's, pipelined or step by step, in RESP2
/// and RESP3; a transaction Redis aborts changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_queued_in_multi_are_counted_as_redis_runs_them() {
    let (redis, kw) = channel_restricted_stack(&[b"&ok*"], "").await;
    let sessions: &[(bool, &[&[&[u8]]])] = &[
        // A SUBSCRIBE queued after another command: subscriber mode, so
        // Redis refuses HELLO.
        (
            false,
            &[
                &[b"MULTI"],
                &[b"PING"],
                &[b"SUBSCRIBE", b"ok2"],
                &[b"EXEC"],
                &[b"HELLO"],
                &[b"UNSUBSCRIBE"],
                &[b"HELLO", b"2"],
            ],
        ),
        // Several names: confirmations past the first follow EXEC's array.
        (
            false,
            &[
                &[b"MULTI"],
                &[b"SUBSCRIBE", b"ok1", b"ok2"],
                &[b"PSUBSCRIBE", b"okp*"],
                &[b"PING"],
                &[b"EXEC"],
                &[b"UNSUBSCRIBE", b"ok1"],
                &[b"SUBSCRIBE", b"bad", b"ok3"],
                &[b"UNSUBSCRIBE"],
                &[b"PUNSUBSCRIBE"],
                &[b"HELLO", b"2"],
            ],
        ),
        (
            false,
            &[
                &[b"SUBSCRIBE", b"ok1", b"ok2"],
                &[b"MULTI"],
                &[b"UNSUBSCRIBE", b"ok1", b"ok2"],
                &[b"EXEC"],
                &[b"SUBSCRIBE", b"bad", b"ok1", b"ok2", b"ok3"],
                &[b"HELLO", b"2"],
                &[b"RESET"],
            ],
        ),
        (
            true,
            &[
                &[b"MULTI"],
                &[b"UNSUBSCRIBE", b"okA"],
                &[b"PSUBSCRIBE", b"ok*", b"ok*"],
                &[b"EXEC"],
                &[b"SUBSCRIBE", b"ok1"],
                &[b"HELLO", b"3"],
                &[b"PUNSUBSCRIBE"],
                &[b"UNSUBSCRIBE"],
                &[b"HELLO", b"3"],
            ],
        ),
        (
            true,
            &[
                &[b"SUBSCRIBE", b"ok1", b"ok2"],
                &[b"MULTI"],
                &[b"UNSUBSCRIBE", b"ok1"],
                &[b"EXEC"],
                &[b"UNSUBSCRIBE"],
                &[b"HELLO", b"3"],
            ],
        ),
        // Redis 7.0 refuses SSUBSCRIBE inside MULTI when EXEC runs it.
        (
            false,
            &[
                &[b"MULTI"],
                &[b"SSUBSCRIBE", b"ok1", b"ok2"],
                &[b"SUBSCRIBE", b"ok3", b"ok4"],
                &[b"EXEC"],
                &[b"PING"],
                &[b"UNSUBSCRIBE"],
                &[b"RESET"],
            ],
        ),
        // Aborted: nothing queued ran.
        (
            false,
            &[
                &[b"MULTI"],
                &[b"SUBSCRIBE", b"ok1", b"ok2"],
                &[b"NOSUCHCOMMAND"],
                &[b"EXEC"],
                &[b"HELLO", b"2"],
                &[b"UNSUBSCRIBE"],
                &[b"HELLO", b"2"],
            ],
        ),
    ];
    for (n, (resp3, steps)) in sessions.iter().enumerate() {
        let (mut direct, mut c) = app_pair(&redis, &kw, *resp3).await;
        let what = format!("session {n}, pipelined");
        same_up_to_ping(&mut direct, &mut c, steps, "end-of-steps", &what).await;
        // Step by step: each reply read whole (one frame inside MULTI,
        // where a closing PING would be queued; else up to a PING).
        let (mut direct, mut c) = app_pair(&redis, &kw, *resp3).await;
        let mut queued = false;
        for (i, req) in steps.iter().enumerate() {
            let name = req[0].to_ascii_uppercase();
            if queued || name == b"MULTI" {
                queued = name != b"EXEC";
                if queued {
                    direct.send(&cmd(req)).await;
                    c.send(&cmd(req)).await;
                    let want = direct.read_reply().await;
                    assert_eq!(
                        esc(&c.read_reply().await),
                        esc(&want),
                        "session {n}, step {i}: {}",
                        esc(&cmd(req))
                    );
                    continue;
                }
            }
            let what = format!("session {n}, step {i}: {}", esc(&cmd(req)));
            same_up_to_ping(
                &mut direct,
                &mut c,
                &[req],
                &format!("end-of-step-{i}"),
                &what,
            )
            .await;
        }
    }
}

/// Wait until Redis (on `port`) holds a `command` under a pause: CLIENT
/// LIST shows its connection blocked on it.
async fn wait_held(port: u16, command: &'static str) {
    let what = format!("Redis holds a {command}");
    wait_until(&what, DEADLINE, || async move {
        let list = blocking(|| redis_cmd(port, &[b"CLIENT", b"LIST"]));
        String::from_utf8_lossy(&list)
            .lines()
            .any(|l| l.contains("flags=b") && l.contains(&format!("cmd={command} ")))
    })
    .await;
}

/// `CLIENT PAUSE WRITE` holds a write on the shared connection it came on,
/// and Redis reads nothing more from that connection until the pause ends:
/// another client's `CLIENT UNPAUSE` still reaches Redis (on a connection
/// of its own) and lifts it at once, as on Redis, and the held write then
/// completes. From the client that paused, an UNPAUSE pipelined behind the
/// PAUSE and a read runs after them, as on Redis, and lifts the pause too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unpause_reaches_redis_past_a_held_write() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "command_timeout_ms = 3000\n", &[]);
    let mut pauser = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&pauser
            .call(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"])
            .await),
        esc(b"+OK\r\n")
    );
    let mut writer = Raw::connect(kw.port()).await;
    writer.send(&cmd(&[b"SET", b"held", b"1"])).await;
    wait_held(redis.port(), "set").await;
    let started = Instant::now();
    assert_eq!(
        esc(&pauser.call(&[b"CLIENT", b"UNPAUSE"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(esc(&writer.read_reply().await), esc(b"+OK\r\n"));
    // Well before the command timeout (3 s) would have cut the connection.
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        esc(&writer.call(&[b"GET", b"held"]).await),
        esc(b"$1\r\n1\r\n")
    );

    // Pipelined by the client that pauses: the UNPAUSE does not overtake
    // what comes before it, here a write a short pause holds and a long
    // pause behind that; on Redis the UNPAUSE runs last and ends the long
    // pause.
    let mut both = Raw::connect(kw.port()).await;
    let mut wire = cmd(&[b"CLIENT", b"PAUSE", b"300", b"WRITE"]);
    wire.extend(cmd(&[b"SET", b"held", b"2"]));
    wire.extend(cmd(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"]));
    wire.extend(cmd(&[b"GET", b"held"]));
    wire.extend(cmd(&[b"CLIENT", b"UNPAUSE"]));
    both.send(&wire).await;
    for want in [
        &b"+OK\r\n"[..],
        b"+OK\r\n",
        b"+OK\r\n",
        b"$1\r\n2\r\n",
        b"+OK\r\n",
    ] {
        assert_eq!(esc(&both.read_reply().await), esc(want));
    }
    // Not paused any more: a write goes through at once.
    let started = Instant::now();
    assert_eq!(
        esc(&writer.call(&[b"SET", b"after", b"2"]).await),
        esc(b"+OK\r\n")
    );
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}

/// Under `CLIENT PAUSE WRITE` Redis holds every PUBLISH, keyward's own
/// fleet hot-key summary included. That PUBLISH goes on a connection of
/// keyward's own, so the clients' reads, which a pause does not hold, are
/// answered at once, as on Redis, instead of waiting behind it on the
/// shared connection (and failing at the command timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_not_held_behind_keywards_own_publish_under_pause_write() {
    let redis = Redis::start();
    let kw = Keyward::start_for(
        &redis,
        "command_timeout_ms = 3000\n[hotkeys]\nenabled = true\nfleet = true\nwindow_ms = 200\n",
        &[],
    );
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(esc(&c.call(&[b"SET", b"k", b"v"]).await), esc(b"+OK\r\n"));
    assert_eq!(
        esc(&c.call(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"]).await),
        esc(b"+OK\r\n")
    );
    // keyward's next summary.
    wait_held(redis.port(), "publish").await;
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(esc(&c.call(&[b"GET", b"k"]).await), esc(b"$1\r\nv\r\n"));
        assert_eq!(esc(&c.call(&[b"PING"]).await), esc(b"+PONG\r\n"));
        assert!(
            started.elapsed() < Duration::from_millis(2000),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        esc(&c.call(&[b"CLIENT", b"UNPAUSE"]).await),
        esc(b"+OK\r\n")
    );
}

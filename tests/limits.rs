//! keyward's bounds as a client meets them: too many clients, requests and
//! arguments that are too large, a client that stops reading its replies,
//! too many pinned upstream connections, idle clients, a graceful shutdown that still
//! delivers every reply owed, and the memory 10,000 idle clients cost.
//! Each limit answers with a clear error (or a clean disconnect) and never
//! affects the other clients.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

const MAX_CLIENTS_ERR: &[u8] = b"-ERR max number of clients reached\r\n";

/// `keyward_limit_reached_total` for the bound with config key `key`.
async fn limit_reached(kw: &Keyward, key: &str) -> f64 {
    let text = metrics(kw).await;
    let series = format!("keyward_limit_reached_total{{limit=\"{key}\"}}");
    metric(&text, &series).unwrap_or_else(|| panic!("/metrics has no {series}"))
}

/// Connect, send PING and read one reply frame, or whatever arrived before
/// the peer closed. Returns the stream (for keeping the connection open) and
/// the reply bytes.
async fn ping_once(port: u16) -> (TcpStream, Vec<u8>) {
    let mut s = within(DEADLINE, "connect", TcpStream::connect(("127.0.0.1", port)))
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    s.set_nodelay(true).unwrap();
    s.write_all(&cmd(&[b"PING"])).await.expect("write PING");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(Some(n)) = frame_len(&buf) {
            buf.truncate(n);
            return (s, buf);
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!("PING: no reply within {DEADLINE:?}; got {}", esc(&buf)),
            Ok(Ok(0)) | Ok(Err(_)) => return (s, buf),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A connection that got +PONG. Retries while keyward still counts an
/// earlier connection (the kit's start-up probe, or one the test just
/// closed) against `server.max_clients`; that release is asynchronous.
async fn connect_pinged(port: u16) -> TcpStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (s, reply) = ping_once(port).await;
        if reply == b"+PONG\r\n" {
            return s;
        }
        assert_eq!(
            reply,
            MAX_CLIENTS_ERR,
            "PING: expected +PONG or the max-clients error, got {}",
            esc(&reply)
        );
        assert!(
            Instant::now() < deadline,
            "no connection slot became free within {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `server.max_clients = 3`: the fourth connection gets exactly Redis's
/// error and is closed; closing one of the three frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_rejects_the_extra_client_and_frees_slots() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[server]\nmax_clients = 3\n", &[]);
    wait_ready(&kw, DEADLINE).await;

    let a = connect_pinged(kw.port()).await;
    let _b = connect_pinged(kw.port()).await;
    let _c = connect_pinged(kw.port()).await;

    let mut fourth = Raw::connect(kw.port()).await;
    assert_eq!(
        fourth.read_to_close().await,
        MAX_CLIENTS_ERR,
        "the fourth client's whole conversation"
    );

    drop(a);
    let mut d = connect_pinged(kw.port()).await;
    // The new client is a full client, not just a PONG.
    d.write_all(&cmd(&[b"SET", b"k", b"v"])).await.unwrap();
    let mut ok = [0u8; 5];
    within(DEADLINE, "SET reply", d.read_exact(&mut ok))
        .await
        .unwrap();
    assert_eq!(&ok, b"+OK\r\n");

    let mut fifth = Raw::connect(kw.port()).await;
    assert_eq!(
        fifth.read_to_close().await,
        MAX_CLIENTS_ERR,
        "still full again"
    );
    // The fourth and fifth, and any PING of `d` that came before a's slot
    // was given back: every refused connection is counted.
    let text = metrics(&kw).await;
    let rejected = metric(
        &text,
        "keyward_clients_rejected_total{reason=\"max_clients\"}",
    )
    .expect("keyward_clients_rejected_total");
    assert!(rejected >= 2.0, "{rejected} connections refused, want >= 2");
    assert_eq!(
        limit_reached(&kw, "server.max_clients").await,
        rejected,
        "the limit counts each refused connection"
    );
}

/// Clients that pipeline big replies, close their sending side and never
/// read still count against `server.max_clients` while they hold their
/// replies, and are closed once they take none for
/// `server.drain_timeout_ms` (counted in `keyward_limit_reached_total`):
/// their slots and memory come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_clients_that_do_not_read_count_and_are_closed() {
    const VALUE: usize = 1024 * 1024;
    let redis = Redis::start();
    let kw = Keyward::start_for(
        &redis,
        "[server]\nmax_clients = 3\ndrain_timeout_ms = 500\n",
        &[],
    );
    wait_ready(&kw, DEADLINE).await;
    assert_eq!(
        esc(&redis.call(&[b"SET", b"big", &vec![b'v'; VALUE]])),
        esc(b"+OK\r\n")
    );
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let mut hog = Raw::connect(kw.port()).await;
        hog.send(&cmd(&[b"GET", b"big"]).repeat(32)).await;
        hog.shutdown_write().await;
        hogs.push(hog);
    }
    // 32 MiB each cannot all sit in socket buffers: they hold their slots.
    let mut fourth = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&fourth.read_to_close().await),
        esc(MAX_CLIENTS_ERR),
        "a fourth client while three half-closed ones hold their replies"
    );
    let since = Instant::now();
    wait_until(
        "the three closed by server.drain_timeout_ms",
        DEADLINE,
        || async { limit_reached(&kw, "server.drain_timeout_ms").await == 3.0 },
    )
    .await;
    assert!(
        since.elapsed() >= Duration::from_millis(250),
        "closed {:?} after the fourth was refused, before drain_timeout_ms = 500",
        since.elapsed()
    );
    let mut next = Raw::connect(kw.port()).await;
    assert_eq!(esc(&next.call(&[b"PING"]).await), esc(b"+PONG\r\n"));
    // Each hog got part of its replies, then the close.
    for mut hog in hogs {
        let got = within(DEADLINE, "the hog's close", hog.read_to_close()).await;
        assert!(got.len() < 32 * (VALUE + 16), "a hog got all its replies");
    }
}

/// `server.max_request_bytes = 1024`: a 2 KiB SET is a protocol error that
/// names the limit, and that client is closed; another client carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_larger_than_max_request_bytes_is_refused() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[server]\nmax_request_bytes = 1024\n", &[]);
    wait_ready(&kw, DEADLINE).await;

    let mut other = Raw::connect(kw.port()).await;
    assert_eq!(other.call(&[b"SET", b"small", b"1"]).await, b"+OK\r\n");

    let mut big = Raw::connect(kw.port()).await;
    let value = vec![b'x'; 2048];
    big.send(&cmd(&[b"SET", b"big", &value])).await;
    let got = big.read_to_close().await;
    let frames = split_frames(&got)
        .unwrap_or_else(|e| panic!("reply to the oversized SET: {e}: {}", esc(&got)));
    assert_eq!(
        frames.len(),
        1,
        "exactly one reply, then close: {}",
        esc(&got)
    );
    assert!(
        got.starts_with(b"-ERR Protocol error:"),
        "expected -ERR Protocol error: ..., got {}",
        esc(&got)
    );
    assert!(
        String::from_utf8_lossy(&got).contains("max_request_bytes"),
        "the error should name max_request_bytes: {}",
        esc(&got)
    );

    assert_eq!(other.call(&[b"GET", b"small"]).await, b"$1\r\n1\r\n");
    assert_eq!(other.call(&[b"SET", b"small", b"2"]).await, b"+OK\r\n");
    assert_eq!(redis.call(&[b"GET", b"small"]), b"$1\r\n2\r\n");
    assert_eq!(
        redis.call(&[b"EXISTS", b"big"]),
        b":0\r\n",
        "the refused SET must not reach Redis"
    );
    assert_eq!(limit_reached(&kw, "server.max_request_bytes").await, 1.0);
    assert_eq!(limit_reached(&kw, "server.max_bulk_bytes").await, 0.0);
}

/// `server.max_bulk_bytes = 100`: a `$200` argument gets exactly Redis's
/// "invalid bulk length" error and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_longer_than_max_bulk_bytes_is_refused() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[server]\nmax_bulk_bytes = 100\n", &[]);
    wait_ready(&kw, DEADLINE).await;

    let mut other = Raw::connect(kw.port()).await;
    let ok_value = vec![b'y'; 100];
    assert_eq!(
        other.call(&[b"SET", b"k", &ok_value]).await,
        b"+OK\r\n",
        "a bulk of exactly max_bulk_bytes is fine"
    );

    let mut raw = Raw::connect(kw.port()).await;
    let value = vec![b'x'; 200];
    raw.send(&cmd(&[b"SET", b"k2", &value])).await;
    assert_eq!(
        raw.read_to_close().await,
        b"-ERR Protocol error: invalid bulk length\r\n"
    );

    let mut want = b"$100\r\n".to_vec();
    want.extend_from_slice(&ok_value);
    want.extend_from_slice(b"\r\n");
    assert_eq!(other.call(&[b"GET", b"k"]).await, want);
    assert_eq!(limit_reached(&kw, "server.max_bulk_bytes").await, 1.0);

    // A malformed length is a protocol error too, but no bound was reached.
    let mut bad = Raw::connect(kw.port()).await;
    bad.send(b"*1\r\n$x\r\n").await;
    assert_eq!(
        bad.read_to_close().await,
        b"-ERR Protocol error: invalid bulk length\r\n"
    );
    assert_eq!(limit_reached(&kw, "server.max_bulk_bytes").await, 1.0);
}

/// `server.max_reply_bytes = 1 MiB`: a client that pipelines 100 GETs of a
/// 512 KiB value and never reads is disconnected before it could be sent
/// all 50 MiB; another client keeps working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_does_not_read_is_disconnected_at_max_reply_bytes() {
    const VALUE: usize = 512 * 1024;
    const GETS: usize = 100;

    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[server]\nmax_reply_bytes = 1048576\n", &[]);
    wait_ready(&kw, DEADLINE).await;

    let value = vec![b'v'; VALUE];
    let mut frame = format!("${VALUE}\r\n").into_bytes();
    frame.extend_from_slice(&value);
    frame.extend_from_slice(b"\r\n");

    let mut other = Raw::connect(kw.port()).await;
    assert_eq!(other.call(&[b"SET", b"big", &value]).await, b"+OK\r\n");

    let mut hog = Raw::connect(kw.port()).await;
    let mut pipeline = Vec::new();
    for _ in 0..GETS {
        pipeline.extend(cmd(&[b"GET", b"big"]));
    }
    hog.send(&pipeline).await;

    // Without reading a byte: wait until the socket shows the proxy's close,
    // either as EOF/reset visible to peek or as a failing write.
    let deadline = Instant::now() + DEADLINE;
    let probe = cmd(&[b"PING"]);
    loop {
        let s = hog.stream();
        let mut b = [0u8; 1];
        match tokio::time::timeout(POLL, s.peek(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
        match s.try_write(&probe) {
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "keyward did not disconnect a client that never reads within {DEADLINE:?}"
        );
        // The other client is unaffected meanwhile.
        assert_eq!(other.call(&[b"PING"]).await, b"+PONG\r\n");
        tokio::time::sleep(POLL).await;
    }

    let got = hog.read_to_close().await;
    eprintln!(
        "the non-reading client received {} bytes before EOF",
        got.len()
    );
    assert!(
        got.len() < GETS * frame.len(),
        "the client got every reply ({} bytes); it should have been cut off",
        got.len()
    );
    // Whatever did arrive is an intact prefix of the replies.
    for (i, chunk) in got.chunks(frame.len()).enumerate() {
        assert!(
            frame.starts_with(chunk),
            "reply {i} to the non-reading client is corrupt"
        );
    }

    assert_eq!(other.call(&[b"GET", b"big"]).await, frame);
    assert_eq!(other.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_eq!(other.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    assert_eq!(
        limit_reached(&kw, "server.max_reply_bytes").await,
        1.0,
        "one client cut off"
    );
}

/// `server.idle_timeout_secs = 1` (Redis's `timeout`): a client that goes
/// quiet is closed, without a reply, about a second after its last request;
/// a client that keeps sending is not; each close is counted under the
/// setting's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_closed_after_idle_timeout_secs() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[server]\nidle_timeout_secs = 1\n", &[]);
    wait_ready(&kw, DEADLINE).await;

    let mut quiet = Raw::connect(kw.port()).await;
    let mut busy = Raw::connect(kw.port()).await;
    assert_eq!(quiet.call(&[b"PING"]).await, b"+PONG\r\n");
    let last = Instant::now();

    let keep_busy = async {
        // Three times the timeout, a request every 200 ms.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            assert_eq!(busy.call(&[b"PING"]).await, b"+PONG\r\n");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let closed = async {
        let got = quiet.read_to_close().await;
        (got, last.elapsed())
    };
    let ((got, after), ()) = tokio::join!(closed, keep_busy);
    assert!(
        got.is_empty(),
        "the idle client got {} before the close",
        esc(&got)
    );
    assert!(
        after >= Duration::from_millis(900),
        "closed {after:?} after its last request, before idle_timeout_secs = 1"
    );
    assert_eq!(busy.call(&[b"GET", b"nothing"]).await, b"$-1\r\n");
    assert_eq!(limit_reached(&kw, "server.idle_timeout_secs").await, 1.0);
    // /health (and the dashboard's health card) lists the limits reached.
    let admin = kw.admin_port();
    let (_, body) = blocking(|| http_get(admin, "/health"));
    let health: serde_json::Value = serde_json::from_str(&body).expect("/health is JSON");
    assert_eq!(
        health["limits_reached"],
        serde_json::json!({"server.idle_timeout_secs": 1}),
        "/health: {body}"
    );
}

/// `server.idle_timeout_secs` closes quiet clients holding a pinned
/// connection too (in MULTI, in another database), so idle clients cannot
/// keep every `upstream.max_pinned` slot; as with Redis's `timeout`, a
/// subscriber and a client blocked in BLPOP are not idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_pinned_clients_but_not_subscribers_or_blocked_calls() {
    let redis = Redis::start();
    let kw = Keyward::start_for(
        &redis,
        "max_pinned = 4\n[server]\nidle_timeout_secs = 1\n",
        &[],
    );
    wait_ready(&kw, DEADLINE).await;
    let mut sub = Raw::connect(kw.port()).await;
    sub.send(&cmd(&[b"SUBSCRIBE", b"ch"])).await;
    assert_eq!(
        esc(&sub.read_reply().await),
        esc(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
    );
    let mut blocked = Raw::connect(kw.port()).await;
    blocked.send(&cmd(&[b"BLPOP", b"list", b"0"])).await;
    let mut multi = Raw::connect(kw.port()).await;
    assert_eq!(multi.call(&[b"MULTI"]).await, b"+OK\r\n");
    let mut select = Raw::connect(kw.port()).await;
    assert_eq!(select.call(&[b"SELECT", b"1"]).await, b"+OK\r\n");
    let since = Instant::now();

    for (name, conn) in [("MULTI", &mut multi), ("SELECT 1", &mut select)] {
        let got = within(DEADLINE, name, conn.read_to_close()).await;
        assert!(got.is_empty(), "{name}: got {} before the close", esc(&got));
    }
    assert!(
        since.elapsed() >= Duration::from_millis(900),
        "closed {:?} after their last request, before idle_timeout_secs = 1",
        since.elapsed()
    );
    assert_eq!(limit_reached(&kw, "server.idle_timeout_secs").await, 2.0);

    // Idle longer than those two, the subscriber and the blocked client
    // are still served.
    let mut other = Raw::connect(kw.port()).await;
    assert_eq!(other.call(&[b"PUBLISH", b"ch", b"m"]).await, b":1\r\n");
    assert_eq!(
        esc(&sub.read_reply().await),
        esc(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n")
    );
    assert_eq!(other.call(&[b"LPUSH", b"list", b"x"]).await, b":1\r\n");
    assert_eq!(
        esc(&blocked.read_reply().await),
        esc(b"*2\r\n$4\r\nlist\r\n$1\r\nx\r\n")
    );
    // The closed clients' pinned connections are free again.
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;
    assert_eq!(a.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_eq!(b.call(&[b"MULTI"]).await, b"+OK\r\n");
}

/// `upstream.max_pinned = 2`: two clients in MULTI hold the two pinned
/// connections; a third MULTI gets the limit error; once a transaction ends
/// with EXEC its connection is free for a new MULTI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pinned_limits_transactions() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "max_pinned = 2\n", &[]);
    wait_ready(&kw, DEADLINE).await;

    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(a.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_eq!(b.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_eq!(
        c.call(&[b"MULTI"]).await,
        b"-ERR max number of pinned upstream connections reached (upstream.max_pinned = 2)\r\n"
            .to_vec()
    );
    // The refused client is still a working client.
    assert_eq!(c.call(&[b"SET", b"c", b"1"]).await, b"+OK\r\n");

    assert_eq!(a.call(&[b"SET", b"a", b"1"]).await, b"+QUEUED\r\n");
    assert_eq!(a.call(&[b"EXEC"]).await, b"*1\r\n+OK\r\n");

    // A's transaction is over (and A sends nothing more): its pinned
    // connection must become available to C.
    let deadline = Instant::now() + DEADLINE;
    let mut refused = 1.0;
    loop {
        let reply = c.call(&[b"MULTI"]).await;
        if reply == b"+OK\r\n" {
            break;
        }
        refused += 1.0;
        assert_eq!(
            reply,
            b"-ERR max number of pinned upstream connections reached (upstream.max_pinned = 2)\r\n"
                .to_vec()
        );
        assert!(
            Instant::now() < deadline,
            "after A's EXEC, C's MULTI was still refused for {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(c.call(&[b"INCR", b"c"]).await, b"+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]).await, b"*1\r\n:2\r\n");
    assert_eq!(b.call(&[b"DISCARD"]).await, b"+OK\r\n");
    assert_eq!(a.call(&[b"GET", b"a"]).await, b"$1\r\n1\r\n");
    assert_eq!(
        limit_reached(&kw, "upstream.max_pinned").await,
        refused,
        "every refused MULTI is counted"
    );
}

/// SIGTERM with 1,000 pipelined requests in flight: the client gets every
/// reply, intact and in order, then the connection closes; new connections
/// are refused; keyward exits 0 within `shutdown_grace_ms` + 2 s.
///
/// Each GET returns 64 KiB, so about 32 MiB of replies are still on their way
/// when the signal arrives (more than socket buffers hold): keyward really
/// has to keep writing while it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_delivers_every_reply_owed() {
    const GRACE_MS: u64 = 3000;
    const PAIRS: usize = 500;
    const BIG: usize = 64 * 1024;

    let redis = Redis::start();
    let big = |i: usize| {
        let mut v = format!("big:{i}:").into_bytes();
        v.resize(BIG, b'a' + (i % 26) as u8);
        v
    };
    // Setup straight into Redis: large values, small requests.
    for chunk in (0..PAIRS).collect::<Vec<_>>().chunks(50) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("big:{i}")).collect();
        let vals: Vec<Vec<u8>> = chunk.iter().map(|&i| big(i)).collect();
        let cmds: Vec<Vec<&[u8]>> = keys
            .iter()
            .zip(&vals)
            .map(|(k, v)| vec![&b"SET"[..], k.as_bytes(), v.as_slice()])
            .collect();
        let refs: Vec<&[&[u8]]> = cmds.iter().map(|c| c.as_slice()).collect();
        for r in redis_pipeline(redis.port(), &refs) {
            assert_eq!(r, b"+OK\r\n");
        }
    }

    let mut kw = Keyward::start_for(
        &redis,
        &format!("[server]\nshutdown_grace_ms = {GRACE_MS}\n"),
        &[],
    );
    wait_ready(&kw, DEADLINE).await;

    // 1,000 requests: SET small:i i, GET big:i.
    let mut raw = Raw::connect(kw.port()).await;
    let mut pipeline = Vec::new();
    for i in 0..PAIRS {
        let (small, big_key, n) = (format!("small:{i}"), format!("big:{i}"), i.to_string());
        pipeline.extend(cmd(&[b"SET", small.as_bytes(), n.as_bytes()]));
        pipeline.extend(cmd(&[b"GET", big_key.as_bytes()]));
    }
    raw.send(&pipeline).await;
    // Every request was written before the signal, and keyward is answering.
    assert_eq!(raw.read_reply().await, b"+OK\r\n", "reply 0");

    kw.signal_term();
    let signalled = Instant::now();

    let mut got = 1;
    let mut problems = Vec::new();
    for i in 0..PAIRS {
        if i > 0 {
            let r = raw.read_reply().await;
            got += 1;
            if r != b"+OK\r\n" {
                problems.push(format!("reply {}: SET small:{i}: {}", 2 * i, esc(&r)));
            }
        }
        let r = raw.read_reply().await;
        got += 1;
        let mut want = format!("${BIG}\r\n").into_bytes();
        want.extend_from_slice(&big(i));
        want.extend_from_slice(b"\r\n");
        if r != want {
            let head = &r[..r.len().min(40)];
            problems.push(format!(
                "reply {}: GET big:{i}: wrong ({} bytes, starting {})",
                2 * i + 1,
                r.len(),
                esc(head)
            ));
        }
    }
    let drained_after = signalled.elapsed();
    assert!(
        problems.is_empty(),
        "{} wrong replies after SIGTERM:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(got, 2 * PAIRS);
    assert!(
        raw.is_closed().await,
        "keyward should close the connection after draining it"
    );
    assert!(
        raw.buffered().is_empty(),
        "bytes after the last reply: {}",
        esc(raw.buffered())
    );

    let port = kw.port();
    wait_until("new connections are refused", DEADLINE, || async move {
        TcpStream::connect(("127.0.0.1", port)).await.is_err()
    })
    .await;

    let limit = Duration::from_millis(GRACE_MS) + Duration::from_secs(2);
    let left = limit.saturating_sub(signalled.elapsed());
    let status = tokio::task::block_in_place(|| kw.wait_exit(left));
    let status = status.unwrap_or_else(|| {
        panic!(
            "keyward still running {limit:?} after SIGTERM\n{}",
            kw.log()
        )
    });
    assert!(
        status.success(),
        "keyward exit status after SIGTERM: {status}\n{}",
        kw.log()
    );
    eprintln!(
        "replies drained {drained_after:?} after SIGTERM; keyward exited ({status}) after {:?}",
        signalled.elapsed()
    );

    // The writes happened exactly once each.
    for i in (0..PAIRS).step_by(50) {
        let key = format!("small:{i}");
        let n = i.to_string();
        let want = format!("${}\r\n{n}\r\n", n.len()).into_bytes();
        assert_eq!(redis.call(&[b"GET", key.as_bytes()]), want);
    }
}

/// The soft open-file limit of this process, from /proc/self/limits.
fn nofile_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

/// 10,000 idle clients, each having sent PING and read +PONG, cost keyward
/// less than 200 MiB of resident memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_clients_fit_in_200_mib() {
    const CLIENTS: usize = 10_000;
    // Below the accept backlog keyward gets from tokio's default bind (128),
    // so connecting measures keyward, not SYN retransmits.
    const CONCURRENT: usize = 100;
    const MAX_RSS_KIB: u64 = 200 * 1024;

    // The sockets live in this process; keyward raises its own limit.
    // `rlimit` is one of keyward's dependencies, so tests may use it too.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let need = CLIENTS as u64 + 1024;
    match nofile_soft_limit() {
        Some(n) if n >= need => {}
        n => {
            eprintln!(
                "SKIPPED ten_thousand_idle_clients_fit_in_200_mib: this process may open {n:?} files \
                 and the test needs {need} (raise `ulimit -n`; scripts/test does)"
            );
            return;
        }
    }

    let redis = Redis::start();
    // A little headroom over 10,000 so the kit's start-up probe connection,
    // released asynchronously, cannot take one of the test's slots.
    let kw = Keyward::start_for(
        &redis,
        &format!("[server]\nmax_clients = {}\n", CLIENTS + 100),
        &[],
    );
    wait_ready(&kw, DEADLINE).await;
    let port = kw.port();
    let rss_before = kw.rss_kib();

    let started = Instant::now();
    let mut conns: Vec<TcpStream> = Vec::with_capacity(CLIENTS);
    while conns.len() < CLIENTS {
        let mut set = JoinSet::new();
        for _ in 0..CONCURRENT.min(CLIENTS - conns.len()) {
            set.spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap_or_else(|e| panic!("connect to keyward: {e}"));
                s.write_all(&cmd(&[b"PING"])).await.expect("write PING");
                let mut reply = [0u8; 7];
                s.read_exact(&mut reply).await.expect("read PING reply");
                assert_eq!(&reply, b"+PONG\r\n", "PING reply");
                s
            });
        }
        let batch = within(
            Duration::from_secs(30),
            "a batch of connections to PING",
            async {
                let mut out = Vec::new();
                while let Some(r) = set.join_next().await {
                    out.push(r.expect("connection task"));
                }
                out
            },
        )
        .await;
        conns.extend(batch);
    }
    let took = started.elapsed();

    // Still serving: a new client and a sample of the idle ones.
    let mut fresh = Raw::connect(port).await;
    assert_eq!(fresh.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    for s in conns.iter_mut().step_by(1000) {
        s.write_all(&cmd(&[b"GET", b"k"])).await.unwrap();
        let mut reply = [0u8; 7];
        within(
            DEADLINE,
            "GET on an idle connection",
            s.read_exact(&mut reply),
        )
        .await
        .unwrap();
        assert_eq!(&reply, b"$1\r\nv\r\n");
    }

    let rss = kw.rss_kib();
    eprintln!(
        "keyward RSS: {} KiB before, {} KiB with {} idle clients ({:.1} MiB; connected in {took:?})",
        rss_before,
        rss,
        conns.len(),
        rss as f64 / 1024.0
    );
    assert!(
        rss < MAX_RSS_KIB,
        "keyward RSS with {CLIENTS} idle clients is {rss} KiB, over {MAX_RSS_KIB} KiB"
    );
}

/// `admin.max_connections = 4` and `admin.idle_timeout_secs = 1`: four
/// admin connections that send half a request and go quiet hold every slot,
/// so a fifth is closed at once (Redis clients are unaffected); the quiet
/// ones are closed after a second, and the admin port answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_bounded_and_quiet_ones_closed() {
    let redis = Redis::start();
    let kw = Keyward::start_for(
        &redis,
        "[admin]\nmax_connections = 4\nidle_timeout_secs = 1\n",
        &[],
    );
    wait_ready(&kw, DEADLINE).await;
    let mut quiet = Vec::new();
    for _ in 0..4 {
        let mut c = Raw::connect(kw.admin_port()).await;
        c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
        quiet.push(c);
    }
    let last_byte = Instant::now();
    let mut fifth = Raw::connect(kw.admin_port()).await;
    assert!(
        fifth.is_closed().await,
        "a fifth admin connection stayed open"
    );
    let mut redis_client = Raw::connect(kw.port()).await;
    assert_eq!(redis_client.call(&[b"PING"]).await, b"+PONG\r\n");

    for c in &mut quiet {
        assert!(c.is_closed().await, "a quiet admin connection stayed open");
    }
    assert!(
        last_byte.elapsed() >= Duration::from_millis(900),
        "quiet admin connections closed {:?} after their last byte, before idle_timeout_secs = 1",
        last_byte.elapsed()
    );
    assert!(limit_reached(&kw, "admin.max_connections").await >= 1.0);
    assert_eq!(limit_reached(&kw, "admin.idle_timeout_secs").await, 4.0);

    // A request dripped a byte every 200 ms is never quiet, but it is not
    // finished within idle_timeout_secs of its first byte: closed all the
    // same, and the port answers again.
    let mut drip = Raw::connect(kw.admin_port()).await;
    let started = Instant::now();
    let closed = loop {
        if started.elapsed() > DEADLINE {
            break false;
        }
        if drip.stream().write_all(b"X").await.is_err()
            || drip.is_closed_within(Duration::from_millis(200)).await
        {
            break true;
        }
    };
    assert!(
        closed,
        "a dripped request kept its admin connection for {DEADLINE:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the dripped request was closed after {:?}, before idle_timeout_secs = 1",
        started.elapsed()
    );
    assert_eq!(limit_reached(&kw, "admin.idle_timeout_secs").await, 5.0);
    let (status, _) = blocking({
        let port = kw.admin_port();
        move || http_get(port, "/live")
    });
    assert_eq!(status, 200);
}

/// `upstream.max_inflight = 3`, counted in requests: with Redis paused, one
/// client's three pipelined GETs fill the shared connection, and another
/// client's request fails fast with the setting's name instead of queueing;
/// the three are answered once Redis resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_inflight_counts_requests_and_fails_fast() {
    let redis = Redis::start();
    let kw = Keyward::start_for(
        &redis,
        "max_inflight = 3\n[hotkeys]\nfleet = false\n[cache]\nmax_mb = 0\n",
        &[],
    );
    wait_ready(&kw, DEADLINE).await;
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;
    assert_eq!(a.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    let mut direct = Raw::connect(redis.port()).await;
    assert_eq!(
        direct.call(&[b"CLIENT", b"PAUSE", b"1500", b"ALL"]).await,
        b"+OK\r\n"
    );
    let three: Vec<u8> = (0..3).flat_map(|_| cmd(&[b"GET", b"k"])).collect();
    a.send(&three).await;
    wait_until("three requests in flight upstream", DEADLINE, || async {
        let m = metrics(&kw).await;
        m.lines()
            .filter(|l| l.starts_with("keyward_upstream_inflight{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            == 3.0
    })
    .await;
    let refused = within(
        DEADLINE,
        "GET while three are in flight",
        b.call(&[b"GET", b"k"]),
    )
    .await;
    let text = String::from_utf8_lossy(&refused).into_owned();
    assert!(
        text.contains("has 3 requests in flight (upstream.max_inflight)"),
        "{text}"
    );
    for reply in a.read_replies(3).await {
        assert_eq!(esc(&reply), esc(b"$1\r\nv\r\n"));
    }
    assert!(limit_reached(&kw, "upstream.max_inflight").await >= 1.0);
}

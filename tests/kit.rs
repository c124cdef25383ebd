//! Self-tests for the integration-test kit in `tests/support`, run against a
//! real `redis-server` only (never keyward), so a kit bug shows up here and
//! not as a mysterious proxy failure elsewhere.

mod support;

use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use support::*;

#[test]
fn free_port_is_bindable_and_never_repeats() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ports.len(),
        "free_port repeated a port: {ports:?}"
    );
    std::net::TcpListener::bind(("127.0.0.1", ports[0])).expect("a fresh port is bindable");
}

#[test]
fn cmd_encodes_bulk_array() {
    assert_eq!(cmd(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    assert_eq!(
        cmd(&[b"SET", b"", b"a\r\nb"]),
        b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\na\r\nb\r\n"
    );
}

#[test]
fn frame_len_handles_resp2_and_resp3() {
    let complete: &[&[u8]] = &[
        b"+OK\r\n",
        b"-ERR x\r\n",
        b":42\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"$0\r\n\r\n",
        b"$4\r\na\r\nb\r\n",
        b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
        b"*0\r\n",
        b"_\r\n",
        b",3.14\r\n",
        b"#t\r\n",
        b"(12345678901234567890\r\n",
        b"!3\r\nERR\r\n",
        b"=7\r\ntxt:abc\r\n",
        b"%1\r\n+k\r\n*1\r\n:1\r\n",
        b"~2\r\n:1\r\n:2\r\n",
        b">2\r\n+message\r\n$1\r\nx\r\n",
        b"|1\r\n+ttl\r\n:5\r\n$1\r\nv\r\n",
    ];
    for frame in complete {
        assert_eq!(
            frame_len(frame),
            Ok(Some(frame.len())),
            "frame {}",
            esc(frame)
        );
        // Every strict prefix is incomplete, never an error or a short frame.
        for cut in 0..frame.len() {
            assert_eq!(
                frame_len(&frame[..cut]),
                Ok(None),
                "prefix {} of {}",
                cut,
                esc(frame)
            );
        }
        // Trailing bytes belong to the next frame.
        let mut two = frame.to_vec();
        two.extend_from_slice(b"+NEXT\r\n");
        assert_eq!(frame_len(&two), Ok(Some(frame.len())));
    }
    assert!(frame_len(b"?what\r\n").is_err());
    assert!(frame_len(b"$x\r\n").is_err());
    assert!(
        frame_len(b"$1\r\nabc\r\n").is_err(),
        "bulk not terminated by CRLF"
    );
    assert_eq!(
        split_frames(b"+OK\r\n:1\r\n$-1\r\n").unwrap(),
        vec![b"+OK\r\n".to_vec(), b":1\r\n".to_vec(), b"$-1\r\n".to_vec()]
    );
    assert!(split_frames(b"+OK\r\n$3\r\nab").is_err());
}

#[test]
fn redis_answers_ping_and_commands() {
    let redis = Redis::start();
    assert_eq!(redis.addr(), format!("127.0.0.1:{}", redis.port()));
    assert_eq!(redis_cmd(redis.port(), &[b"PING"]), b"+PONG\r\n");
    assert_eq!(redis.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
    let replies = redis_pipeline(
        redis.port(),
        &[
            &[b"GET", b"k"],
            &[b"GET", b"missing"],
            &[b"CONFIG", b"GET", b"save"],
        ],
    );
    assert_eq!(
        replies,
        vec![
            b"$1\r\nv\r\n".to_vec(),
            b"$-1\r\n".to_vec(),
            b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n".to_vec()
        ]
    );
    assert!(
        redis.log().contains("Ready to accept connections"),
        "{}",
        redis.log()
    );
}

#[test]
fn requirepass_server_counts_as_up() {
    let redis = Redis::start_with(&["--requirepass", "x"]);
    assert!(redis_cmd(redis.port(), &[b"PING"]).starts_with(b"-NOAUTH"));
    let replies = redis_pipeline(redis.port(), &[&[b"AUTH", b"x"], &[b"PING"]]);
    assert_eq!(replies, vec![b"+OK\r\n".to_vec(), b"+PONG\r\n".to_vec()]);
}

#[test]
fn kill_then_restart_on_same_port() {
    let mut redis = Redis::start();
    let port = redis.port();
    assert_eq!(redis.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
    // A held client connection leaves a socket on the server side when it is
    // killed: the restart must rebind despite it.
    let held = TcpStream::connect(("127.0.0.1", port)).unwrap();

    redis.kill();
    assert!(!redis.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still accepting after kill"
    );

    redis.restart();
    drop(held);
    assert!(redis.is_running());
    assert_eq!(redis.port(), port);
    assert_eq!(redis_cmd(port, &[b"PING"]), b"+PONG\r\n");
    assert_eq!(
        redis.call(&[b"GET", b"k"]),
        b"$-1\r\n",
        "no persistence: data is gone"
    );

    redis.stop();
    assert!(!redis.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still accepting after stop"
    );
}

#[tokio::test]
async fn raw_client_is_byte_exact() {
    let redis = Redis::start();
    let mut raw = Raw::connect(redis.port()).await;

    // A value containing CRLF must come back verbatim inside the bulk.
    raw.send(&cmd(&[b"SET", b"k", b"a\r\nb"])).await;
    raw.expect(b"+OK\r\n").await;
    assert_eq!(raw.call(&[b"GET", b"k"]).await, b"$4\r\na\r\nb\r\n");
    assert_eq!(raw.call(&[b"GET", b"nope"]).await, b"$-1\r\n");

    // A pipeline in one write: replies come back split exactly per frame.
    let mut pipeline = cmd(&[b"RPUSH", b"l", b"x", b"y"]);
    pipeline.extend(cmd(&[b"LRANGE", b"l", b"0", b"-1"]));
    pipeline.extend(cmd(&[b"INCR", b"k"]));
    raw.send(&pipeline).await;
    let replies = raw.read_replies(3).await;
    assert_eq!(replies[0], b":2\r\n");
    assert_eq!(replies[1], b"*2\r\n$1\r\nx\r\n$1\r\ny\r\n");
    assert!(replies[2].starts_with(b"-ERR"), "{}", esc(&replies[2]));

    raw.send(&cmd(&[b"ECHO", b"hello"])).await;
    assert_eq!(raw.read_exact_n(4).await, b"$5\r\n");
    raw.expect(b"hello\r\n").await;

    // RESP3: HELLO answers with a map, nulls become `_`.
    let hello = raw.call(&[b"HELLO", b"3"]).await;
    assert!(hello.starts_with(b"%"), "{}", esc(&hello));
    assert_eq!(raw.call(&[b"GET", b"nope"]).await, b"_\r\n");
    assert!(raw.buffered().is_empty());

    raw.send(&cmd(&[b"QUIT"])).await;
    assert_eq!(raw.read_to_close().await, b"+OK\r\n");

    let mut other = Raw::connect(redis.port()).await;
    assert!(
        !other.is_closed_within(Duration::from_millis(100)).await,
        "idle connection should stay open"
    );
    other.send(&cmd(&[b"QUIT"])).await;
    assert!(other.is_closed().await);
    assert_eq!(other.buffered(), b"+OK\r\n");
}

#[tokio::test]
#[should_panic(expected = "wire bytes differ at offset 2")]
async fn raw_expect_reports_mismatch() {
    let redis = Redis::start();
    let mut raw = Raw::connect(redis.port()).await;
    raw.send(&cmd(&[b"PING"])).await;
    raw.expect(b"+PING\r\n").await;
}

#[tokio::test]
async fn fred_clients_set_and_get() {
    let redis = Redis::start();
    let c2 = client(redis.port()).await;
    let _: () = c2.set("k", "v", None, None, false).await.unwrap();
    let v: String = c2.get("k").await.unwrap();
    assert_eq!(v, "v");

    let c3 = client_resp3(redis.port()).await;
    let v: Option<String> = c3.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    let none: Option<String> = c3.get("missing").await.unwrap();
    assert_eq!(none, None);

    c2.quit().await.unwrap();
    c3.quit().await.unwrap();
}

#[tokio::test]
async fn fred_client_auth() {
    let redis = Redis::start_with(&["--requirepass", "secret"]);
    let c = client_auth(redis.port(), "secret").await;
    let pong: String = c.ping(None).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(try_client(redis.port(), RespVersion::RESP2, Some("wrong"))
        .await
        .is_err());
}

#[tokio::test]
async fn wait_until_polls_until_true() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    wait_until("the third poll", Duration::from_secs(5), move || {
        let c = c.clone();
        async move { c.fetch_add(1, Ordering::SeqCst) >= 2 }
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
#[should_panic(expected = "waiting until never")]
async fn wait_until_panics_at_deadline() {
    wait_until("never", Duration::from_millis(100), || async { false }).await;
}

/// Serve one canned HTTP response on a fresh port and return the port and
/// the request the client sent (once the server thread is joined).
fn one_shot_http(response: &'static [u8]) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut chunk = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed before finishing its request");
            req.extend_from_slice(&chunk[..n]);
        }
        s.write_all(response).unwrap();
        req
    });
    (port, handle)
}

#[test]
fn http_get_reads_length_and_chunked_bodies() {
    let (port, server) =
        one_shot_http(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    assert_eq!(http_get(port, "/healthz"), (200, "hello".to_string()));
    let req = String::from_utf8(server.join().unwrap()).unwrap();
    assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
    assert!(req.contains("Connection: close\r\n"), "{req}");

    let (port, server) = one_shot_http(
        b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n",
    );
    assert_eq!(http_get(port, "/readyz"), (503, "not ready".to_string()));
    server.join().unwrap();
}

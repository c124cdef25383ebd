//! Byte-exact protocol conformance through keyward: what a client sees on the
//! wire for ordinary commands, binary and very large values, the HELLO / AUTH
//! handshake, inline commands, malformed input, deep pipelines and many
//! concurrent clients, plus the `--check-config` command line.
//!
//! Where the right answer is "whatever Redis says", the test sends the same
//! bytes straight to the upstream redis-server and compares, so the oracle is
//! the real server rather than a transcription of it. Every test starts its
//! own redis-server and keyward.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use fred::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection must stay silent (and open) to count as "no reply":
/// only used where the correct behaviour is the absence of a reply.
const QUIET: Duration = Duration::from_millis(500);

/// Start a redis-server and a keyward in front of it, and wait until keyward
/// reports ready (`GET /ready` is 200: upstream connected, command table
/// loaded). Until then keyward fails requests fast by design, so a test that
/// raced ahead would be testing start-up, not the protocol.
async fn setup() -> (Redis, Keyward) {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    wait_ready(&kw, DEADLINE).await;
    (redis, kw)
}

/// A RESP integer.
fn int(n: i64) -> Vec<u8> {
    format!(":{n}\r\n").into_bytes()
}

/// A RESP2 array of bulk strings.
fn bulk_array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for i in items {
        out.extend(bulk(i));
    }
    out
}

/// `n` bytes of a deterministic pattern that includes CR, LF and NUL, so a
/// proxy that treats values as text or scans them for line ends would break.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed as usize) % 251) as u8)
        .collect()
}

/// Compare two possibly huge byte strings without dumping them into the
/// failure message: report lengths and the first differing offset.
fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let lo = at.saturating_sub(16);
    panic!(
        "{what}: {} bytes received, {} expected; first difference at offset {at}\n  expected: \"{}\"\n       got: \"{}\"",
        got.len(),
        want.len(),
        esc(&want[lo..want.len().min(at + 48)]),
        esc(&got[lo..got.len().min(at + 48)]),
    );
}

/// Replace the value of the `id` field in a HELLO reply (RESP2 array or
/// RESP3 map) with `:N`: the client id is per connection and legitimately
/// differs between keyward and a direct connection.
fn normalise_hello_id(reply: &[u8]) -> Vec<u8> {
    let key = b"$2\r\nid\r\n:";
    let Some(start) = reply.windows(key.len()).position(|w| w == key) else {
        return reply.to_vec();
    };
    let digits = start + key.len();
    let end = digits
        + reply[digits..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("id value ends with CRLF");
    let mut out = reply[..digits].to_vec();
    out.push(b'N');
    out.extend_from_slice(&reply[end..]);
    out
}

/// Write `request` and read exactly `n` reply frames on a fresh connection to
/// `port`, reading while writing (a deep pipeline's replies can outgrow the
/// socket buffers before the last request is written). Fails if no progress
/// is made for [`DEADLINE`] or if bytes follow the `n`th reply.
async fn exchange(port: u16, request: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = stream.split();
    let write = async {
        tokio::time::timeout(DEADLINE * 6, wr.write_all(request))
            .await
            .expect("writing the pipeline timed out")
            .expect("writing the pipeline failed");
    };
    let read = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = 0;
        let mut frames = Vec::with_capacity(n);
        let mut chunk = vec![0u8; 64 * 1024];
        while frames.len() < n {
            match frame_len(&buf[pos..]) {
                Ok(Some(len)) => {
                    frames.push(buf[pos..pos + len].to_vec());
                    pos += len;
                    continue;
                }
                Ok(None) => {}
                Err(e) => panic!(
                    "127.0.0.1:{port}: invalid RESP after {} replies: {e}",
                    frames.len()
                ),
            }
            let k = match tokio::time::timeout(DEADLINE, rd.read(&mut chunk)).await {
                Err(_) => panic!(
                    "127.0.0.1:{port}: no reply bytes for {DEADLINE:?} after {} of {n} replies; pending: \"{}\"",
                    frames.len(),
                    esc(&buf[pos..buf.len().min(pos + 200)])
                ),
                Ok(Err(e)) => panic!("127.0.0.1:{port}: read failed after {} replies: {e}", frames.len()),
                Ok(Ok(k)) => k,
            };
            if k == 0 {
                panic!(
                    "127.0.0.1:{port}: connection closed after {} of {n} replies",
                    frames.len()
                );
            }
            buf.extend_from_slice(&chunk[..k]);
        }
        assert_eq!(
            pos,
            buf.len(),
            "127.0.0.1:{port}: unexpected bytes after {n} replies: \"{}\"",
            esc(&buf[pos..buf.len().min(pos + 200)])
        );
        frames
    };
    let ((), frames) = tokio::join!(write, read);
    frames
}

// ---------------------------------------------------------------------------
// Ordinary commands and values
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_commands_and_binary_values_are_byte_exact() {
    let (_redis, kw) = setup().await;
    let mut c = Raw::connect(kw.port()).await;

    let crlf_nul: &[u8] = b"a\r\nb\0c\r\n\0";
    let table: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (cmd(&[b"PING"]), b"+PONG\r\n".to_vec()),
        (cmd(&[b"PING", b"hi there"]), b"$8\r\nhi there\r\n".to_vec()),
        (cmd(&[b"SET", b"k", b"v"]), b"+OK\r\n".to_vec()),
        (cmd(&[b"GET", b"k"]), b"$1\r\nv\r\n".to_vec()),
        (cmd(&[b"GET", b"missing"]), b"$-1\r\n".to_vec()),
        // A value with CRLF and NUL inside must be opaque to the proxy.
        (cmd(&[b"SET", b"bin", crlf_nul]), b"+OK\r\n".to_vec()),
        (cmd(&[b"GET", b"bin"]), bulk(crlf_nul)),
        (cmd(&[b"STRLEN", b"bin"]), int(crlf_nul.len() as i64)),
        // ...and so must a key.
        (cmd(&[b"SET", b"k\r\n\0ey", b"x"]), b"+OK\r\n".to_vec()),
        (cmd(&[b"GET", b"k\r\n\0ey"]), b"$1\r\nx\r\n".to_vec()),
        (cmd(&[b"SET", b"empty", b""]), b"+OK\r\n".to_vec()),
        (cmd(&[b"GET", b"empty"]), b"$0\r\n\r\n".to_vec()),
        (cmd(&[b"INCR", b"n"]), b":1\r\n".to_vec()),
        (
            cmd(&[b"INCR", b"k"]),
            b"-ERR value is not an integer or out of range\r\n".to_vec(),
        ),
    ];
    for (req, want) in &table {
        c.send(req).await;
        let got = c.read_reply().await;
        assert_eq!(
            esc(&got),
            esc(want),
            "reply to {} through keyward",
            esc(req)
        );
    }
    assert!(
        c.buffered().is_empty(),
        "stray bytes: {}",
        esc(c.buffered())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_1mib_and_64mib_values_round_trip() {
    let (_redis, kw) = setup().await;
    let mut c = Raw::connect(kw.port()).await;

    for (i, size) in [0usize, 1 << 20, 64 << 20].into_iter().enumerate() {
        let key = format!("big:{size}");
        let value = pattern(size, i as u8);
        c.send(&cmd(&[b"SET", key.as_bytes(), &value])).await;
        c.expect(b"+OK\r\n").await;
        let got = c.call(&[b"GET", key.as_bytes()]).await;
        assert_same_bytes(&format!("GET of a {size}-byte value"), &got, &bulk(&value));
        assert_eq!(
            c.call(&[b"STRLEN", key.as_bytes()]).await,
            int(size as i64),
            "STRLEN of the {size}-byte value"
        );
    }

    // The same 1 MiB value as an application sees it through fred.
    let f = client(kw.port()).await;
    let value = pattern(1 << 20, 7);
    let _: () = f
        .set("fred:big", value.as_slice(), None, None, false)
        .await
        .expect("fred SET 1 MiB");
    let back: Vec<u8> = f.get("fred:big").await.expect("fred GET 1 MiB");
    assert_same_bytes("fred GET of a 1 MiB value", &back, &value);
    let empty: Vec<u8> = {
        let _: () = f
            .set("fred:empty", "", None, None, false)
            .await
            .expect("fred SET empty");
        f.get("fred:empty").await.expect("fred GET empty")
    };
    assert!(empty.is_empty());
}

// ---------------------------------------------------------------------------
// HELLO and AUTH, compared with the real server
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_matches_redis() {
    let (redis, kw) = setup().await;

    // (request, expected first byte of the reply, or the exact reply)
    let ok_cases: &[(&[&[u8]], u8)] = &[
        (&[b"HELLO"], b'*'),
        (&[b"HELLO", b"2"], b'*'),
        (&[b"HELLO", b"3"], b'%'),
    ];
    for (req, kind) in ok_cases {
        let mut direct = Raw::connect(redis.port()).await;
        let mut proxied = Raw::connect(kw.port()).await;
        let want = direct.call(req).await;
        let got = proxied.call(req).await;
        assert_eq!(
            got.first(),
            Some(kind),
            "{:?}: reply type: {}",
            esc(&cmd(req)),
            esc(&got)
        );
        assert_eq!(
            esc(&normalise_hello_id(&got)),
            esc(&normalise_hello_id(&want)),
            "{}: keyward vs redis (id normalised)",
            esc(&cmd(req))
        );
        // The connection is usable afterwards, in the negotiated protocol.
        assert_eq!(proxied.call(&[b"PING"]).await, b"+PONG\r\n");
        let null: &[u8] = if *kind == b'%' { b"_\r\n" } else { b"$-1\r\n" };
        assert_eq!(proxied.call(&[b"GET", b"nope"]).await, null);
    }

    let err_cases: &[(&[&[u8]], &[u8])] = &[
        (
            &[b"HELLO", b"4"],
            b"-NOPROTO unsupported protocol version\r\n",
        ),
        (
            &[b"HELLO", b"x"],
            b"-ERR Protocol version is not an integer or out of range\r\n",
        ),
        // The option as sent (not made UTF-8), line breaks as spaces.
        (
            &[b"HELLO", b"3", b"\xc9\xfa"],
            b"-ERR Syntax error in HELLO option '\xc9\xfa'\r\n",
        ),
        (
            &[b"HELLO", b"3", b"a\r\nb"],
            b"-ERR Syntax error in HELLO option 'a  b'\r\n",
        ),
        // A command name with a NUL: Redis's text, cut at the NULs.
        (
            &[b"GE\0T", b"k\xff\0x", b"\r\n"],
            b"-ERR unknown command 'GE', with args beginning with: 'k\xff' '  ' \r\n",
        ),
    ];
    for (req, want) in err_cases {
        let mut direct = Raw::connect(redis.port()).await;
        let mut proxied = Raw::connect(kw.port()).await;
        let from_redis = direct.call(req).await;
        let got = proxied.call(req).await;
        assert_eq!(esc(&got), esc(want), "{} through keyward", esc(&cmd(req)));
        assert_eq!(
            esc(&got),
            esc(&from_redis),
            "{}: keyward vs redis",
            esc(&cmd(req))
        );
        // A refused HELLO leaves the connection in RESP2 and open.
        assert_eq!(proxied.call(&[b"GET", b"nope"]).await, b"$-1\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_replies_after_hello_3() {
    let (redis, kw) = setup().await;
    let mut setup_c = Raw::connect(kw.port()).await;
    assert_eq!(setup_c.call(&[b"HSET", b"h", b"f", b"v"]).await, b":1\r\n");
    assert_eq!(setup_c.call(&[b"SADD", b"s", b"m"]).await, b":1\r\n");

    let table: &[(&[&[u8]], &[u8])] = &[
        (&[b"HGETALL", b"h"], b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"),
        (&[b"SMEMBERS", b"s"], b"~1\r\n$1\r\nm\r\n"),
        (&[b"GET", b"missing"], b"_\r\n"),
        (&[b"HGETALL", b"missing"], b"%0\r\n"),
    ];
    let mut direct = Raw::connect(redis.port()).await;
    let mut proxied = Raw::connect(kw.port()).await;
    assert!(direct.call(&[b"HELLO", b"3"]).await.starts_with(b"%7\r\n"));
    let hello = proxied.call(&[b"HELLO", b"3"]).await;
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 through keyward: {}",
        esc(&hello)
    );
    for (req, want) in table {
        let got = proxied.call(req).await;
        assert_eq!(
            esc(&got),
            esc(want),
            "{} in RESP3 through keyward",
            esc(&cmd(req))
        );
        assert_eq!(esc(&got), esc(&direct.call(req).await), "keyward vs redis");
    }

    // Back to RESP2 on the same connection: arrays and `$-1` again.
    let hello2 = proxied.call(&[b"HELLO", b"2"]).await;
    assert!(hello2.starts_with(b"*14\r\n"), "HELLO 2: {}", esc(&hello2));
    assert_eq!(
        proxied.call(&[b"HGETALL", b"h"]).await,
        b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(proxied.call(&[b"GET", b"missing"]).await, b"$-1\r\n");

    // The same through a RESP3 fred client.
    let f = client_resp3(kw.port()).await;
    let map: HashMap<String, String> = f.hgetall("h").await.expect("fred HGETALL");
    assert_eq!(map, HashMap::from([("f".to_string(), "v".to_string())]));
    let set: HashSet<String> = f.smembers("s").await.expect("fred SMEMBERS");
    assert_eq!(set, HashSet::from(["m".to_string()]));
    let none: Option<String> = f.get("missing").await.expect("fred GET missing");
    assert_eq!(none, None);
    let _: () = f
        .set("r3", "val", None, None, false)
        .await
        .expect("fred SET");
    let v: Option<String> = f.get("r3").await.expect("fred GET");
    assert_eq!(v.as_deref(), Some("val"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_without_a_password_matches_redis() {
    let (redis, kw) = setup().await;
    let table: &[(&[&[u8]], &[u8])] = &[
        (
            &[b"AUTH", b"x"],
            b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n",
        ),
        (&[b"AUTH", b"default", b"x"], b"+OK\r\n"),
        (
            &[b"AUTH", b"foo", b"x"],
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ),
    ];
    let mut direct = Raw::connect(redis.port()).await;
    let mut proxied = Raw::connect(kw.port()).await;
    for (req, want) in table {
        let from_redis = direct.call(req).await;
        assert_eq!(
            esc(&from_redis),
            esc(want),
            "redis itself: {}",
            esc(&cmd(req))
        );
        let got = proxied.call(req).await;
        assert_eq!(esc(&got), esc(want), "{} through keyward", esc(&cmd(req)));
        // Whatever the outcome, the connection keeps serving.
        assert_eq!(proxied.call(&[b"PING"]).await, b"+PONG\r\n");
    }
}

// ---------------------------------------------------------------------------
// Inline commands and malformed input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands() {
    let (redis, kw) = setup().await;
    let table: &[(&[u8], &[u8])] = &[
        (b"PING\r\n", b"+PONG\r\n"),
        (b"SET k \"a b\"\r\n", b"+OK\r\n"),
        (b"GET k\r\n", b"$3\r\na b\r\n"),
        // A bare LF ends an inline command too; single quotes group.
        (b"ECHO 'x'\n", b"$1\r\nx\r\n"),
        (b"ECHO \"a\\r\\nb\"\r\n", b"$4\r\na\r\nb\r\n"),
        (b"  GET   k  \r\n", b"$3\r\na b\r\n"),
        // An empty line is skipped without a reply: the next reply is PING's.
        (b"\r\nPING\r\n", b"+PONG\r\n"),
    ];
    let mut direct = Raw::connect(redis.port()).await;
    let mut proxied = Raw::connect(kw.port()).await;
    for (req, want) in table {
        proxied.send(req).await;
        let got = proxied.read_reply().await;
        assert_eq!(esc(&got), esc(want), "inline {} through keyward", esc(req));
        direct.send(req).await;
        assert_eq!(
            esc(&direct.read_reply().await),
            esc(want),
            "inline {} on redis",
            esc(req)
        );
    }
    assert!(
        proxied.buffered().is_empty(),
        "stray: {}",
        esc(proxied.buffered())
    );
}

/// Malformed requests: each gets one exact error reply, then keyward closes
/// that connection (as Redis does) and nobody else notices.
/// A replication stream is not RESP: keyward refuses SYNC/PSYNC with an
/// error instead of letting it wreck a shared upstream connection, and the
/// client and everyone else carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_commands_are_refused_without_harm() {
    let (_redis, kw) = setup().await;
    let mut raw = Raw::connect(kw.port()).await;
    // REPLCONF ACK and GETACK get no reply from Redis at all: forwarded,
    // the next client's reply would be taken as theirs.
    for req in [
        cmd(&[b"SYNC"]),
        cmd(&[b"PSYNC", b"?", b"-1"]),
        cmd(&[b"REPLCONF", b"ACK", b"1"]),
        cmd(&[b"REPLCONF", b"GETACK", b"*"]),
        cmd(&[b"replconf", b"listening-port", b"7000"]),
    ] {
        raw.send(&req).await;
        raw.expect(
            b"-ERR keyward does not forward SYNC/PSYNC/REPLCONF; connect replicas to Redis directly\r\n",
        )
        .await;
    }
    assert_eq!(
        esc(&raw.call(&[b"SET", b"after", b"sync"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(
        esc(&raw.call(&[b"GET", b"after"]).await),
        esc(b"$4\r\nsync\r\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_an_error_and_close_only_that_connection() {
    let (redis, kw) = setup().await;

    // A client connected before any of the bad ones; it must keep working.
    let mut survivor = Raw::connect(kw.port()).await;
    assert_eq!(
        survivor.call(&[b"SET", b"survivor", b"alive"]).await,
        b"+OK\r\n"
    );

    let mut too_big_inline = vec![b'A'; 64 * 1024 + 1];
    too_big_inline[0] = b'G';

    // (case, request bytes, exact reply, does redis-server itself agree?)
    // Redis 7.0 does not check the two bytes after a bulk (it skips them),
    // so for the missing-CRLF case keyward is stricter than Redis on purpose
    // and the expected bytes come from keyward's specification alone.
    let table: Vec<(&str, Vec<u8>, &[u8], bool)> = vec![
        (
            "non-numeric multibulk length",
            b"*x\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            "array element is not a bulk",
            b"*1\r\nx\r\n".to_vec(),
            b"-ERR Protocol error: expected '$', got 'x'\r\n",
            true,
        ),
        (
            "negative bulk length",
            b"*1\r\n$-5\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            "bulk length beyond proto-max-bulk-len",
            b"*1\r\n$999999999999\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            "bulk not followed by CRLF",
            b"*1\r\n$4\r\nPINGxx".to_vec(),
            b"-ERR Protocol error: expected CRLF after bulk\r\n",
            false,
        ),
        (
            "unbalanced quotes in an inline command",
            b"GET \"a\r\n".to_vec(),
            b"-ERR Protocol error: unbalanced quotes in request\r\n",
            true,
        ),
        (
            "inline request over 64 KiB without a newline",
            too_big_inline,
            b"-ERR Protocol error: too big inline request\r\n",
            true,
        ),
        // Lengths and line ends Redis's parser (string2ll, lines ended by
        // the first \r) rejects: were any of these forwarded, Redis would
        // drop the shared connection and every client's requests on it.
        (
            "multibulk length with a leading zero",
            b"*01\r\n$4\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            "negative zero multibulk length",
            b"*-0\r\n*1\r\n$4\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            "multibulk length with a plus sign",
            b"*+1\r\n$4\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            "bulk length with a leading zero",
            b"*1\r\n$04\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            "negative zero bulk length",
            b"*1\r\n$-0\r\n\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            "bulk length -00",
            b"*1\r\n$-00\r\n\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
        (
            "multibulk length ended by a bare newline",
            b"*1\n$4\r\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid multibulk length\r\n",
            true,
        ),
        (
            "bulk length ended by a bare newline",
            b"*1\r\n$4\nPING\r\n".to_vec(),
            b"-ERR Protocol error: invalid bulk length\r\n",
            true,
        ),
    ];

    for (case, req, want, redis_agrees) in &table {
        let mut bad = Raw::connect(kw.port()).await;
        bad.send(req).await;
        let got = bad.read_to_close().await;
        assert_eq!(
            esc(&got),
            esc(want),
            "{case}: keyward must reply exactly this and then close the connection"
        );
        if *redis_agrees {
            let mut direct = Raw::connect(redis.port()).await;
            direct.send(req).await;
            assert_eq!(
                esc(&direct.read_to_close().await),
                esc(want),
                "{case}: redis-server itself"
            );
        }
        assert_eq!(
            survivor.call(&[b"PING"]).await,
            b"+PONG\r\n",
            "after {case}: another client's PING"
        );
        assert_eq!(
            survivor.call(&[b"GET", b"survivor"]).await,
            b"$5\r\nalive\r\n",
            "after {case}: another client's GET"
        );
    }

    // The error reply comes after the replies to the good requests before it.
    let mut mixed = Raw::connect(kw.port()).await;
    mixed.send(b"*1\r\n$4\r\nPING\r\n*x\r\n").await;
    assert_eq!(
        esc(&mixed.read_to_close().await),
        esc(b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n")
    );
}

/// A NUL inside an inline command name: keyward must do what redis-server
/// does with the same bytes. (Redis 7.0 looks for the end of an inline line
/// with strchr, which stops at the NUL, so it waits for a newline it never
/// sees: no reply, connection open. Other versions may differ, which is why
/// this is compared rather than hard-coded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_an_inline_command_matches_redis() {
    let (redis, kw) = setup().await;
    let mut survivor = Raw::connect(kw.port()).await;
    assert_eq!(
        survivor.call(&[b"SET", b"survivor", b"alive"]).await,
        b"+OK\r\n"
    );

    let req: &[u8] = b"PI\0NG\r\n";
    let mut direct = Raw::connect(redis.port()).await;
    let mut proxied = Raw::connect(kw.port()).await;
    let rss_before = kw.rss_kib();
    direct.send(req).await;
    proxied.send(req).await;
    let direct_closed = direct.is_closed_within(QUIET).await;
    let proxied_closed = proxied.is_closed_within(QUIET).await;
    // Checked first and at once: a proxy that spins on this input can eat
    // gigabytes within seconds, and panicking here kills it (on drop).
    let rss_after = kw.rss_kib();
    assert!(
        rss_after < rss_before + 100 * 1024,
        "keyward's resident memory grew from {rss_before} KiB to {rss_after} KiB within {QUIET:?} of receiving {}",
        esc(req)
    );
    assert_eq!(
        esc(proxied.buffered()),
        esc(direct.buffered()),
        "reply to {} : keyward vs redis",
        esc(req)
    );
    assert_eq!(
        proxied_closed,
        direct_closed,
        "connection closed after {}: keyward vs redis",
        esc(req)
    );
    assert!(!proxied_closed, "the connection must stay open");
    assert_eq!(survivor.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_eq!(
        survivor.call(&[b"GET", b"survivor"]).await,
        b"$5\r\nalive\r\n"
    );
}

// ---------------------------------------------------------------------------
// Pipelining and concurrency
// ---------------------------------------------------------------------------

/// Deterministic xorshift64* so the pipeline is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// A value of a varied size (mostly small, sometimes tens of KiB).
    fn value(&mut self, max_small: bool) -> Vec<u8> {
        const SIZES: [usize; 10] = [0, 1, 3, 10, 50, 200, 1000, 4000, 16_000, 40_000];
        let sizes = if max_small { &SIZES[..6] } else { &SIZES[..] };
        // Larger sizes are rarer: pick twice and keep the smaller index.
        let i = self.below(sizes.len()).min(self.below(sizes.len()));
        let seed = self.next() as u8;
        pattern(sizes[i], seed)
    }
}

/// The keyspace as the pipeline leaves it, to compute expected replies.
enum Val {
    Str(Vec<u8>),
    /// Head first, as LPUSH builds it.
    List(Vec<Vec<u8>>),
    Hash(HashMap<Vec<u8>, Vec<u8>>),
}

/// Build `n` mixed commands and the exact reply each must get on an empty
/// keyspace. Key families are disjoint by type so no WRONGTYPE arises.
fn mixed_pipeline(n: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut db: HashMap<Vec<u8>, Val> = HashMap::new();
    let mut wire = Vec::new();
    let mut expected = Vec::with_capacity(n);
    let any_key = |rng: &mut Rng| -> Vec<u8> {
        match rng.below(4) {
            0 => format!("s:{}", rng.below(40)),
            1 => format!("c:{}", rng.below(8)),
            2 => format!("l:{}", rng.below(5)),
            _ => format!("h:{}", rng.below(5)),
        }
        .into_bytes()
    };
    for _ in 0..n {
        let (args, reply): (Vec<Vec<u8>>, Vec<u8>) = match rng.below(11) {
            0 => {
                let k = format!("s:{}", rng.below(40)).into_bytes();
                let v = rng.value(false);
                db.insert(k.clone(), Val::Str(v.clone()));
                (vec![b"SET".to_vec(), k, v], b"+OK\r\n".to_vec())
            }
            1 => {
                let k = if rng.below(2) == 0 {
                    format!("s:{}", rng.below(40))
                } else {
                    format!("c:{}", rng.below(8))
                }
                .into_bytes();
                let r = match db.get(&k) {
                    Some(Val::Str(v)) => bulk(v),
                    None => b"$-1\r\n".to_vec(),
                    _ => unreachable!("GET only touches string keys"),
                };
                (vec![b"GET".to_vec(), k], r)
            }
            2 => {
                let k = format!("c:{}", rng.below(8)).into_bytes();
                let next = match db.get(&k) {
                    Some(Val::Str(v)) => {
                        std::str::from_utf8(v).unwrap().parse::<i64>().unwrap() + 1
                    }
                    None => 1,
                    _ => unreachable!("counters are strings"),
                };
                db.insert(k.clone(), Val::Str(next.to_string().into_bytes()));
                (vec![b"INCR".to_vec(), k], int(next))
            }
            3 => {
                let k = format!("l:{}", rng.below(5)).into_bytes();
                let v = rng.value(true);
                let list = match db.entry(k.clone()).or_insert_with(|| Val::List(Vec::new())) {
                    Val::List(l) => l,
                    _ => unreachable!("l: keys are lists"),
                };
                list.insert(0, v.clone());
                let len = list.len() as i64;
                (vec![b"LPUSH".to_vec(), k, v], int(len))
            }
            4 => {
                let k = format!("l:{}", rng.below(5)).into_bytes();
                let items: Vec<Vec<u8>> = match db.get(&k) {
                    Some(Val::List(l)) => l.iter().take(10).cloned().collect(),
                    None => Vec::new(),
                    _ => unreachable!("l: keys are lists"),
                };
                (
                    vec![b"LRANGE".to_vec(), k, b"0".to_vec(), b"9".to_vec()],
                    bulk_array(&items),
                )
            }
            5 => {
                let k = format!("h:{}", rng.below(5)).into_bytes();
                let f = format!("f{}", rng.below(12)).into_bytes();
                let v = rng.value(false);
                let h = match db
                    .entry(k.clone())
                    .or_insert_with(|| Val::Hash(HashMap::new()))
                {
                    Val::Hash(h) => h,
                    _ => unreachable!("h: keys are hashes"),
                };
                let added = h.insert(f.clone(), v.clone()).is_none();
                (vec![b"HSET".to_vec(), k, f, v], int(added as i64))
            }
            6 => {
                let k = format!("h:{}", rng.below(5)).into_bytes();
                let f = format!("f{}", rng.below(12)).into_bytes();
                let r = match db.get(&k) {
                    Some(Val::Hash(h)) => h.get(&f).map_or(b"$-1\r\n".to_vec(), |v| bulk(v)),
                    None => b"$-1\r\n".to_vec(),
                    _ => unreachable!("h: keys are hashes"),
                };
                (vec![b"HGET".to_vec(), k, f], r)
            }
            7 => {
                let k = any_key(&mut rng);
                let existed = db.remove(&k).is_some();
                (vec![b"DEL".to_vec(), k], int(existed as i64))
            }
            8 => {
                let k = any_key(&mut rng);
                let exists = db.contains_key(&k);
                (vec![b"EXISTS".to_vec(), k], int(exists as i64))
            }
            9 => (vec![b"PING".to_vec()], b"+PONG\r\n".to_vec()),
            _ => {
                let v = rng.value(false);
                (vec![b"ECHO".to_vec(), v.clone()], bulk(&v))
            }
        };
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        wire.extend(cmd(&refs));
        expected.push(reply);
    }
    (wire, expected)
}

fn compare_replies(who: &str, got: &[Vec<u8>], want: &[Vec<u8>]) {
    assert_eq!(got.len(), want.len(), "{who}: number of replies");
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let show = |b: &[u8]| esc(&b[..b.len().min(200)]);
        panic!(
            "{who}: reply #{i} differs\n  expected: \"{}\" ({} bytes)\n       got: \"{}\" ({} bytes)",
            show(&want[i]),
            want[i].len(),
            show(&got[i]),
            got[i].len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_10000_mixed_commands() {
    let (redis, kw) = setup().await;
    const N: usize = 10_000;
    let (wire, expected) = mixed_pipeline(N);

    let through_keyward = exchange(kw.port(), &wire, N).await;
    compare_replies("through keyward", &through_keyward, &expected);

    // The same bytes straight to redis on a fresh keyspace give the same
    // bytes back: checks the local model as much as the proxy.
    assert_eq!(redis.call(&[b"FLUSHALL"]), b"+OK\r\n");
    let direct = exchange(redis.port(), &wire, N).await;
    compare_replies("direct to redis", &direct, &expected);
    compare_replies("keyward vs redis", &through_keyward, &direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_clients() {
    let (_redis, kw) = setup().await;
    const CLIENTS: usize = 1000;
    const OPS: usize = 20;

    // Every connection is open before any of them starts working, so all
    // 1,000 are connected to keyward at the same time.
    let mut conns = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        conns.push(Raw::connect(kw.port()).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (id, mut c) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            for i in 0..OPS {
                let key = format!("client:{id}:key:{}", i % 5);
                let value = format!("value-{id}-{i}-{}", "x".repeat((id * 7 + i) % 300));
                let set = c.call(&[b"SET", key.as_bytes(), value.as_bytes()]).await;
                assert_eq!(esc(&set), "+OK\\r\\n", "client {id} op {i}: SET {key}");
                let got = c.call(&[b"GET", key.as_bytes()]).await;
                assert_eq!(
                    esc(&got),
                    esc(&bulk(value.as_bytes())),
                    "client {id} op {i}: GET {key}"
                );
            }
            id
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(_) => done += 1,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("client task failed: {e}"),
        }
    }
    assert_eq!(done, CLIENTS);

    // Each client's last write per key is what a fresh client reads back.
    let mut check = Raw::connect(kw.port()).await;
    for id in [0usize, 499, 999] {
        let i = OPS - 1;
        let key = format!("client:{id}:key:{}", i % 5);
        let value = format!("value-{id}-{i}-{}", "x".repeat((id * 7 + i) % 300));
        assert_eq!(
            esc(&check.call(&[b"GET", key.as_bytes()]).await),
            esc(&bulk(value.as_bytes()))
        );
    }
}

// ---------------------------------------------------------------------------
// Command line: --check-config
// ---------------------------------------------------------------------------

/// Run the keyward binary with `args` and no Redis anywhere; it must exit by
/// itself within [`DEADLINE`] (it is killed and the test fails otherwise).
fn run_keyward(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn keyward");
    let pid = child.id();
    // wait_with_output drains both pipes; a watchdog thread kills the child
    // if it does not exit in time (e.g. it started serving instead).
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(DEADLINE).is_err() {
            send_signal(pid, "KILL");
            return true;
        }
        false
    });
    let out = child.wait_with_output().expect("wait for keyward");
    let _ = tx.send(());
    let killed = watchdog.join().unwrap();
    assert!(
        !killed,
        "keyward {args:?} did not exit within {DEADLINE:?}; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn check_config_prints_the_effective_config_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:1111\"\nmax_clients = 77\n\n\
         [upstream]\npool_size = 4\npassword = \"hunter2\"\n",
    )
    .unwrap();
    let out = run_keyward(&[
        "--config".as_ref(),
        path.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:7001".as_ref(),
        "--upstream".as_ref(),
        "redis.example:6390".as_ref(),
        "--check-config".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit status; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let cfg: toml::Table = stdout
        .parse()
        .unwrap_or_else(|e| panic!("--check-config output is not TOML ({e}):\n{stdout}"));
    let get = |section: &str, key: &str| -> toml::Value {
        cfg.get(section)
            .and_then(|s| s.get(key))
            .cloned()
            .unwrap_or_else(|| panic!("{section}.{key} missing from:\n{stdout}"))
    };
    // Command-line flags win over the file; the file wins over defaults.
    assert_eq!(get("server", "listen").as_str(), Some("127.0.0.1:7001"));
    assert_eq!(
        get("upstream", "address").as_str(),
        Some("redis.example:6390")
    );
    assert_eq!(get("server", "max_clients").as_integer(), Some(77));
    assert_eq!(get("upstream", "pool_size").as_integer(), Some(4));
    // Untouched keys show their defaults (from config/keyward.toml).
    assert_eq!(
        get("server", "max_bulk_bytes").as_integer(),
        Some(536_870_912)
    );
    assert_eq!(
        get("upstream", "command_timeout_ms").as_integer(),
        Some(5000)
    );
    assert_eq!(get("log", "format").as_str(), Some("json"));
    assert!(
        !stdout.contains("hunter2"),
        "the upstream password must not be printed:\n{stdout}"
    );

    // With no file at all, the defaults are valid too.
    let out = run_keyward(&["--check-config".as_ref()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "defaults: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    assert_eq!(
        cfg["server"]["listen"].as_str(),
        Some("127.0.0.1:6380"),
        "default listen address"
    );
}

#[test]
fn bad_config_exits_2_naming_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.toml");
    std::fs::write(
        &path,
        "[server]\nmax_clientz = 5\n\n[upstream]\npool_size = \"lots\"\n",
    )
    .unwrap();
    for extra in [&["--check-config"][..], &[][..]] {
        let mut args = vec!["--config".as_ref(), path.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let out = run_keyward(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "args {extra:?}: exit status; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains("server.max_clientz"),
            "args {extra:?}: the unknown key is not named:\n{stderr}"
        );
        assert!(
            stderr.contains("upstream.pool_size"),
            "args {extra:?}: the bad value is not named:\n{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "args {extra:?}: nothing on stdout for an invalid config, got:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

//! What an operator sees of keyward itself: `INFO` with a `# Keyward`
//! section, `KEYWARD SLOWLOG`, `KEYWARD CLIENTS`, `KEYWARD CONFIG GET`, the
//! admin endpoints `/health`, `/ready`, `/stats`, `/clients`, `/log-level`
//! and `/metrics`, the JSON (or text) log lines for keyward's own error
//! replies, and the failover timeline in `/topology` after a Sentinel
//! failover.
//!
//! Every test runs its own redis-server and keyward and asserts what a user
//! would read: reply bytes, parsed values, JSON fields, metric samples.
//! Counters are compared as deltas and polled with a deadline, because a
//! request is recorded just after its reply is written.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// A polling deadline: `tick` sleeps one poll interval, or panics naming
/// what was awaited and the last state seen once the deadline has passed.
/// For waits whose condition needs `&mut` state (a connection, the last
/// reply), which `wait_until`'s closure cannot lend out.
struct Deadline {
    at: std::time::Instant,
    timeout: Duration,
    what: String,
}

impl Deadline {
    fn new(what: &str, timeout: Duration) -> Deadline {
        Deadline {
            at: std::time::Instant::now() + timeout,
            timeout,
            what: what.to_string(),
        }
    }

    async fn tick(&self, last: &dyn std::fmt::Display) {
        if std::time::Instant::now() >= self.at {
            panic!(
                "timed out after {:?} waiting until {}; last seen:\n{last}",
                self.timeout, self.what
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ------------------------------------------------------------------ RESP

/// The payload of a bulk (`$`) or verbatim (`=`) string reply, after
/// checking that the length header matches the payload exactly and that
/// the reply is exactly one frame.
fn blob_body(reply: &[u8]) -> Vec<u8> {
    assert!(
        matches!(reply.first(), Some(b'$' | b'=')),
        "not a bulk or verbatim string: {}",
        esc(reply)
    );
    let nl = reply
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or_else(|| panic!("no header line: {}", esc(reply)));
    let len: usize = std::str::from_utf8(&reply[1..nl])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad length header: {}", esc(reply)));
    let start = nl + 2;
    assert_eq!(
        reply.len(),
        start + len + 2,
        "length header {len} does not match the payload ({} bytes follow the header): {}",
        reply.len() - start,
        esc(reply)
    );
    assert!(reply.ends_with(b"\r\n"), "{}", esc(reply));
    reply[start..start + len].to_vec()
}

/// The `id` field of a HELLO reply (RESP2 flat array or RESP3 map).
fn hello_id(reply: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(reply);
    let at = text
        .find("$2\r\nid\r\n:")
        .unwrap_or_else(|| panic!("no id in HELLO reply: {}", esc(reply)))
        + "$2\r\nid\r\n:".len();
    let end = at + text[at..].find("\r\n").expect("id line ends");
    text[at..end]
        .parse()
        .unwrap_or_else(|_| panic!("bad id in HELLO reply: {}", esc(reply)))
}

/// A bulk string element of a parsed RESP2 reply, as text.
fn bulk_text(r: &Reply) -> String {
    match r {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("expected a bulk string, got {other:?}"),
    }
}

fn int(r: &Reply) -> i64 {
    match r {
        Reply::Int(n) => *n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// The local address of a raw client, as keyward reports client addresses.
fn local_addr(raw: &mut Raw) -> String {
    raw.stream().local_addr().expect("local_addr").to_string()
}

// ------------------------------------------------------------------ INFO

/// The lines of the `# Keyward` section at the end of an INFO body, as a
/// map without the `keyward_` prefix, after checking every line's shape.
fn keyward_fields(body: &str) -> HashMap<String, String> {
    let at = body
        .find("# Keyward\r\n")
        .unwrap_or_else(|| panic!("no # Keyward section in INFO:\n{body}"));
    let section = &body[at + "# Keyward\r\n".len()..];
    assert!(
        section.ends_with("\r\n"),
        "section not CRLF-terminated: {section:?}"
    );
    let mut fields = HashMap::new();
    for line in section.trim_end_matches("\r\n").split("\r\n") {
        let (k, v) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("line {line:?} is not field:value in\n{section}"));
        let name = k
            .strip_prefix("keyward_")
            .unwrap_or_else(|| panic!("field {k:?} lacks the keyward_ prefix in\n{section}"));
        fields.insert(name.to_string(), v.to_string());
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_appends_a_keyward_section_with_an_exact_length() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let mut raw = Raw::connect(kw.port()).await;

    // Pipelined with a PING: a wrong length header would eat into (or leave
    // bytes before) the PONG.
    let mut batch = cmd(&[b"INFO"]);
    batch.extend(cmd(&[b"PING"]));
    raw.send(&batch).await;
    let info = raw.read_reply().await;
    assert_eq!(esc(&raw.read_reply().await), esc(b"+PONG\r\n"));
    let body = String::from_utf8(blob_body(&info)).expect("INFO is UTF-8");

    assert!(body.starts_with("# Server\r\n"), "{body}");
    assert!(body.contains("redis_version:"), "{body}");
    // Redis's text, then a blank line, then the section, last.
    assert!(body.contains("\r\n\r\n# Keyward\r\n"), "{body}");
    let f = keyward_fields(&body);
    for name in [
        "version",
        "uptime_in_seconds",
        "clients",
        "total_requests",
        "topology_state",
        "master",
        "cache_enabled",
        "hotkeys_enabled",
        "slowlog_len",
    ] {
        assert!(f.contains_key(name), "keyward_{name} missing:\n{body}");
    }
    assert_eq!(f["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert_eq!(f["master"], redis.addr(), "{body}");
    assert_eq!(f["topology_state"], "healthy", "{body}");
    assert_eq!(f["cache_enabled"], "1", "{body}");
    assert_eq!(f["hotkeys_enabled"], "1", "{body}");
    assert_eq!(f["slowlog_len"], "0", "{body}");
    assert!(f["uptime_in_seconds"].parse::<u64>().is_ok(), "{body}");
    let clients: u64 = f["clients"].parse().expect("keyward_clients is a number");
    assert!(clients >= 1, "this connection is a client:\n{body}");

    // keyward_total_requests counts requests answered since start.
    let before: u64 = f["total_requests"].parse().expect("a number");
    let pings: Vec<u8> = (0..5).flat_map(|_| cmd(&[b"PING"])).collect();
    raw.send(&pings).await;
    raw.read_replies(5).await;
    let d = Deadline::new(
        "keyward_total_requests grows by the 6 requests since",
        DEADLINE,
    );
    let last = loop {
        let body = String::from_utf8(blob_body(&raw.call(&[b"INFO", b"keyward"]).await)).unwrap();
        let n: u64 = keyward_fields(&body)["total_requests"].parse().unwrap();
        // INFO itself and the 5 PINGs; the polling INFOs may add more.
        if n >= before + 6 {
            break body;
        }
        d.tick(&body).await;
    };
    assert!(last.starts_with("# Keyward\r\n"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_sections_include_keyward_only_when_asked() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let mut raw = Raw::connect(kw.port()).await;

    // Only the Keyward section (Redis has no such section: empty text).
    for arg in [&b"keyward"[..], b"KEYWARD"] {
        let body = String::from_utf8(blob_body(&raw.call(&[b"INFO", arg]).await)).unwrap();
        assert!(body.starts_with("# Keyward\r\nkeyward_version:"), "{body}");
        assert!(!body.contains("# Server"), "{body}");
        assert!(!body.contains("redis_version"), "{body}");
        assert_eq!(keyward_fields(&body)["master"], redis.addr());
    }

    // A Redis section alone: no Keyward section.
    let body = String::from_utf8(blob_body(&raw.call(&[b"INFO", b"server"]).await)).unwrap();
    assert!(body.starts_with("# Server\r\n"), "{body}");
    assert!(body.contains("redis_version:"), "{body}");
    assert!(!body.contains("# Keyward"), "{body}");
    assert!(!body.contains("keyward_"), "{body}");

    // The default set, all and everything include it.
    for arg in [&b"all"[..], b"everything", b"default"] {
        let body = String::from_utf8(blob_body(&raw.call(&[b"INFO", arg]).await)).unwrap();
        assert!(
            body.starts_with("# Server\r\n"),
            "INFO {}: {body}",
            esc(arg)
        );
        assert!(
            body.contains("\r\n\r\n# Keyward\r\n"),
            "INFO {} lacks the Keyward section: {body}",
            esc(arg)
        );
        assert_eq!(keyward_fields(&body)["master"], redis.addr());
    }

    // Several sections at once (Redis 7): the Redis one plus ours.
    let body = String::from_utf8(blob_body(
        &raw.call(&[b"INFO", b"server", b"keyward"]).await,
    ))
    .unwrap();
    assert!(body.starts_with("# Server\r\n"), "{body}");
    assert!(body.contains("\r\n\r\n# Keyward\r\n"), "{body}");
    assert!(!body.contains("# Clients"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_in_resp3_is_a_verbatim_string_with_the_section() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let mut raw = Raw::connect_resp3(kw.port()).await;

    let mut batch = cmd(&[b"INFO"]);
    batch.extend(cmd(&[b"PING"]));
    raw.send(&batch).await;
    let info = raw.read_reply().await;
    assert_eq!(esc(&raw.read_reply().await), esc(b"+PONG\r\n"));
    assert!(info.starts_with(b"="), "not verbatim: {}", esc(&info));
    let body = String::from_utf8(blob_body(&info)).unwrap();
    assert!(body.starts_with("txt:# Server\r\n"), "{body}");
    assert!(body.contains("\r\n\r\n# Keyward\r\n"), "{body}");
    let f = keyward_fields(&body);
    assert_eq!(f["master"], redis.addr(), "{body}");

    let only = raw.call(&[b"INFO", b"keyward"]).await;
    assert!(only.starts_with(b"="), "not verbatim: {}", esc(&only));
    let body = String::from_utf8(blob_body(&only)).unwrap();
    assert!(body.starts_with("txt:# Keyward\r\n"), "{body}");
}

// --------------------------------------------------------------- SLOWLOG

/// One `KEYWARD SLOWLOG GET` entry, parsed.
#[derive(Debug)]
struct Slow {
    id: i64,
    time: i64,
    duration_us: i64,
    args: Vec<String>,
    addr: String,
    name: String,
}

/// `KEYWARD SLOWLOG GET [count]` parsed, after checking each entry's shape.
async fn slowlog_get(raw: &mut Raw, count: Option<&[u8]>) -> Vec<Slow> {
    let mut args: Vec<&[u8]> = vec![b"KEYWARD", b"SLOWLOG", b"GET"];
    args.extend(count);
    let reply = raw.call(&args).await;
    let entries = parse_reply(&reply)
        .ok()
        .and_then(Reply::array)
        .unwrap_or_else(|| panic!("SLOWLOG GET is not an array: {}", esc(&reply)));
    entries
        .into_iter()
        .map(|e| {
            let parts = e
                .array()
                .unwrap_or_else(|| panic!("entry is not an array: {}", esc(&reply)));
            assert_eq!(parts.len(), 6, "entry is not *6: {}", esc(&reply));
            let args = parts[3]
                .clone()
                .array()
                .unwrap_or_else(|| panic!("args are not an array: {}", esc(&reply)))
                .iter()
                .map(bulk_text)
                .collect();
            Slow {
                id: int(&parts[0]),
                time: int(&parts[1]),
                duration_us: int(&parts[2]),
                args,
                addr: bulk_text(&parts[4]),
                name: bulk_text(&parts[5]),
            }
        })
        .collect()
}

async fn slowlog_len(raw: &mut Raw) -> i64 {
    let reply = raw.call(&[b"KEYWARD", b"SLOWLOG", b"LEN"]).await;
    match parse_reply(&reply) {
        Ok(Reply::Int(n)) => n,
        _ => panic!("SLOWLOG LEN is not an integer: {}", esc(&reply)),
    }
}

async fn wait_slowlog_len(raw: &mut Raw, at_least: i64) {
    let d = Deadline::new(&format!("KEYWARD SLOWLOG LEN reaches {at_least}"), DEADLINE);
    loop {
        let n = slowlog_len(raw).await;
        if n >= at_least {
            return;
        }
        d.tick(&n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowlog_keeps_every_request_with_threshold_zero() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[admin]\nslowlog_slower_than_us = 0\n", &[]);
    let mut raw = Raw::connect(kw.port()).await;
    let me = local_addr(&mut raw);

    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"SLOWLOG", b"RESET"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(slowlog_len(&mut raw).await, 0);

    let long = vec![b'x'; 200];
    let keys: Vec<String> = (0..39).map(|i| format!("k{i}")).collect();
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys.iter().map(|k| k.as_bytes()));
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(raw.call(&[b"SET", b"sk", b"v"]).await, b"+OK\r\n");
    assert_eq!(raw.call(&[b"GET", b"sk"]).await, b"$1\r\nv\r\n");
    assert_eq!(raw.call(&[b"SET", b"big", &long]).await, b"+OK\r\n");
    assert_eq!(raw.call(&del).await, b":0\r\n");
    wait_slowlog_len(&mut raw, 4).await;

    let entries = slowlog_get(&mut raw, None).await;
    let t1 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(entries.len(), 4, "{entries:#?}");
    // Newest first, ids consecutive.
    assert_eq!(entries[0].args[0], "DEL", "{entries:#?}");
    assert_eq!(
        entries[1].args,
        [
            "SET",
            "big",
            &format!("{}... (72 more bytes)", "x".repeat(128))
        ],
        "{entries:#?}"
    );
    assert_eq!(entries[2].args, ["GET", "sk"], "{entries:#?}");
    assert_eq!(entries[3].args, ["SET", "sk", "v"], "{entries:#?}");
    for w in entries.windows(2) {
        assert_eq!(w[0].id, w[1].id + 1, "{entries:#?}");
    }
    for e in &entries {
        assert!(
            e.time >= t0 - 1 && e.time <= t1 + 1,
            "time {} not within [{t0}, {t1}]: {e:?}",
            e.time
        );
        assert!(e.duration_us >= 0, "{e:?}");
        assert_eq!(e.addr, me, "client address: {e:?}");
        assert_eq!(e.name, "", "{e:?}");
    }
    // 40 arguments: 31 kept, then the marker.
    let d = &entries[0].args;
    assert_eq!(d.len(), 32, "{d:?}");
    assert_eq!(d[1], "k0");
    assert_eq!(d[30], "k29");
    assert_eq!(d[31], "... (9 more arguments)");

    // Counts.
    let one = slowlog_get(&mut raw, Some(b"1")).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].id, entries[0].id);
    assert_eq!(slowlog_get(&mut raw, Some(b"-1")).await.len(), 4);
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"SLOWLOG", b"GET", b"0"]).await),
        esc(b"*0\r\n")
    );
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"SLOWLOG", b"GET", b"-2"]).await),
        esc(b"-ERR count should be greater than or equal to -1\r\n")
    );
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"SLOWLOG", b"GET", b"x"]).await),
        esc(b"-ERR value is not an integer or out of range\r\n")
    );
    assert_eq!(slowlog_len(&mut raw).await, 4);

    // INFO and /metrics report the length too.
    let body = String::from_utf8(blob_body(&raw.call(&[b"INFO", b"keyward"]).await)).unwrap();
    assert_eq!(keyward_fields(&body)["slowlog_len"], "4", "{body}");

    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"SLOWLOG", b"RESET"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(slowlog_len(&mut raw).await, 0);
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"SLOWLOG", b"GET"]).await),
        esc(b"*0\r\n")
    );
}

/// The slow log covers requests on the shared pool; a transaction runs on
/// a pinned connection and is not logged, while the same client's pooled
/// requests before and after it are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowlog_skips_requests_on_a_pinned_connection() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[admin]\nslowlog_slower_than_us = 0\n", &[]);
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(raw.call(&[b"GET", b"before"]).await, b"$-1\r\n");
    assert_eq!(raw.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_eq!(raw.call(&[b"SET", b"tx", b"1"]).await, b"+QUEUED\r\n");
    assert_eq!(esc(&raw.call(&[b"EXEC"]).await), esc(b"*1\r\n+OK\r\n"));
    // A second client's pooled request marks the point the log must reach.
    let mut other = Raw::connect(kw.port()).await;
    assert_eq!(other.call(&[b"GET", b"after"]).await, b"$-1\r\n");
    let d = Deadline::new("the slow log has the last pooled GET", DEADLINE);
    let entries = loop {
        let entries = slowlog_get(&mut other, Some(b"-1")).await;
        if entries.iter().any(|e| e.args == ["GET", "after"]) {
            break entries;
        }
        d.tick(&format!("{entries:#?}")).await;
    };
    assert!(
        entries.iter().any(|e| e.args == ["GET", "before"]),
        "{entries:#?}"
    );
    assert!(
        entries
            .iter()
            .all(|e| !["MULTI", "SET", "EXEC"].contains(&e.args[0].as_str())),
        "a pinned request was logged: {entries:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowlog_default_threshold_catches_a_slow_command_only() {
    // DEBUG is refused by Redis 7 unless enabled.
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let kw = Keyward::start(&redis.addr());
    let mut raw = Raw::connect(kw.port()).await;
    let me = local_addr(&mut raw);
    // The first requests after start may wait for the upstream pool and
    // the command table (and rightly land in the slow log): start from a
    // ready proxy and an empty log.
    wait_ready(&kw, DEADLINE).await;
    assert_eq!(raw.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_eq!(
        raw.call(&[b"KEYWARD", b"SLOWLOG", b"RESET"]).await,
        b"+OK\r\n"
    );

    assert_eq!(raw.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_eq!(raw.call(&[b"GET", b"fast"]).await, b"$-1\r\n");
    assert_eq!(
        esc(&raw.call(&[b"DEBUG", b"SLEEP", b"0.05"]).await),
        esc(b"+OK\r\n")
    );
    wait_slowlog_len(&mut raw, 1).await;
    let entries = slowlog_get(&mut raw, None).await;
    let slow = entries
        .iter()
        .find(|e| e.args == ["DEBUG", "SLEEP", "0.05"])
        .unwrap_or_else(|| panic!("DEBUG SLEEP not in the slow log: {entries:#?}"));
    assert!(
        slow.duration_us >= 50_000,
        "DEBUG SLEEP 0.05 took {} us by the slow log",
        slow.duration_us
    );
    assert_eq!(slow.addr, me);
    assert!(
        entries
            .iter()
            .all(|e| e.args[0] != "GET" && e.args[0] != "PING"),
        "a fast request was logged with the 10 ms threshold: {entries:#?}"
    );
}

// --------------------------------------------------------------- CLIENTS

/// `KEYWARD CLIENTS` lines parsed into ordered (key, value) lists, after
/// checking each line has exactly the documented fields in order.
fn client_lines(body: &str) -> Vec<Vec<(String, String)>> {
    const KEYS: [&str; 8] = [
        "id", "addr", "age", "idle", "pinned", "cmd", "requests", "resp",
    ];
    body.lines()
        .map(|line| {
            let kv: Vec<(String, String)> = line
                .split(' ')
                .map(|f| {
                    let (k, v) = f
                        .split_once('=')
                        .unwrap_or_else(|| panic!("field {f:?} in line {line:?}"));
                    (k.to_string(), v.to_string())
                })
                .collect();
            let keys: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, KEYS, "fields of {line:?}");
            for (k, v) in &kv {
                if ["id", "age", "idle", "requests"].contains(&k.as_str()) {
                    assert!(v.parse::<u64>().is_ok(), "{k}={v} in {line:?}");
                }
            }
            kv
        })
        .collect()
}

fn field<'a>(line: &'a [(String, String)], key: &str) -> &'a str {
    &line.iter().find(|(k, _)| k == key).expect("checked").1
}

async fn keyward_clients(raw: &mut Raw, count: Option<&[u8]>) -> String {
    let mut args: Vec<&[u8]> = vec![b"KEYWARD", b"CLIENTS"];
    if let Some(n) = count {
        args.extend([&b"COUNT"[..], n]);
    }
    let reply = raw.call(&args).await;
    String::from_utf8(blob_body(&reply)).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_clients_lists_each_connection() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let mut a = Raw::connect(kw.port()).await;
    let id_a = hello_id(&a.call(&[b"HELLO", b"3"]).await);
    let addr_a = local_addr(&mut a);
    let mut b = Raw::connect(kw.port()).await;
    let id_b = hello_id(&b.call(&[b"HELLO", b"2"]).await);
    let addr_b = local_addr(&mut b);
    assert_ne!(id_a, id_b);
    assert_eq!(b.call(&[b"MULTI"]).await, b"+OK\r\n");

    let d = Deadline::new(
        "KEYWARD CLIENTS shows both clients, b pinned in MULTI",
        DEADLINE,
    );
    let body = loop {
        let body = keyward_clients(&mut a, None).await;
        if body.contains(&format!("addr={addr_b} "))
            && body.contains("pinned=1 cmd=multi ")
            && body.lines().count() == 2
        {
            break body;
        }
        d.tick(&body).await;
    };
    let lines = client_lines(&body);
    assert_eq!(lines.len(), 2, "{body}");
    // Oldest first: a connected first.
    let (la, lb) = (&lines[0], &lines[1]);
    assert_eq!(field(la, "id"), id_a.to_string(), "{body}");
    assert_eq!(field(la, "addr"), addr_a, "{body}");
    assert_eq!(field(la, "pinned"), "0", "{body}");
    assert_eq!(field(la, "cmd"), "keyward", "{body}");
    assert_eq!(field(la, "resp"), "3", "{body}");
    assert_eq!(field(lb, "id"), id_b.to_string(), "{body}");
    assert_eq!(field(lb, "addr"), addr_b, "{body}");
    assert_eq!(field(lb, "pinned"), "1", "{body}");
    assert_eq!(field(lb, "cmd"), "multi", "{body}");
    assert_eq!(field(lb, "resp"), "2", "{body}");
    assert!(
        field(lb, "requests").parse::<u64>().unwrap() >= 2,
        "HELLO and MULTI: {body}"
    );

    // A client that has sent nothing yet.
    let mut c = Raw::connect(kw.port()).await;
    let addr_c = local_addr(&mut c);
    let d = Deadline::new("KEYWARD CLIENTS shows the idle client", DEADLINE);
    let body = loop {
        let body = keyward_clients(&mut a, None).await;
        if body.contains(&format!("addr={addr_c} ")) {
            break body;
        }
        d.tick(&body).await;
    };
    let lines = client_lines(&body);
    assert_eq!(lines.len(), 3, "{body}");
    assert_eq!(field(&lines[2], "addr"), addr_c, "{body}");
    assert_eq!(field(&lines[2], "cmd"), "NULL", "{body}");
    assert_eq!(field(&lines[2], "requests"), "0", "{body}");
    assert_eq!(field(&lines[2], "resp"), "2", "{body}");

    // COUNT keeps the oldest.
    let first = keyward_clients(&mut a, Some(b"1")).await;
    let lines = client_lines(&first);
    assert_eq!(lines.len(), 1, "{first}");
    assert_eq!(field(&lines[0], "id"), id_a.to_string(), "{first}");
    assert_eq!(
        esc(&a.call(&[b"KEYWARD", b"CLIENTS", b"COUNT", b"0"]).await),
        esc(b"-ERR COUNT must be greater than 0\r\n")
    );
    drop(c);
}

// ---------------------------------------------------------------- CONFIG

/// A RESP2 `KEYWARD CONFIG GET` reply as name/value pairs.
fn config_pairs(reply: &[u8]) -> Vec<(String, String)> {
    let items = parse_reply(reply)
        .ok()
        .and_then(Reply::array)
        .unwrap_or_else(|| panic!("not an array: {}", esc(reply)));
    assert!(items.len().is_multiple_of(2), "odd length: {}", esc(reply));
    items
        .chunks(2)
        .map(|p| (bulk_text(&p[0]), bulk_text(&p[1])))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_config_get_shows_the_effective_config() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[admin]\nslowlog_slower_than_us = 12345\n", &[]);
    let mut raw = Raw::connect(kw.port()).await;
    let listen = kw.addr();

    let exact = format!(
        "*2\r\n$13\r\nserver.listen\r\n${}\r\n{listen}\r\n",
        listen.len()
    );
    for pattern in [&b"server.listen"[..], b"SERVER.LISTEN", b"server.lis?en"] {
        assert_eq!(
            esc(&raw.call(&[b"KEYWARD", b"CONFIG", b"GET", pattern]).await),
            esc(exact.as_bytes()),
            "pattern {}",
            esc(pattern)
        );
    }

    // Several patterns; values from the file and from the CLI.
    let pairs = config_pairs(
        &raw.call(&[
            b"KEYWARD",
            b"CONFIG",
            b"GET",
            b"server.listen",
            b"admin.slowlog_slower_than_us",
            b"upstream.address",
        ])
        .await,
    );
    let map: HashMap<_, _> = pairs.iter().cloned().collect();
    assert_eq!(map.len(), 3, "{pairs:?}");
    assert_eq!(map["server.listen"], listen);
    assert_eq!(map["admin.slowlog_slower_than_us"], "12345");
    assert_eq!(map["upstream.address"], redis.addr());

    // A glob over a section.
    let pairs = config_pairs(
        &raw.call(&[b"KEYWARD", b"CONFIG", b"GET", b"server.*"])
            .await,
    );
    assert!(pairs.len() > 1, "{pairs:?}");
    assert!(
        pairs.iter().all(|(k, _)| k.starts_with("server.")),
        "{pairs:?}"
    );
    assert!(pairs
        .iter()
        .any(|(k, v)| k == "server.listen" && *v == listen));
    // Everything is section.key.
    let all = config_pairs(&raw.call(&[b"KEYWARD", b"CONFIG", b"GET", b"*"]).await);
    assert!(all.len() > pairs.len(), "{all:?}");
    assert!(
        all.iter().all(|(k, _)| k
            .split_once('.')
            .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty())),
        "{all:?}"
    );

    assert_eq!(
        esc(&raw
            .call(&[b"KEYWARD", b"CONFIG", b"GET", b"no.such.*"])
            .await),
        esc(b"*0\r\n")
    );
    let set = raw.call(&[b"KEYWARD", b"CONFIG", b"SET", b"x", b"y"]).await;
    assert!(
        set.starts_with(b"-ERR unknown KEYWARD CONFIG subcommand"),
        "{}",
        esc(&set)
    );

    // RESP3: a map.
    let mut r3 = Raw::connect_resp3(kw.port()).await;
    let exact3 = format!(
        "%1\r\n$13\r\nserver.listen\r\n${}\r\n{listen}\r\n",
        listen.len()
    );
    assert_eq!(
        esc(&r3
            .call(&[b"KEYWARD", b"CONFIG", b"GET", b"server.listen"])
            .await),
        esc(exact3.as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_config_get_redacts_the_upstream_password() {
    let redis = Redis::start_with(&["--requirepass", "s3cret-pw"]);
    let kw = Keyward::start_for(&redis, "password = \"s3cret-pw\"\n", &[]);
    let mut raw = Raw::connect(kw.port()).await;
    let reply = raw
        .call(&[b"KEYWARD", b"CONFIG", b"GET", b"upstream.password"])
        .await;
    assert_eq!(
        esc(&reply),
        esc(b"*2\r\n$17\r\nupstream.password\r\n$5\r\n(set)\r\n")
    );
    let all = raw.call(&[b"KEYWARD", b"CONFIG", b"GET", b"*"]).await;
    assert!(
        !String::from_utf8_lossy(&all).contains("s3cret-pw"),
        "the password leaked: {}",
        esc(&all)
    );
}

// ------------------------------------------------------------------ HTTP

/// `GET path` as JSON with its status.
fn get_json(admin: u16, path: &str) -> (u16, Value) {
    let (status, body) = http_get(admin, path);
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{path} ({status}) is not JSON ({e}): {body}"));
    (status, json)
}

/// Poll `GET path` until `ok(status, json)`; return that answer. Panics
/// with the last answer after `timeout`. Blocks the thread (inside
/// `block_in_place`), which is fine: nothing else runs in the test then.
fn poll_json(
    admin: u16,
    path: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(u16, &Value) -> bool,
) -> Value {
    blocking(|| {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (status, json) = get_json(admin, path);
            if ok(status, &json) {
                return json;
            }
            if std::time::Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting until {what}; last {path} ({status}): {json}");
            }
            std::thread::sleep(POLL);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_each_component_and_goes_down_with_redis() {
    let mut redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let admin = kw.admin_port();
    // The upstream pool connects just after the ports open.
    wait_ready(&kw, DEADLINE).await;

    let (status, h) = blocking(|| get_json(admin, "/health"));
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["status"], "ok", "{h}");
    for c in [
        "upstream", "topology", "commands", "listener", "hotkeys", "cache",
    ] {
        let comp = &h["components"][c];
        assert!(comp["status"].is_string(), "component {c}: {h}");
        assert!(comp["detail"].is_string(), "component {c}: {h}");
    }
    assert_eq!(h["components"]["upstream"]["status"], "ok", "{h}");
    assert!(
        h["components"]["upstream"]["detail"]
            .as_str()
            .unwrap()
            .contains(&redis.addr()),
        "{h}"
    );
    assert_eq!(h["components"]["topology"]["status"], "ok", "{h}");
    assert_eq!(h["components"]["commands"]["status"], "ok", "{h}");

    blocking(|| redis.kill());
    poll_json(
        admin,
        "/health",
        "/health is 503 with the upstream down",
        DEADLINE,
        |status, h| {
            status == 503
                && h["status"] == "down"
                && h["components"]["upstream"]["status"] == "down"
        },
    );
    let (status, body) = blocking(|| http_get(admin, "/ready"));
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready:"), "{body}");
}

/// SIGTERM with a reply still owed: while keyward drains, `/ready` says
/// "shutting down" (so a load balancer stops sending) and `/health` shows
/// the listener down; once the reply is delivered keyward exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_shutting_down_while_draining() {
    let redis = Redis::start();
    let mut kw = Keyward::start_for(&redis, "[server]\nshutdown_grace_ms = 20000\n", &[]);
    let admin = kw.admin_port();
    wait_ready(&kw, DEADLINE).await;

    // A blocked BLPOP owes its client a reply until something is pushed.
    let mut client = Raw::connect(kw.port()).await;
    client.send(&cmd(&[b"BLPOP", b"drain:list", b"0"])).await;
    let port = redis.port();
    blocking(move || {
        wait_until_sync("the BLPOP is blocked in Redis", DEADLINE, || {
            redis_info_field(port, "clients", "blocked_clients").as_deref() == Some("1")
        })
    });

    kw.signal_term();
    poll_json(
        admin,
        "/health",
        "/health shows the listener down while draining",
        DEADLINE,
        |status, h| status == 503 && h["components"]["listener"]["status"] == "down",
    );
    let (status, body) = blocking(|| http_get(admin, "/ready"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "not ready: shutting down\n");

    // The owed reply still arrives, then keyward exits cleanly.
    redis_cmd(redis.port(), &[b"RPUSH", b"drain:list", b"v"]);
    assert_eq!(
        esc(&client.read_reply().await),
        esc(b"*2\r\n$10\r\ndrain:list\r\n$1\r\nv\r\n")
    );
    let status = tokio::task::block_in_place(|| kw.wait_exit(DEADLINE));
    assert!(
        status.is_some_and(|s| s.success()),
        "keyward exit after the drain: {status:?}"
    );
}

/// One `INFO <section>` field of a Redis server, straight from Redis.
fn redis_info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let reply = redis_cmd(port, &[b"INFO", section.as_bytes()]);
    let text = String::from_utf8_lossy(&reply).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// The `family` entry of `/stats`: (requests, errors).
fn family(stats: &Value, name: &str) -> (u64, u64) {
    stats["families"]
        .as_array()
        .unwrap_or_else(|| panic!("no families: {stats}"))
        .iter()
        .find(|f| f["family"] == name)
        .map(|f| {
            (
                f["requests"].as_u64().unwrap(),
                f["errors"].as_u64().unwrap(),
            )
        })
        .unwrap_or((0, 0))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_requests_errors_bytes_and_latency() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let admin = kw.admin_port();
    let mut raw = Raw::connect(kw.port()).await;
    // Settle: the connection is registered and counted.
    assert_eq!(raw.call(&[b"PING"]).await, b"+PONG\r\n");
    let base = poll_json(
        admin,
        "/stats",
        "/stats counts the PING",
        DEADLINE,
        |_, j| j["requests"].as_u64() >= Some(1),
    );
    let (base_str, base_str_err) = family(&base, "string");

    const N: u64 = 25;
    let batch: Vec<u8> = (0..N)
        .flat_map(|i| cmd(&[b"GET", format!("st:{i}").as_bytes()]))
        .collect();
    raw.send(&batch).await;
    let replies = raw.read_replies(N as usize).await;
    assert!(replies.iter().all(|r| r == b"$-1\r\n"));
    let received: usize = replies.iter().map(Vec::len).sum();

    let now = poll_json(
        admin,
        "/stats",
        "/stats counts the GETs",
        DEADLINE,
        |_, j| family(j, "string").0 >= base_str + N,
    );
    assert_eq!(
        family(&now, "string"),
        (base_str + N, base_str_err),
        "{now}"
    );
    assert_eq!(num(&now, "requests"), num(&base, "requests") + N, "{now}");
    assert_eq!(num(&now, "errors"), num(&base, "errors"), "{now}");
    assert_eq!(
        num(&now, "bytes_in"),
        num(&base, "bytes_in") + batch.len() as u64,
        "bytes_in grows by the bytes sent: {now}"
    );
    assert_eq!(
        num(&now, "bytes_out"),
        num(&base, "bytes_out") + received as u64,
        "bytes_out grows by the bytes received: {now}"
    );
    assert_eq!(num(&now, "clients"), 1, "{now}");

    let lat = &now["latency"];
    let bounds = lat["bounds_us"].as_array().expect("bounds_us");
    let counts: Vec<u64> = lat["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert!(!bounds.is_empty(), "{lat}");
    assert!(
        bounds.windows(2).all(|w| w[0].as_f64() < w[1].as_f64()),
        "bounds ascending: {lat}"
    );
    assert_eq!(counts.len(), bounds.len() + 1, "{lat}");
    assert_eq!(num(lat, "count"), counts.iter().sum::<u64>(), "{lat}");
    assert!(num(lat, "count") >= N, "{lat}");
    assert!(lat["sum_us"].as_f64().is_some(), "{lat}");
    let (p50, p99) = (
        lat["p50_us"].as_f64().unwrap(),
        lat["p99_us"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{lat}");
    let fam = now["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family"] == "string")
        .unwrap();
    for k in ["relayed", "p50_us", "p99_us"] {
        assert!(fam[k].is_number(), "{k}: {fam}");
    }

    // A wrong-arity GET is an error reply, counted as such.
    let err = raw.call(&[b"GET"]).await;
    assert!(
        err.starts_with(b"-ERR wrong number of arguments"),
        "{}",
        esc(&err)
    );
    let after = poll_json(
        admin,
        "/stats",
        "/stats counts the error",
        DEADLINE,
        |_, j| num(j, "errors") > num(&now, "errors"),
    );
    assert_eq!(num(&after, "errors"), num(&now, "errors") + 1, "{after}");
    assert_eq!(
        family(&after, "string"),
        (base_str + N + 1, base_str_err + 1),
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_endpoint_lists_connections() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let admin = kw.admin_port();
    let mut a = Raw::connect(kw.port()).await;
    let id_a = hello_id(&a.call(&[b"HELLO", b"3"]).await);
    let addr_a = local_addr(&mut a);
    let mut b = Raw::connect(kw.port()).await;
    let id_b = hello_id(&b.call(&[b"HELLO", b"2"]).await);
    let addr_b = local_addr(&mut b);
    assert_eq!(b.call(&[b"MULTI"]).await, b"+OK\r\n");

    let json = poll_json(
        admin,
        "/clients",
        "/clients shows both, b pinned",
        DEADLINE,
        |_, j| {
            j["total"] == 2
                && j["clients"]
                    .as_array()
                    .is_some_and(|c| c.len() == 2 && c[1]["pinned"] == true)
        },
    );
    let clients = json["clients"].as_array().unwrap();
    let (ca, cb) = (&clients[0], &clients[1]);
    for c in clients {
        for k in [
            "id", "addr", "age_s", "idle_s", "pinned", "cmd", "requests", "proto",
        ] {
            assert!(c.get(k).is_some(), "{k} missing: {json}");
        }
        assert!(c["age_s"].as_f64().unwrap() >= 0.0, "{json}");
        assert!(c["idle_s"].as_f64().unwrap() >= 0.0, "{json}");
    }
    assert_eq!(ca["id"], id_a, "{json}");
    assert_eq!(ca["addr"], addr_a.as_str(), "{json}");
    assert_eq!(ca["proto"], 3, "{json}");
    assert_eq!(ca["pinned"], false, "{json}");
    assert_eq!(ca["cmd"], "hello", "{json}");
    assert_eq!(cb["id"], id_b, "{json}");
    assert_eq!(cb["addr"], addr_b.as_str(), "{json}");
    assert_eq!(cb["proto"], 2, "{json}");
    assert_eq!(cb["cmd"], "multi", "{json}");
    assert_eq!(cb["requests"], 2, "{json}");

    let (status, one) = blocking(|| get_json(admin, "/clients?count=1"));
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["total"], 2, "{one}");
    assert_eq!(one["clients"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one["clients"][0]["id"], id_a, "{one}");
    let (status, body) = blocking(|| http_get(admin, "/clients?count=0"));
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_can_be_read_and_changed() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let admin = kw.admin_port();
    // The kit passes RUST_LOG through; keyward's default is "info".
    let default = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "info".into());
    let (status, body) = blocking(|| http_get(admin, "/log-level"));
    assert_eq!(
        (status, body.as_str()),
        (200, format!("{default}\n").as_str())
    );

    let (status, body) = blocking(|| http_request(admin, "PUT", "/log-level", Some(b"debug")));
    assert_eq!(status, 200, "{body}");
    let (status, body) = blocking(|| http_get(admin, "/log-level"));
    assert_eq!((status, body.as_str()), (200, "debug\n"));

    let (status, body) = blocking(|| http_request(admin, "PUT", "/log-level", Some(b"=bad=")));
    assert_eq!(status, 400, "{body}");
    assert!(!body.trim().is_empty(), "a 400 says why");
    let (status, body) = blocking(|| http_get(admin, "/log-level"));
    assert_eq!(
        (status, body.as_str()),
        (200, "debug\n"),
        "a bad filter must not replace the one in force"
    );
}

/// Poll `/metrics` until `series` is at least `base + delta`; then it must
/// be exactly that. A counter not yet rendered counts as 0.
fn wait_metric_delta(admin: u16, series: &str, base: f64, delta: f64) {
    let last = blocking(|| {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let text = get_metrics(admin);
            let got = metric(&text, series).unwrap_or(0.0);
            if got >= base + delta {
                return text;
            }
            if std::time::Instant::now() >= deadline {
                panic!("{series} did not reach {base} + {delta} within {DEADLINE:?} (last {got}):\n{text}");
            }
            std::thread::sleep(POLL);
        }
    });
    let got = metric(&last, series).unwrap_or(0.0);
    assert_eq!(got, base + delta, "{series} overshot:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_errors_pubsub_and_connections() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let admin = kw.admin_port();
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(raw.call(&[b"PING"]).await, b"+PONG\r\n");

    const OK: &str = "keyward_requests_total{family=\"string\",result=\"ok\"}";
    const DUR: &str = "keyward_request_duration_seconds_count{family=\"string\"}";
    const REFUSED: &str = "keyward_errors_total{kind=\"refused\"}";
    const SERVER_ERR: &str = "keyward_requests_total{family=\"server\",result=\"error\"}";
    const RELAYED: &str = "keyward_requests_total{family=\"pubsub\",result=\"relayed\"}";
    const ACCEPTED: &str = "keyward_clients_accepted_total";

    let m0 = blocking(|| get_metrics(admin));
    let at0 = |s: &str| metric(&m0, s).unwrap_or(0.0);

    // GETs.
    const N: usize = 20;
    let batch: Vec<u8> = (0..N)
        .flat_map(|i| cmd(&[b"GET", format!("m:{i}").as_bytes()]))
        .collect();
    raw.send(&batch).await;
    assert!(raw.read_replies(N).await.iter().all(|r| r == b"$-1\r\n"));
    wait_metric_delta(admin, OK, at0(OK), N as f64);
    wait_metric_delta(admin, DUR, at0(DUR), N as f64);

    // SYNC: keyward refuses it itself.
    let sync = raw.call(&[b"SYNC"]).await;
    assert!(sync.starts_with(b"-ERR "), "{}", esc(&sync));
    wait_metric_delta(admin, REFUSED, at0(REFUSED), 1.0);
    wait_metric_delta(admin, SERVER_ERR, at0(SERVER_ERR), 1.0);

    // A subscriber: relayed on a pinned connection.
    let mut sub = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&sub.call(&[b"SUBSCRIBE", b"obs:ch"]).await),
        esc(b"*3\r\n$9\r\nsubscribe\r\n$6\r\nobs:ch\r\n:1\r\n")
    );
    wait_metric_delta(admin, RELAYED, at0(RELAYED), 1.0);

    // Accepted connections: two so far, three more now.
    let m1 = blocking(|| get_metrics(admin));
    let accepted = metric(&m1, ACCEPTED).expect("keyward_clients_accepted_total");
    assert!(accepted >= 2.0, "{m1}");
    let mut more = Vec::new();
    for _ in 0..3 {
        let mut r = Raw::connect(kw.port()).await;
        assert_eq!(r.call(&[b"PING"]).await, b"+PONG\r\n");
        more.push(r);
    }
    wait_metric_delta(admin, ACCEPTED, accepted, 3.0);

    let m = blocking(|| get_metrics(admin));
    let conns = format!(
        "keyward_upstream_connections{{node=\"{}\",role=\"master\"}}",
        redis.addr()
    );
    assert!(
        metric(&m, &conns).is_some_and(|v| v > 0.0),
        "{conns} > 0:\n{m}"
    );
    assert_eq!(
        metric(&m, "keyward_topology_state{state=\"healthy\"}"),
        Some(1.0),
        "{m}"
    );
    for s in ["suspect", "fenced", "switching", "discovering"] {
        assert_eq!(
            metric(&m, &format!("keyward_topology_state{{state=\"{s}\"}}")),
            Some(0.0),
            "{s}:\n{m}"
        );
    }
    drop(sub);
}

// ------------------------------------------------------------------ LOGS

/// keyward's log lines parsed as JSON objects; panics on any non-empty
/// line that is not one, or lacks timestamp, level or message.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}\n--- log ---\n{log}"));
            assert!(v.is_object(), "log line is not an object: {l}");
            for k in ["timestamp", "level", "message"] {
                assert!(v[k].is_string(), "log line lacks {k}: {l}");
            }
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_are_logged_as_json_with_conn_and_req() {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    let mut raw = Raw::connect(kw.port()).await;
    let id = hello_id(&raw.call(&[b"HELLO", b"2"]).await);
    let reply = raw.call(&[b"SYNC"]).await;
    assert!(reply.starts_with(b"-ERR "), "{}", esc(&reply));
    let text = String::from_utf8(reply[1..reply.len() - 2].to_vec()).unwrap();

    let line = blocking(|| {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let found = json_lines(&kw.log())
                .into_iter()
                .find(|v| v["message"] == "error reply" && v["conn"] == id);
            if let Some(v) = found {
                return v;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "no error reply line for conn {id} within {DEADLINE:?}:\n{}",
                    kw.log()
                );
            }
            std::thread::sleep(POLL);
        }
    });
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["req"], 2, "HELLO is request 1, SYNC request 2: {line}");
    assert_eq!(line["kind"], "refused", "{line}");
    assert_eq!(line["error"], text.as_str(), "{line}");
    // /health lists it among the recent error replies, with the same ids.
    let (_, h) = blocking(|| get_json(kw.admin_port(), "/health"));
    let recent = &h["recent_errors"][0];
    assert_eq!(recent["conn"], id, "{h}");
    assert_eq!(recent["req"], 2, "{h}");
    assert_eq!(recent["kind"], "refused", "{h}");
    assert_eq!(recent["error"], text.as_str(), "{h}");
    assert!(recent["t_ms"].as_u64().is_some_and(|t| t > 0), "{h}");
    // Every line so far is JSON.
    let all = json_lines(&kw.log());
    assert!(
        all.iter().any(|v| v["message"] == "keyward started"),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_log_format_is_not_json() {
    let redis = Redis::start();
    let kw = Keyward::start_with(&redis.addr(), &["--log-format", "text"]);
    let mut raw = Raw::connect(kw.port()).await;
    let reply = raw.call(&[b"SYNC"]).await;
    assert!(reply.starts_with(b"-ERR "), "{}", esc(&reply));
    blocking(|| kw.wait_for_log("error reply", DEADLINE));
    let log = kw.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            serde_json::from_str::<Value>(l).is_err(),
            "a JSON line with --log-format text: {l}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("error reply") && l.contains("refused")),
        "{log}"
    );
}

// -------------------------------------------------------------- FAILOVER

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_timeline_in_topology_metrics_and_info() {
    let (master, replica, sentinels, kw) = sentinel_stack(1000).await;
    let admin = kw.admin_port();

    let m = blocking(|| get_metrics(admin));
    let old_series = format!(
        "keyward_upstream_connections{{node=\"{}\",role=\"master\"}}",
        master.addr()
    );
    assert!(metric(&m, &old_series).is_some_and(|v| v > 0.0), "{m}");
    let (status, topo) = blocking(|| get_json(admin, "/topology"));
    assert_eq!(status, 200, "{topo}");
    assert!(
        topo.get("last_failover").is_some_and(Value::is_null),
        "no failover yet: {topo}"
    );
    let m = blocking(|| get_metrics(admin));
    assert_eq!(metric(&m, "keyward_failovers_total"), Some(0.0), "{m}");

    let old = master.addr();
    blocking(|| sentinels.failover());
    let new = blocking(|| sentinels.wait_master_change(&old, SWITCH_LIMIT));
    assert_eq!(new, replica.addr());

    let topo = poll_json(
        admin,
        "/topology",
        "/topology shows the finished failover to the new master",
        SWITCH_LIMIT,
        |_, t| {
            let f = &t["last_failover"];
            f["to"] == new.as_str() && f["ended_ms"].is_u64()
        },
    );
    let f = &topo["last_failover"];
    assert_eq!(f["from"], old.as_str(), "{topo}");
    assert_eq!(topo["master"], new.as_str(), "{topo}");
    let started = f["started_ms"].as_u64().expect("started_ms");
    let ended = f["ended_ms"].as_u64().expect("ended_ms");
    assert!(ended >= started, "{topo}");
    let events = f["events"].as_array().expect("events");
    assert!(!events.is_empty(), "{topo}");
    for e in events {
        assert!(e["t_ms"].is_u64(), "{e}");
        assert!(e["event"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
    }

    let m = blocking(|| get_metrics(admin));
    assert_eq!(metric(&m, "keyward_failovers_total"), Some(1.0), "{m}");
    // The old master's series no longer shows connections.
    assert_eq!(metric(&m, &old_series), Some(0.0), "{m}");
    let mut raw = Raw::connect(kw.port()).await;
    let body = String::from_utf8(blob_body(&raw.call(&[b"INFO", b"keyward"]).await)).unwrap();
    let fields = keyward_fields(&body);
    assert_eq!(fields["failovers"], "1", "{body}");
    assert_eq!(fields["master"], new, "{body}");
}

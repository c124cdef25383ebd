//! Near-cache measurements that need more precision than redis-benchmark
//! (driven by `scripts/bench cache`, usable on its own).
//!
//! ```text
//! cargo run --release --example cache_bench -- SUBCOMMAND [flags]
//!
//! preload       --port P --keys N [--value-size B]
//!     SET key:000000000000 .. key:<N-1> (redis-benchmark's key names) to B
//!     bytes of 'x', pipelined on one connection.
//! load          --port P --admin-port A --keys N [--zipf S] [--secs T]
//!               [--measure-secs M] [--conns C] [--pipeline D] [--seed X]
//!               [--wait-ready]
//!     GETs from C connections, D in flight each (like redis-benchmark -P),
//!     on keys drawn uniformly (like -r N) or Zipf(S) over N keys (rank r =
//!     key r), for T s; /metrics is scraped M s before the end and at the
//!     end (M = T: before the start and after the last reply), and the
//!     near-cache counters' deltas over that span are reported.
//! first-second  same flags; `load --secs 1 --measure-secs 1 --wait-ready`:
//!     polls /ready every 2 ms, then at once GETs for exactly 1 s and reports
//!     the first second's cache hits and misses.
//! staleness     --port P --redis-port R [--admin-port A] [--secs 5]
//!               [--interval-ms 10] [--warm-secs 3]
//!     One key kept hot through keyward by a reader looping GETs; a writer
//!     SETs 1, 2, 3, ... directly on Redis every interval; the staleness of
//!     write i is the time from its acknowledgement until a reader first
//!     sees a value >= i (0 if seen before the ack). A second reader on Redis
//!     directly gives the measurement floor. Values going backwards are
//!     counted as regressions (a coherence bug). With --admin-port the
//!     reads start once the key is served from the cache (hits rising) and
//!     the cache counters are reported; without it, after --warm-secs of
//!     reads (e.g. through a keyward with the cache off, as a control).
//! ```
//!
//! Results: one line of `name=value` pairs on stdout (for scripts); notes on
//! stderr. Key names and request bytes are exactly redis-benchmark's
//! (`*2\r\n$3\r\nGET\r\n$16\r\nkey:000000000042\r\n`): the near cache is
//! keyed by request bytes, so a warm-up list saved under redis-benchmark's
//! traffic is hit by this tool's and the other way round.
//!
//! Ratios: `hit_ratio` = hits / (hits + misses), keyward's own metric,
//! which counts only requests on keys it calls hot; `served` = hits /
//! requests sent, the share of all requests answered from the cache.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../benches/support/zipf.rs"]
mod zipf;

use zipf::{XorShift, Zipf};

type Res<T> = Result<T, String>;

// ------------------------------------------------------------------ args --

struct Flags(BTreeMap<String, Option<String>>);

impl Flags {
    fn parse(args: &[String]) -> Res<Flags> {
        const SWITCHES: &[&str] = &["--wait-ready"];
        let mut map = BTreeMap::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if !flag.starts_with("--") {
                return Err(format!("unexpected argument {flag}"));
            }
            if SWITCHES.contains(&flag.as_str()) {
                map.insert(flag.clone(), None);
            } else {
                let value = it.next().ok_or(format!("{flag} needs a value"))?;
                map.insert(flag.clone(), Some(value.clone()));
            }
        }
        Ok(Flags(map))
    }

    fn get<T: std::str::FromStr>(&mut self, name: &str, default: Option<T>) -> Res<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.remove(name) {
            Some(Some(v)) => v.parse().map_err(|e| format!("{name} {v}: {e}")),
            Some(None) => Err(format!("{name} needs a value")),
            None => default.ok_or(format!("{name} is required")),
        }
    }

    fn opt<T: std::str::FromStr>(&mut self, name: &str) -> Res<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.contains_key(name) {
            true => self.get(name, None).map(Some),
            false => Ok(None),
        }
    }

    fn switch(&mut self, name: &str) -> bool {
        self.0.remove(name).is_some()
    }

    fn done(self) -> Res<()> {
        match self.0.keys().next() {
            Some(k) => Err(format!("unknown or repeated flag {k}")),
            None => Ok(()),
        }
    }
}

// ------------------------------------------------------------------ RESP --

/// redis-benchmark's name for key `n` (`key:__rand_int__`, 12 digits).
fn key_name(n: usize) -> String {
    format!("key:{n:012}")
}

fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

enum Reply {
    /// A bulk string's bytes (a range of the buffer), or None for a null.
    Bulk(Option<Range<usize>>),
    Int,
    Simple,
    Error(String),
}

/// The first complete reply in `buf`: its length and what it is. Only the
/// scalar replies GET, SET and PING can produce.
fn parse_reply(buf: &[u8]) -> Res<Option<(usize, Reply)>> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        return Ok(None);
    };
    if nl < 2 || buf[nl - 1] != b'\r' {
        return Err("malformed reply line".into());
    }
    let line = &buf[1..nl - 1];
    let text = || String::from_utf8_lossy(line).into_owned();
    match buf[0] {
        b'+' => Ok(Some((nl + 1, Reply::Simple))),
        b':' => Ok(Some((nl + 1, Reply::Int))),
        b'-' => Ok(Some((nl + 1, Reply::Error(text())))),
        b'_' => Ok(Some((nl + 1, Reply::Bulk(None)))),
        b'$' => {
            let n: i64 = text()
                .parse()
                .map_err(|_| format!("bad bulk length {}", text()))?;
            if n < 0 {
                return Ok(Some((nl + 1, Reply::Bulk(None))));
            }
            let start = nl + 1;
            let end = start + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Ok(Some((end + 2, Reply::Bulk(Some(start..end)))))
        }
        other => Err(format!("unexpected reply type {:?}", other as char)),
    }
}

/// A connection that sends requests and counts or returns replies.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(port: u16) -> Res<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Res<()> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    async fn fill(&mut self) -> Res<()> {
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Read `n` replies; returns how many were errors (the first is kept).
    async fn drain(&mut self, n: usize, first_error: &mut Option<String>) -> Res<u64> {
        let mut got = 0;
        let mut errors = 0;
        while got < n {
            while let Some((len, reply)) = parse_reply(&self.buf)? {
                if let Reply::Error(e) = reply {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
                self.buf.advance(len);
                got += 1;
                if got == n {
                    return Ok(errors);
                }
            }
            self.fill().await?;
        }
        Ok(errors)
    }

    /// One request, one reply: the bulk string's bytes (None for a null).
    async fn call(&mut self, request: &[u8]) -> Res<Option<Vec<u8>>> {
        self.send(request).await?;
        loop {
            if let Some((len, reply)) = parse_reply(&self.buf)? {
                let out = match reply {
                    Reply::Bulk(Some(r)) => Some(self.buf[r].to_vec()),
                    Reply::Bulk(None) => None,
                    Reply::Int | Reply::Simple => Some(Vec::new()),
                    Reply::Error(e) => return Err(format!("error reply: {e}")),
                };
                self.buf.advance(len);
                return Ok(out);
            }
            self.fill().await?;
        }
    }
}

// ------------------------------------------------------------------ HTTP --

/// GET `path` on the admin listener: (status, body).
async fn http_get(port: u16, path: &str) -> Res<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect admin 127.0.0.1:{port}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad HTTP response from {path}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// Every sample of a Prometheus text exposition, by name with labels.
type Metrics = BTreeMap<String, f64>;

async fn metrics(port: u16) -> Res<Metrics> {
    let (status, body) = http_get(port, "/metrics").await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    Ok(body
        .lines()
        .filter(|l| l.starts_with("keyward_"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn metric(m: &Metrics, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// Deltas of the near-cache counters (`keyward_cache_*_total`), as
/// `name=value` pairs (labels flattened: `flushes_link`).
fn cache_deltas(before: &Metrics, after: &Metrics) -> Vec<(String, f64)> {
    after
        .iter()
        .filter(|(k, _)| k.starts_with("keyward_cache_") && k.contains("_total"))
        .map(|(k, v)| {
            let short = k
                .trim_start_matches("keyward_cache_")
                .replace("_total", "")
                .replace("{reason=\"", "_")
                .replace(['"', '}'], "");
            (short, v - metric(before, k))
        })
        .collect()
}

async fn wait_ready(admin: u16, timeout: Duration) -> Res<Duration> {
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(admin, "/ready").await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(format!("/ready not 200 within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// --------------------------------------------------------------- preload --

async fn preload(mut f: Flags) -> Res<()> {
    let port: u16 = f.get("--port", None)?;
    let keys: usize = f.get("--keys", None)?;
    let size: usize = f.get("--value-size", Some(3))?;
    f.done()?;
    let value = vec![b'x'; size];
    let mut c = Conn::open(port).await?;
    let mut first_error = None;
    let mut errors = 0;
    let mut out = Vec::new();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1000) {
        out.clear();
        for &n in chunk {
            command(&mut out, &[b"SET", key_name(n).as_bytes(), &value]);
        }
        c.send(&out).await?;
        errors += c.drain(chunk.len(), &mut first_error).await?;
    }
    if let Some(e) = first_error {
        return Err(format!("{errors} SETs failed, first: {e}"));
    }
    println!("keys={keys} value_size={size}");
    Ok(())
}

// ------------------------------------------------------------------ load --

struct Load {
    done: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

#[allow(clippy::too_many_arguments)]
async fn load_conn(
    mut c: Conn,
    requests: Arc<Vec<Vec<u8>>>,
    zipf: Option<Arc<Zipf>>,
    seed: u64,
    pipeline: usize,
    mut go: tokio::sync::watch::Receiver<bool>,
    state: Arc<Load>,
) -> Res<Option<String>> {
    let mut rng = XorShift::new(seed);
    let n = requests.len();
    let mut out = Vec::with_capacity(pipeline * 40);
    let mut first_error = None;
    go.wait_for(|&started| started)
        .await
        .map_err(|e| e.to_string())?;
    while !state.stop.load(Ordering::Relaxed) {
        out.clear();
        for _ in 0..pipeline {
            let k = match &zipf {
                Some(z) => z.sample(&mut rng),
                None => (rng.next_f64() * n as f64) as usize % n,
            };
            out.extend_from_slice(&requests[k]);
        }
        c.send(&out).await?;
        let errors = c.drain(pipeline, &mut first_error).await?;
        state.errors.fetch_add(errors, Ordering::Relaxed);
        state.done.fetch_add(pipeline as u64, Ordering::Relaxed);
    }
    Ok(first_error)
}

async fn load(mut f: Flags, first_second: bool) -> Res<()> {
    let port: u16 = f.get("--port", None)?;
    let admin: u16 = f.get("--admin-port", None)?;
    let keys: usize = f.get("--keys", None)?;
    let s: Option<f64> = f.opt("--zipf")?;
    let default_secs = if first_second { 1.0 } else { 8.0 };
    let secs: f64 = f.get("--secs", Some(default_secs))?;
    let measure: f64 = f.get("--measure-secs", Some(secs))?;
    let conns: usize = f.get("--conns", Some(8))?;
    let pipeline: usize = f.get("--pipeline", Some(16))?;
    let seed: u64 = f.get("--seed", Some(0x5eed))?;
    let ready = f.switch("--wait-ready") || first_second;
    f.done()?;
    if keys == 0 || conns == 0 || pipeline == 0 || secs <= 0.0 || measure <= 0.0 || measure > secs {
        return Err(
            "--keys, --conns, --pipeline, --secs must be positive and --measure-secs in (0, secs]"
                .into(),
        );
    }

    let ready_wait = if ready {
        Some(wait_ready(admin, Duration::from_secs(60)).await?)
    } else {
        None
    };
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..keys)
            .map(|n| {
                let mut r = Vec::new();
                command(&mut r, &[b"GET", key_name(n).as_bytes()]);
                r
            })
            .collect(),
    );
    let zipf = s.map(|s| Arc::new(Zipf::new(keys, s)));
    let state = Arc::new(Load {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let (go, started) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let c = Conn::open(port).await?;
        tasks.push(tokio::spawn(load_conn(
            c,
            requests.clone(),
            zipf.clone(),
            seed.wrapping_add(i as u64 * 0x9e37_79b9),
            pipeline,
            started.clone(),
            state.clone(),
        )));
    }
    let whole = measure >= secs;
    let mut before = if whole {
        Some(metrics(admin).await?)
    } else {
        None
    };
    let start = Instant::now();
    go.send_replace(true);
    let mut done_before = 0;
    let mut measured_from = start;
    if !whole {
        tokio::time::sleep(Duration::from_secs_f64(secs - measure)).await;
        done_before = state.done.load(Ordering::Relaxed);
        measured_from = Instant::now();
        before = Some(metrics(admin).await?);
    }
    tokio::time::sleep_until((start + Duration::from_secs_f64(secs)).into()).await;
    let mut after = None;
    let mut done_after = 0;
    if !whole {
        after = Some(metrics(admin).await?);
        done_after = state.done.load(Ordering::Relaxed);
    }
    let measured = measured_from.elapsed();
    state.stop.store(true, Ordering::Relaxed);
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(e)) => first_error = first_error.or(e),
            Ok(Err(e)) => return Err(format!("a connection failed: {e}")),
            Err(e) => return Err(format!("a connection task failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let (before, after, requests, span) = match (before, after) {
        (Some(b), Some(a)) => (b, a, done_after - done_before, measured),
        (Some(b), None) => (
            b,
            metrics(admin).await?,
            state.done.load(Ordering::Relaxed),
            elapsed,
        ),
        _ => unreachable!("before is always scraped"),
    };
    let d = cache_deltas(&before, &after);
    let get = |name: &str| d.iter().find(|(k, _)| k == name).map_or(0.0, |(_, v)| *v);
    let (hits, misses) = (get("hits"), get("misses"));
    let errors = state.errors.load(Ordering::Relaxed);
    let mut line = vec![
        format!(
            "mode={}",
            if first_second { "first-second" } else { "load" }
        ),
        format!(
            "dist={}",
            s.map_or("uniform".to_string(), |s| format!("zipf{s}"))
        ),
        format!("keys={keys}"),
        format!("conns={conns}"),
        format!("pipeline={pipeline}"),
        format!("secs={:.3}", span.as_secs_f64()),
        format!("requests={requests}"),
        format!("rps={:.0}", requests as f64 / span.as_secs_f64()),
        format!("errors={errors}"),
        format!("hit_ratio={:.4}", ratio(hits, hits + misses)),
        format!("served={:.4}", ratio(hits, requests as f64)),
        format!("hot={}", metric(&after, "keyward_hotkeys_hot")),
        format!("entries={}", metric(&after, "keyward_cache_entries")),
    ];
    if let Some(w) = ready_wait {
        line.push(format!("ready_wait_ms={}", w.as_millis()));
    }
    line.extend(d.iter().map(|(k, v)| format!("{k}={v}")));
    println!("{}", line.join(" "));
    if let Some(e) = first_error {
        eprintln!("cache_bench: {errors} error replies, first: {e}");
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

// ------------------------------------------------------------- staleness --

/// Loop GETs of `request` until `stop`; for each sequence number i in
/// 1..=n, the first time a value >= i was seen. Also: reads, regressions.
async fn reader(
    mut c: Conn,
    request: Vec<u8>,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Res<(Vec<Option<Instant>>, u64, u64)> {
    let mut seen = vec![None; n + 1];
    let mut last = 0usize;
    let mut reads = 0;
    let mut regressions = 0;
    while !stop.load(Ordering::Relaxed) {
        let v = c.call(&request).await?.unwrap_or_default();
        let now = Instant::now();
        reads += 1;
        let v: usize = std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a non-numeric value")?;
        if v > last {
            for s in seen.iter_mut().take(v.min(n) + 1).skip(last + 1) {
                *s = Some(now);
            }
            last = v;
        } else if v < last {
            regressions += 1;
        }
    }
    Ok((seen, reads, regressions))
}

struct Stale {
    p50: Duration,
    p99: Duration,
    max: Duration,
    unseen: usize,
}

fn staleness_of(acked: &[Instant], seen: &[Option<Instant>]) -> Stale {
    let mut v: Vec<Duration> = Vec::new();
    let mut unseen = 0;
    for (i, a) in acked.iter().enumerate() {
        match seen[i + 1] {
            Some(s) => v.push(s.saturating_duration_since(*a)),
            None => unseen += 1,
        }
    }
    v.sort();
    let pct = |q: f64| {
        if v.is_empty() {
            Duration::ZERO
        } else {
            v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        }
    };
    Stale {
        p50: pct(0.50),
        p99: pct(0.99),
        max: v.last().copied().unwrap_or_default(),
        unseen,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

async fn staleness(mut f: Flags) -> Res<()> {
    let port: u16 = f.get("--port", None)?;
    let redis: u16 = f.get("--redis-port", None)?;
    let admin: Option<u16> = f.opt("--admin-port")?;
    let secs: f64 = f.get("--secs", Some(5.0))?;
    let interval: u64 = f.get("--interval-ms", Some(10))?;
    let warm: f64 = f.get("--warm-secs", Some(3.0))?;
    f.done()?;
    let key = b"keyward:bench:stale";
    let mut get = Vec::new();
    command(&mut get, &[b"GET", key]);
    let n = ((secs * 1000.0) / interval.max(1) as f64) as usize;

    let mut writer = Conn::open(redis).await?;
    let mut set = Vec::new();
    command(&mut set, &[b"SET", key, b"0"]);
    writer.call(&set).await?;

    // Warm: read through keyward until the key is served from the cache
    // (hits rising), for at least --warm-secs, at most 20 s.
    let mut kw = Conn::open(port).await?;
    let start = Instant::now();
    let mut cached = admin.is_none();
    let mut last_hits = None;
    let mut next_check = start;
    while start.elapsed() < Duration::from_secs_f64(warm) || !cached {
        if start.elapsed() > Duration::from_secs(20) {
            eprintln!("cache_bench: the key never became cached (no rising hits in 20 s)");
            break;
        }
        kw.call(&get).await?;
        if let (Some(a), true) = (admin, Instant::now() >= next_check) {
            next_check = Instant::now() + Duration::from_millis(250);
            let hits = metric(&metrics(a).await?, "keyward_cache_hits_total");
            cached = last_hits.is_some_and(|h| hits > h);
            last_hits = Some(hits);
        }
    }
    let warmed = start.elapsed();

    let before = match admin {
        Some(a) => Some(metrics(a).await?),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let via_keyward = tokio::spawn(reader(kw, get.clone(), n, stop.clone()));
    let direct = tokio::spawn(reader(
        Conn::open(redis).await?,
        get.clone(),
        n,
        stop.clone(),
    ));
    let t0 = tokio::time::Instant::now();
    let mut acked = Vec::with_capacity(n);
    for i in 1..=n {
        tokio::time::sleep_until(t0 + Duration::from_millis(i as u64 * interval)).await;
        let mut set = Vec::new();
        command(&mut set, &[b"SET", key, i.to_string().as_bytes()]);
        writer.call(&set).await?;
        acked.push(Instant::now());
    }
    // Give the readers time to see the last write.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let join = |r: Result<Res<_>, tokio::task::JoinError>| r.map_err(|e| e.to_string())?;
    let (seen_kw, reads_kw, regress_kw) = join(via_keyward.await)?;
    let (seen_direct, reads_direct, regress_direct) = join(direct.await)?;
    let span = Duration::from_millis(n as u64 * interval) + Duration::from_millis(200);
    let k = staleness_of(&acked, &seen_kw);
    let d = staleness_of(&acked, &seen_direct);
    let mut line = vec![
        format!("writes={n}"),
        format!("interval_ms={interval}"),
        format!("warm_ms={}", warmed.as_millis()),
        format!("kw_p50_ms={}", ms(k.p50)),
        format!("kw_p99_ms={}", ms(k.p99)),
        format!("kw_max_ms={}", ms(k.max)),
        format!("kw_unseen={}", k.unseen),
        format!("kw_regressions={regress_kw}"),
        format!("kw_reads_per_s={:.0}", reads_kw as f64 / span.as_secs_f64()),
        format!("direct_p50_ms={}", ms(d.p50)),
        format!("direct_p99_ms={}", ms(d.p99)),
        format!("direct_max_ms={}", ms(d.max)),
        format!("direct_unseen={}", d.unseen),
        format!("direct_regressions={regress_direct}"),
        format!(
            "direct_reads_per_s={:.0}",
            reads_direct as f64 / span.as_secs_f64()
        ),
    ];
    if let (Some(a), Some(before)) = (admin, before) {
        let after = metrics(a).await?;
        let d = cache_deltas(&before, &after);
        let get = |name: &str| d.iter().find(|(k, _)| k == name).map_or(0.0, |(_, v)| *v);
        line.push(format!(
            "hit_ratio={:.4}",
            ratio(get("hits"), get("hits") + get("misses"))
        ));
        line.extend(d.iter().map(|(k, v)| format!("{k}={v}")));
    }
    println!("{}", line.join(" "));
    Ok(())
}

// ------------------------------------------------------------------ main --

fn usage() -> &'static str {
    "usage: cache_bench preload|load|first-second|staleness [--flag value]... (see the file's header)"
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(sub) = args.first() else {
        eprintln!("{}", usage());
        std::process::exit(2);
    };
    let flags = match Flags::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cache_bench: {e}\n{}", usage());
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cache_bench: runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match sub.as_str() {
            "preload" => preload(flags).await,
            "load" => load(flags, false).await,
            "first-second" => load(flags, true).await,
            "staleness" => staleness(flags).await,
            "-h" | "--help" => {
                println!("{}", usage());
                Ok(())
            }
            other => Err(format!("unknown subcommand {other}\n{}", usage())),
        }
    });
    if let Err(e) = result {
        eprintln!("cache_bench: {e}");
        std::process::exit(1);
    }
    let _ = io::Write::flush(&mut io::stdout());
}

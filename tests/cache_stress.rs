//! The near cache under stress (DESIGN.md decision 7), as a client sees it:
//! read-your-writes ten thousand times while another client hammers the same
//! hot key, no stale value after a Sentinel failover, a bounded memory
//! footprint over millions of hits, MGET answered per key with Redis's own
//! bytes, and a new instance joining a fleet warm.
//!
//! Every test starts its own redis-server (and Sentinels) and keyward. Keys
//! are made hot quickly with a config of 200 ms windows and a threshold of
//! 100 ops/s; whether a reply came from the cache is decided from what a user
//! can observe: `KEYWARD CACHE` counters, and Redis's own `INFO commandstats`
//! not counting the request.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Fast hot-key detection (two 200 ms windows at 100 ops/s make a key hot),
/// keys stay hot through short lulls (50 quiet windows to leave). Each test
/// adds `fleet = ...` itself.
const HOTKEYS: &str =
    "[hotkeys]\nwindow_ms = 200\nthreshold = 100\nenter_windows = 2\nleave_windows = 50\n";

/// keyward's config after the upstream: fast hot keys plus `hotkeys` (more
/// lines of that section, e.g. `fleet = false`), then `extra` (e.g. a
/// `[cache]` section).
fn config(hotkeys: &str, extra: &str) -> String {
    format!("{HOTKEYS}{hotkeys}{extra}")
}

/// `KEYWARD CACHE` through a RESP2 connection, parsed.
async fn keyward_cache(conn: &mut Raw) -> Reply {
    let r = conn.call(&[b"KEYWARD", b"CACHE"]).await;
    parse_reply(&r).unwrap_or_else(|e| panic!("KEYWARD CACHE: {e}; reply {}", esc(&r)))
}

/// One counter of `KEYWARD CACHE` ("hits", "misses", "entries", ...).
fn counter(stats: &Reply, name: &str) -> u64 {
    stats
        .field(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("KEYWARD CACHE has no counter {name:?}: {stats:?}"))
}

/// `KEYWARD CACHE` on a fresh connection to `kw`.
async fn cache_counter(kw: &Keyward, name: &str) -> u64 {
    let mut c = Raw::connect(kw.port()).await;
    counter(&keyward_cache(&mut c).await, name)
}

/// keyward's `GET /cache`, parsed.
async fn cache_json(kw: &Keyward) -> Json {
    let admin = kw.admin_port();
    let (status, body) = blocking(|| http_get(admin, "/cache?count=1000"));
    assert_eq!(status, 200, "GET /cache: {body}");
    Json::parse(&body).unwrap_or_else(|e| panic!("GET /cache is not JSON ({e}): {body}"))
}

/// Sum of `/cache`'s `flushes` (every reason).
fn flushes_total(cache: &Json) -> u64 {
    match cache.get("flushes") {
        Some(Json::Obj(m)) => m
            .iter()
            .map(|(_, v)| match v {
                Json::Num(n) => *n as u64,
                _ => 0,
            })
            .sum(),
        other => panic!("/cache has no flushes object: {other:?}"),
    }
}

/// Keys `/cache` lists as cached now.
fn cached_keys(cache: &Json) -> Vec<String> {
    match cache.get("keys") {
        Some(Json::Arr(a)) => a
            .iter()
            .filter_map(|k| match k {
                Json::Arr(t) => t.first().and_then(Json::as_str).map(str::to_string),
                _ => None,
            })
            .collect(),
        other => panic!("/cache has no keys array: {other:?}"),
    }
}

/// Wait until `KEYWARD CACHE` hits exceed `above`; returns the count seen.
async fn wait_hits_above(kw: &Keyward, above: u64, what: &str) -> u64 {
    let mut conn = Raw::connect(kw.port()).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stats = keyward_cache(&mut conn).await;
        let hits = counter(&stats, "hits");
        if hits > above {
            return hits;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: KEYWARD CACHE hits stayed at {hits} (want > {above}) for {DEADLINE:?}; \
             last KEYWARD CACHE {stats:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Read-your-writes x10,000 under a hammering reader
// ---------------------------------------------------------------------------

/// `v<i>` -> i.
fn version_of(reply: &[u8]) -> Option<u64> {
    let nl = reply.iter().position(|&b| b == b'\n')?;
    let body = reply.get(nl + 1..reply.len().checked_sub(2)?)?;
    std::str::from_utf8(body.strip_prefix(b"v")?)
        .ok()?
        .parse()
        .ok()
}

/// Pipelined `GET key` through keyward until `stop`: every reply must be a
/// `v<i>` with i never smaller than one already seen on this connection.
/// Returns (reads, highest i seen).
async fn hammer(port: u16, key: &'static [u8], stop: Arc<AtomicBool>) -> (u64, u64) {
    const BATCH: usize = 64;
    let batch: Vec<u8> = (0..BATCH).flat_map(|_| cmd(&[b"GET", key])).collect();
    let mut raw = Raw::connect(port).await;
    let (mut reads, mut last) = (0u64, 0u64);
    while !stop.load(Ordering::Acquire) {
        raw.send(&batch).await;
        for reply in raw.read_replies(BATCH).await {
            let v = version_of(&reply).unwrap_or_else(|| {
                panic!(
                    "hammer: GET {} through keyward returned {} (want v<i>)",
                    esc(key),
                    esc(&reply)
                )
            });
            assert!(
                v >= last,
                "hammer: GET {} went back in time: v{v} after v{last} had been read \
                 (read #{reads} on this connection)",
                esc(key)
            );
            last = v;
            reads += 1;
        }
    }
    (reads, last)
}

/// One client does 10,000 `SET k v<i>` + `GET k` pairs on a hot, cached key
/// and always reads its own write, while a second client hammers `GET k`
/// (pipelined) and never sees the value go backwards. The cache must have
/// served hits meanwhile, or the run proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_10k_under_a_hammering_reader() {
    const KEY: &[u8] = b"ryw";
    const PAIRS: u64 = 10_000;
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", KEY, b"v0"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config("fleet = false\n", ""), &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(hammer(kw.port(), KEY, stop.clone()));
    // The hammer makes the key hot; wait until it is served from the cache.
    wait_hits_above(&kw, 0, "the hammered key is cached").await;

    let mut stats_conn = Raw::connect(kw.port()).await;
    let before = keyward_cache(&mut stats_conn).await;
    let mut writer = Raw::connect(kw.port()).await;
    let started = Instant::now();
    for i in 1..=PAIRS {
        let v = format!("v{i}");
        assert_eq!(
            esc(&writer.call(&[b"SET", KEY, v.as_bytes()]).await),
            esc(b"+OK\r\n"),
            "SET {} {v}",
            esc(KEY)
        );
        assert_eq!(
            esc(&writer.call(&[b"GET", KEY]).await),
            esc(&bulk(v.as_bytes())),
            "GET {} right after SET {v} was acknowledged (pair {i} of {PAIRS})",
            esc(KEY)
        );
        if i % 500 == 0 && reader.is_finished() {
            break; // the hammer failed: surface its panic below
        }
    }
    let took = started.elapsed();
    let after = keyward_cache(&mut stats_conn).await;
    stop.store(true, Ordering::Release);
    let (reads, last) = match tokio::time::timeout(DEADLINE, reader).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("the hammer did not stop within {DEADLINE:?}"),
    };
    let hits = counter(&after, "hits") - counter(&before, "hits");
    let misses = counter(&after, "misses") - counter(&before, "misses");
    let fills = counter(&after, "fills") - counter(&before, "fills");
    let voided = counter(&after, "fills-voided") - counter(&before, "fills-voided");
    eprintln!(
        "read-your-writes: {PAIRS} SET+GET pairs in {took:?}; hammer read {reads} times \
         (last v{last}); during the pairs: {hits} cache hits, {misses} misses, {fills} fills, \
         {voided} fills voided"
    );
    assert_eq!(
        last, PAIRS,
        "the hammer's last read should be the final write"
    );
    assert!(
        hits > 0,
        "the cache served no hits while the pairs ran: the run proves nothing \
         (before {before:?}, after {after:?})"
    );
}

// ---------------------------------------------------------------------------
// 2. No stale value after a Sentinel failover
// ---------------------------------------------------------------------------

/// A hot key cached with v1 on the old master; a planned Sentinel failover;
/// v2 written straight to the new master as soon as it is promoted. Reads
/// through keyward reach v2, and none that started after keyward's
/// `/topology` named the new master and after v2 was acknowledged returns
/// v1. The failover flushed the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_value_after_a_sentinel_failover() {
    const KEY: &[u8] = b"fk";
    let (master, replica, sentinels) = blocking(|| {
        let master = Redis::start();
        assert_eq!(esc(&master.call(&[b"SET", KEY, b"v1"])), esc(b"+OK\r\n"));
        let replica = Redis::start_replica_of(&master);
        let sentinels = Sentinels::start_down_after(&master, 1000);
        (master, replica, sentinels)
    });
    blocking(|| {
        wait_until_sync("the replica has fk = v1", DEADLINE, || {
            replica.call(&[b"GET", KEY]) == bulk(b"v1")
        })
    });
    let toml = format!("{HOTKEYS}fleet = false\n[cache]\nmax_ttl_ms = 30000\n");
    let kw = blocking(|| start_keyward_sentinel_config(&sentinels, &toml));
    wait_ready(&kw, READY_LIMIT).await;
    let topo = blocking(|| get_topology(kw.admin_port())).expect("/topology");
    assert_eq!(
        topo.master.as_deref(),
        Some(master.addr().as_str()),
        "{}",
        topo.raw
    );

    let reader = ClientLoop::reader(kw.port(), KEY);

    // Hot, cached with v1, and hits growing.
    let h1 = wait_hits_above(&kw, 0, "fk = v1 is served from the cache").await;
    wait_hits_above(&kw, h1, "cache hits keep growing before the failover").await;
    {
        let reads = reader.log();
        let bad: Vec<&Exchange> = reads
            .iter()
            .filter(|r| !matches!(&r.answer, Answer::Reply(v) if *v == bulk(b"v1")))
            .collect();
        assert!(
            bad.is_empty(),
            "before the failover every read should be v1: {:?}",
            &bad[..bad.len().min(5)]
        );
    }
    let flushes_before = flushes_total(&cache_json(&kw).await);

    let t_failover = Instant::now();
    blocking(|| sentinels.failover());
    blocking(|| wait_role(replica.port(), "master", SWITCH_LIMIT));
    let set = blocking(|| redis_cmd(replica.port(), &[b"SET", KEY, b"v2"]));
    let t_v2 = Instant::now();
    assert_eq!(esc(&set), esc(b"+OK\r\n"), "SET fk v2 on the new master");

    let new = replica.addr();
    let admin = kw.admin_port();
    wait_until("keyward's /topology names the new master", DEADLINE, || {
        let new = new.clone();
        async move {
            blocking(|| get_topology(admin))
                .map(|t| t.master.as_deref() == Some(new.as_str()))
                .unwrap_or(false)
        }
    })
    .await;
    let t_topo = Instant::now();
    let cutoff = t_topo.max(t_v2);

    wait_until("a read through keyward returns v2", DEADLINE, || {
        let reader = &reader;
        async move {
            reader.log().iter().any(|r| {
                r.sent >= cutoff && matches!(&r.answer, Answer::Reply(v) if *v == bulk(b"v2"))
            })
        }
    })
    .await;
    let t_seen_v2 = Instant::now();
    // Keep reading for a while on the new master (the cache refills there).
    wait_until("1000 reads after the cutoff", DEADLINE, || {
        let reader = &reader;
        async move { reader.log().iter().filter(|r| r.sent >= cutoff).count() >= 1000 }
    })
    .await;
    let reads = reader.stop().await;
    let cache_after = cache_json(&kw).await;
    let flushes_after = flushes_total(&cache_after);

    let after: Vec<&Exchange> = reads.iter().filter(|r| r.sent >= cutoff).collect();
    let stale: Vec<&Exchange> = after
        .iter()
        .copied()
        .filter(|r| matches!(&r.answer, Answer::Reply(v) if *v == bulk(b"v1")))
        .collect();
    let v1_total = reads
        .iter()
        .filter(|r| {
            r.sent >= t_failover && matches!(&r.answer, Answer::Reply(v) if *v == bulk(b"v1"))
        })
        .count();
    let odd: Vec<String> = reads
        .iter()
        .filter(
            |r| !matches!(&r.answer, Answer::Reply(v) if *v == bulk(b"v1") || *v == bulk(b"v2")),
        )
        .map(|r| format!("{:?}", r.answer))
        .take(10)
        .collect();
    let drops: Vec<&str> = reads
        .iter()
        .filter_map(|r| match &r.answer {
            Answer::Closed(e) => Some(e.as_str()),
            _ => None,
        })
        .take(5)
        .collect();
    let slowest = reads
        .iter()
        .map(|r| r.answered.duration_since(r.sent))
        .max()
        .unwrap_or_default();
    eprintln!(
        "failover: replica promoted and v2 acked {:?} after SENTINEL FAILOVER; /topology \
         switched {:?} after the v2 ack; first v2 through keyward seen {:?} after the cutoff; \
         {} reads in all, {} since the failover returned v1, {} after the cutoff; \
         non-v1/v2 answers {odd:?}; connection drops {drops:?}; slowest read {slowest:?}; flushes {flushes_before} -> \
         {flushes_after} ({:?}); hits now {:?}",
        t_v2.duration_since(t_failover),
        t_topo.saturating_duration_since(t_v2),
        t_seen_v2.duration_since(cutoff),
        reads.len(),
        v1_total,
        after.len(),
        cache_after.get("flushes"),
        cache_after.get("hits"),
    );
    assert!(
        stale.is_empty(),
        "{} of {} reads through keyward that started after /topology named the new master \
         and after SET fk v2 was acknowledged returned the old value v1; first at +{:?} after \
         the cutoff",
        stale.len(),
        after.len(),
        stale[0].sent.duration_since(cutoff)
    );
    assert!(
        flushes_after > flushes_before,
        "the failover did not flush the near cache: /cache flushes {flushes_before} -> \
         {flushes_after}"
    );
}

// ---------------------------------------------------------------------------
// 3. Memory stays bounded
// ---------------------------------------------------------------------------

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// A connection sending the same pipelined batch of GETs over and over and
/// checking each batch's replies with one comparison against Redis's bytes.
async fn hit_worker(
    port: u16,
    request: Arc<Vec<u8>>,
    expected: Arc<Vec<u8>>,
    per_batch: u64,
    budget: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to keyward");
    s.set_nodelay(true).expect("set_nodelay");
    let mut buf = vec![0u8; expected.len()];
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        // Claim a batch from the shared budget.
        if budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(per_batch)
            })
            .is_err()
        {
            return;
        }
        s.write_all(&request).await.expect("write batch");
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("a batch's replies did not arrive within {DEADLINE:?}"))
            .expect("read batch replies");
        if buf != *expected {
            let at = buf
                .iter()
                .zip(expected.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let from = at.saturating_sub(40);
            panic!(
                "wrong reply bytes at offset {at} of a batch: got {} want {}",
                esc(&buf[from..(at + 80).min(buf.len())]),
                esc(&expected[from..(at + 80).min(expected.len())])
            );
        }
        done.fetch_add(per_batch, Ordering::AcqRel);
    }
}

/// Send one pipelined batch on `s` and check its replies against `expected`.
async fn batch_once(s: &mut TcpStream, request: &[u8], expected: &[u8], buf: &mut Vec<u8>) {
    buf.resize(expected.len(), 0);
    s.write_all(request).await.expect("write batch");
    tokio::time::timeout(DEADLINE, s.read_exact(buf))
        .await
        .unwrap_or_else(|_| panic!("a batch's replies did not arrive within {DEADLINE:?}"))
        .expect("read batch replies");
    assert!(buf == expected, "wrong replies to the warm-up batch");
}

/// `--cache-mb 16`, 100 hot keys with ~100-byte values, all cached, then up
/// to 10,000,000 cache hits over a few pipelined connections: keyward's RSS
/// at the end stays within the cache budget plus a fixed overhead of its RSS
/// after warm-up, and the GETs were counted as hits. If 10M would take more
/// than 3 minutes (a debug build), as many as fit in 90 s are sent instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_over_millions_of_hits() {
    const KEYS: usize = 100;
    const CONNS: usize = 4;
    const PER_BATCH: usize = 1000;
    const TARGET: u64 = 10_000_000;
    const WARM: u64 = 100_000;
    const BUDGET_MIB: u64 = 16;
    const OVERHEAD_MIB: u64 = 32;
    let redis = Redis::start();
    let value_of = |i: usize| format!("{i:03}-{}", "x".repeat(96)).into_bytes();
    let key_of = |i: usize| format!("mem:{i}").into_bytes();
    for i in 0..KEYS {
        assert_eq!(
            esc(&redis.call(&[b"SET", &key_of(i), &value_of(i)])),
            esc(b"+OK\r\n")
        );
    }
    let kw = Keyward::start_for(
        &redis,
        &config("fleet = false\ntop_k = 200\n", ""),
        &["--cache-mb", "16"],
    );

    // One batch: PER_BATCH GETs cycling over the keys; its replies are fixed.
    let (mut request, mut expected) = (Vec::new(), Vec::new());
    for j in 0..PER_BATCH {
        let i = j % KEYS;
        request.extend(cmd(&[b"GET", &key_of(i)]));
        expected.extend(bulk(&value_of(i)));
    }
    let (request, expected) = (Arc::new(request), Arc::new(expected));

    // Make every key hot and cached.
    let mut stats = Raw::connect(kw.port()).await;
    let mut s = TcpStream::connect(("127.0.0.1", kw.port()))
        .await
        .expect("connect");
    s.set_nodelay(true).expect("set_nodelay");
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        batch_once(&mut s, &request, &expected, &mut buf).await;
        let st = keyward_cache(&mut stats).await;
        if counter(&st, "entries") >= KEYS as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all {KEYS} keys got cached within 30 s: {st:?}"
        );
    }
    drop(s);
    let s0 = keyward_cache(&mut stats).await;
    let rss0 = kw.rss_kib() * 1024;

    let budget = Arc::new(AtomicU64::new(TARGET));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<JoinHandle<()>> = (0..CONNS)
        .map(|_| {
            tokio::spawn(hit_worker(
                kw.port(),
                request.clone(),
                expected.clone(),
                PER_BATCH as u64,
                budget.clone(),
                done.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let failed = |w: &[JoinHandle<()>]| w.iter().any(|h| h.is_finished());

    // Warm-up: the first 100k hits.
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Acquire) < WARM && !failed(&workers) {
        assert!(
            Instant::now() < deadline,
            "{WARM} GETs not done within 120 s (done {})",
            done.load(Ordering::Acquire)
        );
        tokio::time::sleep(POLL).await;
    }
    let warm_rss = kw.rss_kib() * 1024;
    let warm_took = started.elapsed();
    let warm_done = done.load(Ordering::Acquire).max(1);
    let projected = warm_took.mul_f64(TARGET as f64 / warm_done as f64);
    let limited = projected > Duration::from_secs(180);
    let run_for = Duration::from_secs(90);
    // Only a deadline for a hang: the workload itself is bounded by TARGET
    // or by the 90 s run.
    let hang = started + projected.max(run_for) * 3 + Duration::from_secs(60);
    loop {
        if workers.iter().all(|h| h.is_finished()) {
            break;
        }
        if limited && started.elapsed() >= run_for {
            stop.store(true, Ordering::Release);
        }
        assert!(
            Instant::now() < hang,
            "the hit load did not finish (done {})",
            done.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        if let Err(e) = w.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let took = started.elapsed();
    let sent = done.load(Ordering::Acquire);
    let final_rss = kw.rss_kib() * 1024;
    let s1 = keyward_cache(&mut stats).await;
    let hits = counter(&s1, "hits") - counter(&s0, "hits");
    let misses = counter(&s1, "misses") - counter(&s0, "misses");
    let cache = cache_json(&kw).await;
    eprintln!(
        "memory: {sent} GETs ({}) in {took:?} ({:.0}/s; 10M projected at {projected:?} from \
         the first {warm_done} in {warm_took:?}); hits {hits}, misses {misses}; RSS before the \
         hits {:.1} MiB, after {warm_done} hits (warm) {:.1} MiB, at the end {:.1} MiB; cache \
         bytes {:?} of budget {:?}, entries {:?}",
        if limited {
            "time-limited to 90 s: 10M would take > 3 min"
        } else {
            "the full 10M"
        },
        sent as f64 / took.as_secs_f64(),
        mib(rss0),
        mib(warm_rss),
        mib(final_rss),
        cache.get("bytes"),
        cache.get("budget_bytes"),
        cache.get("entries"),
    );
    if !limited {
        assert_eq!(sent, TARGET, "every GET of the 10M was sent and answered");
    }
    let bound = warm_rss + (BUDGET_MIB + OVERHEAD_MIB) * 1024 * 1024;
    assert!(
        final_rss <= bound,
        "keyward's RSS grew from {:.1} MiB (after warm-up) to {:.1} MiB over {sent} cache hits; \
         the bound is warm + {BUDGET_MIB} MiB budget + {OVERHEAD_MIB} MiB = {:.1} MiB",
        mib(warm_rss),
        mib(final_rss),
        mib(bound)
    );
    assert!(
        hits >= sent.saturating_sub(misses),
        "KEYWARD CACHE hits grew by {hits} (misses by {misses}) over {sent} GETs of cached keys"
    );
}

// ---------------------------------------------------------------------------
// 4. MGET served per key
// ---------------------------------------------------------------------------

/// Poll `/cache` until every key in `keys` is listed as cached.
async fn wait_cached(kw: &Keyward, keys: &[&[u8]]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let cache = cache_json(kw).await;
        let cached = cached_keys(&cache);
        let missing: Vec<String> = keys
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .filter(|k| !cached.contains(k))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET replies of {missing:?} were never cached within {DEADLINE:?} while their keys \
             were read ~2,500 times/s (cached: {cached:?}); /cache: entries {:?}, fills {:?}, \
             misses {:?}",
            cache.get("entries"),
            cache.get("fills"),
            cache.get("misses"),
        );
        tokio::time::sleep(POLL).await;
    }
}

/// With the load paused: send `req` on `conn`; returns the reply, whether
/// Redis counted an MGET for it, and the KEYWARD CACHE hits it added.
async fn mget_once(
    kw: &Keyward,
    redis: &Redis,
    load: &HotLoad,
    conn: &mut Raw,
    req: &[&[u8]],
) -> (Vec<u8>, u64, u64) {
    let _paused = load.pause().await;
    mget_while_paused(kw, redis, conn, req).await
}

/// `mget_once` for a caller that already holds the load paused (so nothing
/// refills a dropped reply between its write and this MGET).
async fn mget_while_paused(
    kw: &Keyward,
    redis: &Redis,
    conn: &mut Raw,
    req: &[&[u8]],
) -> (Vec<u8>, u64, u64) {
    let calls0 = redis_calls(redis.port(), "mget");
    let hits0 = cache_counter(kw, "hits").await;
    let reply = conn.call(req).await;
    let calls1 = redis_calls(redis.port(), "mget");
    let hits1 = cache_counter(kw, "hits").await;
    (reply, calls1 - calls0, hits1 - hits0)
}

/// MGET answered from the cached GET replies of its keys, byte-identical to
/// Redis's reply in RESP2 and RESP3, without reaching Redis; a write through
/// keyward shows in the next MGET; with a key not cached MGET is forwarded.
async fn mget_served_per_key(keys: &[&[u8]]) {
    let redis = Redis::start();
    for (k, v) in [(b"a", &b"alpha"[..]), (b"b", b"bravo"), (b"c", b"charlie")] {
        assert_eq!(esc(&redis.call(&[b"SET", k, v])), esc(b"+OK\r\n"));
    }
    assert_eq!(
        esc(&redis.call(&[b"HSET", b"h", b"f", b"v"])),
        esc(b":1\r\n")
    );
    let kw = Keyward::start_for(
        &redis,
        &config("fleet = false\n", "[cache]\nmax_ttl_ms = 30000\n"),
        &[],
    );
    let gets: Vec<[&[u8]; 2]> = keys.iter().map(|k| [&b"GET"[..], k]).collect();
    let cmds: Vec<&[&[u8]]> = gets.iter().map(|g| &g[..]).collect();
    let load = HotLoad::start_allowing_wrongtype(kw.port(), &cmds).await;
    wait_cached(&kw, keys).await;

    let mut mget: Vec<&[u8]> = vec![b"MGET"];
    mget.extend_from_slice(keys);
    let name = mget
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let want2 = redis.call(&mget);
    if keys.len() == 4 {
        assert_eq!(
            esc(&want2),
            esc(b"*4\r\n$5\r\nalpha\r\n$5\r\nbravo\r\n$-1\r\n$-1\r\n"),
            "Redis's own {name}"
        );
    }

    // RESP2: served from the cache, Redis's bytes.
    let mut kw2 = Raw::connect(kw.port()).await;
    let (got, calls, hits) = mget_once(&kw, &redis, &load, &mut kw2, &mget).await;
    assert_eq!(esc(&got), esc(&want2), "{name} through keyward (RESP2)");
    assert_eq!(
        calls, 0,
        "{name} (RESP2) reached Redis (cmdstat_mget +{calls}) although every key's GET reply \
         was cached; KEYWARD CACHE hits +{hits}"
    );
    assert_eq!(hits, 1, "{name} (RESP2): KEYWARD CACHE hits +{hits}");

    // RESP3: the same, with RESP3 nulls.
    let mut direct3 = Raw::connect_resp3(redis.port()).await;
    let want3 = direct3.call(&mget).await;
    assert!(
        keys.len() < 3 || want3.ends_with(b"_\r\n"),
        "Redis's RESP3 {name}: {}",
        esc(&want3)
    );
    let mut kw3 = Raw::connect_resp3(kw.port()).await;
    let (got, calls, hits) = mget_once(&kw, &redis, &load, &mut kw3, &mget).await;
    assert_eq!(esc(&got), esc(&want3), "{name} through keyward (RESP3)");
    assert_eq!(
        calls, 0,
        "{name} (RESP3) reached Redis (cmdstat_mget +{calls}); KEYWARD CACHE hits +{hits}"
    );

    // A write through keyward: the next MGET has the new value (forwarded,
    // since a's reply was dropped), and later ones are served again. The
    // load stays paused from the write to that MGET: a GET a in between
    // would refill a's reply and let the MGET be served (rightly) from it.
    let (want_new, (got, calls, _)) = {
        let _paused = load.pause().await;
        assert_eq!(
            esc(&kw2.call(&[b"SET", b"a", b"new"]).await),
            esc(b"+OK\r\n")
        );
        let want_new = redis.call(&mget);
        let once = mget_while_paused(&kw, &redis, &mut kw2, &mget).await;
        (want_new, once)
    };
    assert!(want_new.starts_with(b"*") && want_new.windows(3).any(|w| w == b"new"));
    assert_eq!(
        esc(&got),
        esc(&want_new),
        "{name} right after SET a new through keyward"
    );
    assert_eq!(
        calls, 1,
        "{name} with a's reply dropped by the write should be forwarded to Redis once"
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (got, calls, _) = mget_once(&kw, &redis, &load, &mut kw2, &mget).await;
        assert_eq!(esc(&got), esc(&want_new), "{name} after SET a new");
        if calls == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} was never served from the cache again after SET a new"
        );
        tokio::time::sleep(POLL).await;
    }

    // A key that is not cached (nor hot): forwarded, right answer.
    let mut with_cold = mget.clone();
    with_cold.push(b"c");
    let want_cold = redis.call(&with_cold);
    let (got, calls, _) = mget_once(&kw, &redis, &load, &mut kw2, &with_cold).await;
    assert_eq!(esc(&got), esc(&want_cold), "MGET with the cold key c");
    assert_eq!(calls, 1, "MGET with the cold key c should reach Redis once");
    load.stop().await;
}

/// `MGET a b h missing` (strings, a hash, a missing key), as the brief
/// states it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mget_with_a_hash_and_a_missing_key_served_per_key() {
    mget_served_per_key(&[b"a", b"b", b"h", b"missing"]).await;
}

/// `MGET a b missing`: the same checks without a key of another type.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mget_of_strings_and_a_missing_key_served_per_key() {
    mget_served_per_key(&[b"a", b"b", b"missing"]).await;
}

// ---------------------------------------------------------------------------
// 5. Fleet warm-up
// ---------------------------------------------------------------------------

/// `KEYWARD HOTKEYS FLEET` on `conn`: (key, rate, instances, hot).
async fn fleet_view(conn: &mut Raw) -> Vec<(Vec<u8>, i64, i64, bool)> {
    let r = conn.call(&[b"KEYWARD", b"HOTKEYS", b"FLEET"]).await;
    let items = parse_reply(&r)
        .ok()
        .and_then(Reply::array)
        .unwrap_or_else(|| panic!("KEYWARD HOTKEYS FLEET: {}", esc(&r)));
    items
        .into_iter()
        .filter_map(|e| match e.array()?.as_slice() {
            [Reply::Bulk(Some(k)), Reply::Int(rate), Reply::Int(n), Reply::Int(hot)] => {
                Some((k.clone(), *rate, *n, *hot == 1))
            }
            _ => None,
        })
        .collect()
}

/// Instance A finds `fleetwarm` hot and publishes it; instance B, started
/// afterwards with no state folder, answers its very first `GET fleetwarm`
/// from the cache (a hit, and Redis counts no GET for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_instance_joins_the_fleet_warm() {
    const KEY: &[u8] = b"fleetwarm";
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", KEY, b"warm!"])), esc(b"+OK\r\n"));
    let toml = config("fleet = true\n", "[cache]\nmax_ttl_ms = 30000\n");
    let a = Keyward::start_for(&redis, &toml, &[]);
    let load = HotLoad::start_allowing_wrongtype(a.port(), &[&[b"GET", KEY]]).await;
    let mut a_conn = Raw::connect(a.port()).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let view = fleet_view(&mut a_conn).await;
        if view.iter().any(|(k, _, _, hot)| k == KEY && *hot) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's KEYWARD HOTKEYS FLEET never showed {} hot: {view:?}",
            esc(KEY)
        );
        tokio::time::sleep(POLL).await;
    }

    let b = blocking(|| Keyward::start_for(&redis, &toml, &[]));
    wait_ready(&b, READY_LIMIT).await;
    load.stop().await;
    let b_cache = cache_json(&b).await;
    let mut b_conn = Raw::connect(b.port()).await;
    let hits0 = counter(&keyward_cache(&mut b_conn).await, "hits");
    let gets0 = redis_calls(redis.port(), "get");
    let first = b_conn.call(&[b"GET", KEY]).await;
    let gets1 = redis_calls(redis.port(), "get");
    let hits1 = counter(&keyward_cache(&mut b_conn).await, "hits");
    eprintln!(
        "fleet warm-up: B's /cache when ready: entries {:?}, keys {:?}; first GET: hits \
         {hits0} -> {hits1}, Redis cmdstat_get {gets0} -> {gets1}",
        b_cache.get("entries"),
        cached_keys(&b_cache)
    );
    assert_eq!(esc(&first), esc(&bulk(b"warm!")), "B's first GET fleetwarm");
    assert_eq!(
        hits1,
        hits0 + 1,
        "B's first GET fleetwarm was not a cache hit (KEYWARD CACHE hits {hits0} -> {hits1}); \
         B's /cache when ready listed {:?}",
        cached_keys(&b_cache)
    );
    assert_eq!(
        gets1, gets0,
        "B's first GET fleetwarm reached Redis (cmdstat_get {gets0} -> {gets1})"
    );
}

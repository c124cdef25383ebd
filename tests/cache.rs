//! The near cache through the proxy (DESIGN.md decision 7): a hot key's reads
//! are answered by keyward without reaching Redis, yet a client never reads
//! a stale value for longer than an invalidation takes to arrive.
//!
//! Each test starts its own redis-server and keyward, and a background load
//! ([`HotLoad`]) keeps the key under test hot by sending pipelined reads of
//! it through keyward at a steady pace. Whether a particular reply came from
//! the cache is decided from what a user can observe: keyward's
//! `keyward_cache_hits_total` moving by exactly one while nothing else is
//! sent ([`cached_reply`]), or Redis's own `INFO commandstats` not counting
//! the reads. Redis itself is the oracle for reply bytes.
//!
//! Tests that assert "invalidation, not expiry, made the new value visible"
//! run with a long `cache.max_ttl_ms`, so that an entry expiring on its own
//! cannot pass them by luck.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::Instant;

/// The default `cache.max_ttl_ms`.
const MAX_TTL_DEFAULT: u64 = 2_000;

/// The `max_ttl_ms` of tests about invalidation latency: long enough that an
/// entry expiring by itself cannot explain a change seen within a second.
const MAX_TTL_LONG: u64 = 30_000;

/// keyward's config after the upstream: fast hot-key detection
/// ([`FAST_HOTKEYS`]) and the near cache with the given `max_ttl_ms`.
fn config(max_ttl_ms: u64) -> String {
    format!("{FAST_HOTKEYS}[cache]\nmax_mb = 16\nmax_ttl_ms = {max_ttl_ms}\nping_ms = 250\n")
}

/// Poll `GET key` through `conn` back to back (1 ms apart) until it returns
/// `want`; the time from `since` it took, or `None` if not within `limit`.
async fn time_until_get(
    conn: &mut Raw,
    key: &[u8],
    want: &[u8],
    since: Instant,
    limit: Duration,
) -> Option<(Duration, Vec<u8>)> {
    let mut last;
    loop {
        last = conn.call(&[b"GET", key]).await;
        if last == want {
            return Some((since.elapsed(), last));
        }
        if since.elapsed() > limit {
            eprintln!(
                "GET {} still returned {} after {limit:?} (want {})",
                esc(key),
                esc(&last),
                esc(want)
            );
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A hot key's reads are answered by keyward: 1000 GETs through the proxy
/// while the key is cached reach Redis only a handful of times (a refill
/// after an entry's 2 s expiry at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_key_is_served_from_the_cache() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v1"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_DEFAULT), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;

    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut raw, &[b"GET", b"hk"]).await),
        esc(&bulk(b"v1"))
    );
    let (calls, hits) = {
        // Only our 1000 GETs (which keep the key hot by themselves) count.
        let _paused = load.pause().await;
        let hits_before = cache_hits(&kw).await;
        assert_eq!(
            esc(&redis.call(&[b"CONFIG", b"RESETSTAT"])),
            esc(b"+OK\r\n")
        );
        let batch: Vec<u8> = (0..10).flat_map(|_| cmd(&[b"GET", b"hk"])).collect();
        for _ in 0..100 {
            raw.send(&batch).await;
            for reply in raw.read_replies(10).await {
                assert_eq!(esc(&reply), esc(&bulk(b"v1")));
            }
        }
        let calls = redis_calls(redis.port(), "get");
        (calls, cache_hits(&kw).await - hits_before)
    };
    eprintln!("1000 GETs of a hot key: {calls} reached Redis, {hits} cache hits");
    assert!(
        calls <= 50,
        "1000 GETs of a cached hot key should mostly be answered by keyward, \
         but Redis counted {calls} GET calls (cache hits {hits})\n--- keyward log ---\n{}",
        kw.log()
    );
    assert!(hits >= 950.0, "only {hits} of 1000 GETs were cache hits");
    load.stop().await;
}

/// Writes through keyward invalidate before they are forwarded: a pipelined
/// SET + GET on one connection always reads the new value, and so does a
/// GET on another connection once the SET is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_through_the_proxy() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_DEFAULT), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut a, &[b"GET", b"hk"]).await),
        esc(&bulk(b"v"))
    );

    // One connection, pipelined: the GET right behind the SET sees it.
    let hits_before = cache_hits(&kw).await;
    for i in 0..200 {
        let v = format!("v{i}");
        let mut pipeline = cmd(&[b"SET", b"hk", v.as_bytes()]);
        pipeline.extend(cmd(&[b"GET", b"hk"]));
        a.send(&pipeline).await;
        let replies = a.read_replies(2).await;
        assert_eq!(esc(&replies[0]), esc(b"+OK\r\n"), "SET #{i}");
        assert_eq!(
            esc(&replies[1]),
            esc(&bulk(v.as_bytes())),
            "GET right after SET hk {v} on the same connection (iteration {i})"
        );
    }

    // Two connections: a's acknowledged SET is visible to b's next GET,
    // even though b's previous GET was likely a cache hit.
    for i in 0..200 {
        let w = format!("w{i}");
        b.send(&cmd(&[b"GET", b"hk"])).await;
        let _previous = b.read_reply().await;
        assert_eq!(
            esc(&a.call(&[b"SET", b"hk", w.as_bytes()]).await),
            esc(b"+OK\r\n")
        );
        assert_eq!(
            esc(&b.call(&[b"GET", b"hk"]).await),
            esc(&bulk(w.as_bytes())),
            "GET on a second connection after SET hk {w} was acknowledged (iteration {i})"
        );
    }
    let hits = cache_hits(&kw).await - hits_before;
    eprintln!("read-your-writes: {hits} cache hits during the write loops");
    assert!(
        hits > 0.0,
        "the cache was never used during the write loops"
    );
    load.stop().await;
}

/// Writes queued in MULTI run at EXEC: once EXEC is acknowledged another
/// connection reads their value, never the one a fill read between the
/// queued SET and EXEC (the hot load keeps fills going all along).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_writes_are_read_once_exec_is_acknowledged() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut b, &[b"GET", b"hk"]).await),
        esc(&bulk(b"v"))
    );
    let hits_before = cache_hits(&kw).await;
    for i in 0..300 {
        let v = format!("t{i}");
        assert_eq!(esc(&a.call(&[b"MULTI"]).await), esc(b"+OK\r\n"));
        assert_eq!(
            esc(&a.call(&[b"SET", b"hk", v.as_bytes()]).await),
            esc(b"+QUEUED\r\n")
        );
        // Give a fill the chance to read the old value before EXEC runs.
        let previous = if i == 0 {
            "v".to_string()
        } else {
            format!("t{}", i - 1)
        };
        assert_eq!(
            esc(&b.call(&[b"GET", b"hk"]).await),
            esc(&bulk(previous.as_bytes())),
            "GET between the queued SET and EXEC (iteration {i})"
        );
        let exec = a.call(&[b"EXEC"]).await;
        assert_eq!(esc(&exec), esc(b"*1\r\n+OK\r\n"), "EXEC #{i}");
        assert_eq!(
            esc(&b.call(&[b"GET", b"hk"]).await),
            esc(&bulk(v.as_bytes())),
            "GET on another connection after EXEC of SET hk {v} was acknowledged (iteration {i})"
        );
    }
    let hits = cache_hits(&kw).await - hits_before;
    eprintln!("transaction read-your-writes: {hits} cache hits during the loop");
    assert!(hits > 0.0, "the cache was never used during the loop");
    load.stop().await;
}

/// SWAPDB and FLUSHDB through keyward change keys without naming them (and
/// Redis sends no invalidation for SWAPDB): keyward drops the whole cache
/// before forwarding them and again when they are answered, so the next
/// read sees the swapped or flushed database at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapdb_and_flushdb_through_keyward_are_read_at_once() {
    let redis = Redis::start();
    let _direct = hk_in_two_databases(&redis).await;
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut a = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut a, &[b"GET", b"hk"]).await),
        esc(&bulk(b"db0"))
    );
    assert_eq!(
        esc(&a.call(&[b"SWAPDB", b"0", b"1"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(
        esc(&a.call(&[b"GET", b"hk"]).await),
        esc(&bulk(b"db1")),
        "GET right after SWAPDB 0 1 through keyward"
    );
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut a, &[b"GET", b"hk"]).await),
        esc(&bulk(b"db1"))
    );
    assert_eq!(esc(&a.call(&[b"FLUSHDB"]).await), esc(b"+OK\r\n"));
    assert_eq!(
        esc(&a.call(&[b"GET", b"hk"]).await),
        esc(b"$-1\r\n"),
        "GET right after FLUSHDB through keyward"
    );
    let m = metrics(&kw).await;
    let flushes = metric(&m, "keyward_cache_flushes_total{reason=\"command\"}");
    assert!(
        flushes.is_some_and(|n| n >= 4.0),
        "SWAPDB and FLUSHDB each flush twice (sent, answered): {flushes:?}"
    );
    load.stop().await;
}

/// A hot key is cached per database: a client in database 1 gets database
/// 1's value from the cache while one in database 0 gets database 0's, and
/// writes in database 1 (through keyward, or straight to Redis) are seen
/// there at once while database 0's entry stays cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_are_cached_per_database() {
    let redis = Redis::start();
    let mut direct = hk_in_two_databases(&redis).await;
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut zero = Raw::connect(kw.port()).await;
    let mut one = Raw::connect(kw.port()).await;
    assert_eq!(esc(&one.call(&[b"SELECT", b"1"]).await), esc(b"+OK\r\n"));
    let get: &[&[u8]] = &[b"GET", b"hk"];
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut one, get).await),
        esc(&bulk(b"db1"))
    );
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut zero, get).await),
        esc(&bulk(b"db0"))
    );
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut one, &[b"MGET", b"hk"]).await),
        esc(b"*1\r\n$3\r\ndb1\r\n")
    );

    // Through keyward in database 1: read back at once, then cached again.
    assert_eq!(
        esc(&one.call(&[b"SET", b"hk", b"new1"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(esc(&one.call(get).await), esc(&bulk(b"new1")));
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut one, get).await),
        esc(&bulk(b"new1"))
    );
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut zero, get).await),
        esc(&bulk(b"db0"))
    );

    // Straight to Redis in database 1: an invalidation, seen within 200 ms.
    assert_eq!(
        esc(&direct.call(&[b"SET", b"hk", b"ext1"]).await),
        esc(b"+OK\r\n")
    );
    let acked = Instant::now();
    let seen = time_until_get(
        &mut one,
        b"hk",
        &bulk(b"ext1"),
        acked,
        Duration::from_secs(2),
    )
    .await
    .map(|(took, _)| took);
    assert!(
        seen.is_some_and(|took| took < Duration::from_millis(200)),
        "database 1's external write seen after {seen:?}"
    );
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut one, get).await),
        esc(&bulk(b"ext1"))
    );
    assert_eq!(
        esc(&redis.call(&[b"GET", b"hk"])),
        esc(&bulk(b"db0")),
        "database 0 untouched"
    );
    load.stop().await;
}

/// A client that also reads a hot key with commands the cache does not
/// answer (TTL, here) is still served from the cache: after each such
/// read its GETs wait only for the tracking connection to sync (a PING),
/// not for the entry to expire (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_cache_does_not_answer_do_not_stop_hits() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut c = Raw::connect(kw.port()).await;
    for _ in 0..20 {
        assert_eq!(esc(&c.call(&[b"TTL", b"hk"]).await), esc(b":-1\r\n"));
        assert_eq!(
            esc(&cached_reply(&kw, &load, &mut c, &[b"GET", b"hk"]).await),
            esc(&bulk(b"v"))
        );
    }
    load.stop().await;
}

/// A write straight to Redis (not through keyward) reaches the cache as a
/// tracking invalidation: keyward serves the new value within milliseconds,
/// far sooner than the entry's lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_write_is_seen_within_milliseconds() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v0"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut raw = Raw::connect(kw.port()).await;
    let mut direct = Raw::connect(redis.port()).await;

    let mut current = b"v0".to_vec();
    let mut latencies = Vec::new();
    for round in 0..5 {
        // The old value is in the cache right now.
        assert_eq!(
            esc(&cached_reply(&kw, &load, &mut raw, &[b"GET", b"hk"]).await),
            esc(&bulk(&current))
        );
        let ext = format!("ext{round}").into_bytes();
        assert_eq!(
            esc(&direct.call(&[b"SET", b"hk", &ext]).await),
            esc(b"+OK\r\n")
        );
        let acked = Instant::now();
        let Some((took, _)) =
            time_until_get(&mut raw, b"hk", &bulk(&ext), acked, Duration::from_secs(2)).await
        else {
            panic!(
                "round {round}: after SET hk {} directly on Redis, keyward still served \
                 the old value 2 s later (max_ttl_ms {MAX_TTL_LONG})\n--- keyward log ---\n{}",
                esc(&ext),
                kw.log()
            );
        };
        latencies.push(took);
        current = ext;
    }
    let worst = *latencies.iter().max().expect("rounds");
    eprintln!("external write -> visible through keyward: {latencies:?} (worst {worst:?})");
    assert!(
        worst < Duration::from_millis(200),
        "an external write took {worst:?} to become visible (want < 200 ms); all rounds: {latencies:?}"
    );
    assert!(
        worst < Duration::from_millis(MAX_TTL_LONG / 10),
        "visibility {worst:?} is not well below max_ttl_ms {MAX_TTL_LONG}: expiry, not invalidation"
    );
    load.stop().await;
}

/// FLUSHALL straight on Redis sends a null invalidation; keyward drops the
/// whole cache and a hot key reads as missing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_flushes_the_cache() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v1"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut raw = Raw::connect(kw.port()).await;
    let mut direct = Raw::connect(redis.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut raw, &[b"GET", b"hk"]).await),
        esc(&bulk(b"v1"))
    );

    assert_eq!(esc(&direct.call(&[b"FLUSHALL"]).await), esc(b"+OK\r\n"));
    let acked = Instant::now();
    let seen = time_until_get(&mut raw, b"hk", b"$-1\r\n", acked, Duration::from_secs(2)).await;
    let Some((took, _)) = seen else {
        panic!(
            "after FLUSHALL on Redis, keyward still served hk 2 s later\n--- keyward log ---\n{}",
            kw.log()
        );
    };
    eprintln!("FLUSHALL -> hk missing through keyward after {took:?}");
    assert!(
        took < Duration::from_millis(200),
        "FLUSHALL took {took:?} to reach the cache (want < 200 ms)"
    );
    load.stop().await;
}

/// The tracking connection's id, from `CLIENT LIST` (flags contain `t`).
async fn tracking_client(direct: &mut Raw) -> Option<u64> {
    let list = direct.call(&[b"CLIENT", b"LIST"]).await;
    let text = String::from_utf8_lossy(&list).into_owned();
    let ids: Vec<u64> = text
        .lines()
        .filter(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .is_some_and(|flags| flags.contains('t'))
        })
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .and_then(|id| id.parse().ok())
        })
        .collect();
    assert!(ids.len() <= 1, "more than one tracking client: {text}");
    ids.first().copied()
}

/// Killing the tracking connection means invalidations can no longer
/// arrive; keyward must flush the cache at once (entries drop to 0) and
/// reconnect, so a write made right after the kill is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_tracking_link_flushes_the_cache() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"old"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_LONG), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut raw = Raw::connect(kw.port()).await;
    let mut direct = Raw::connect(redis.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut raw, &[b"GET", b"hk"]).await),
        esc(&bulk(b"old"))
    );
    let id = tracking_client(&mut direct)
        .await
        .unwrap_or_else(|| panic!("no client with tracking on in CLIENT LIST"));

    {
        // No load meanwhile: nothing refills the cache behind our back.
        let _paused = load.pause().await;
        let m = metrics(&kw).await;
        let entries = metric(&m, "keyward_cache_entries").expect("keyward_cache_entries");
        assert!(
            entries >= 1.0,
            "hk was just a hit, yet {entries} entries:\n{m}"
        );
        let kill = direct
            .call(&[b"CLIENT", b"KILL", b"ID", id.to_string().as_bytes()])
            .await;
        assert_eq!(esc(&kill), esc(b":1\r\n"), "CLIENT KILL ID {id}");
        let killed = Instant::now();
        wait_until(
            "keyward_cache_entries is 0 after the kill",
            Duration::from_secs(1),
            || async { metric(&metrics(&kw).await, "keyward_cache_entries") == Some(0.0) },
        )
        .await;
        eprintln!(
            "tracking link killed -> cache empty after {:?}",
            killed.elapsed()
        );

        assert_eq!(
            esc(&direct.call(&[b"SET", b"hk", b"new"]).await),
            esc(b"+OK\r\n")
        );
        let set = Instant::now();
        let seen =
            time_until_get(&mut raw, b"hk", &bulk(b"new"), set, Duration::from_secs(1)).await;
        let Some((took, _)) = seen else {
            panic!(
                "after the tracking link was killed and hk was SET directly, keyward \
                 still served the old value 1 s later\n--- keyward log ---\n{}",
                kw.log()
            );
        };
        eprintln!("SET after the kill -> visible through keyward after {took:?}");
    }

    // keyward reconnects the tracking link and caches again.
    let deadline = Instant::now() + DEADLINE;
    while tracking_client(&mut direct)
        .await
        .is_none_or(|new| new == id)
    {
        assert!(
            Instant::now() < deadline,
            "keyward did not reconnect its tracking link within {DEADLINE:?}\n\
             --- keyward log ---\n{}",
            kw.log()
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut raw, &[b"GET", b"hk"]).await),
        esc(&bulk(b"new"))
    );
    load.stop().await;
}

/// Cached replies are byte-identical to what Redis sends in each protocol:
/// a hash (RESP3 map vs RESP2 flat array), a missing key (`_` vs `$-1`) and
/// a score (RESP3 double vs RESP2 bulk string).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_and_resp3_replies_match_redis() {
    let redis = Redis::start();
    assert_eq!(
        esc(&redis.call(&[b"HSET", b"hh", b"a", b"1", b"b", b"2"])),
        esc(b":2\r\n")
    );
    assert_eq!(
        esc(&redis.call(&[b"ZADD", b"zz", b"2.5", b"m"])),
        esc(b":1\r\n")
    );
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_DEFAULT), &[]);
    let reads: [&[&[u8]]; 3] = [
        &[b"HGETALL", b"hh"],
        &[b"GET", b"missing"],
        &[b"ZSCORE", b"zz", b"m"],
    ];
    let load = HotLoad::start(kw.port(), &reads).await;
    wait_cache_hits(&kw).await;

    let mut direct2 = Raw::connect(redis.port()).await;
    let mut direct3 = Raw::connect_resp3(redis.port()).await;
    let mut kw2 = Raw::connect(kw.port()).await;
    let mut kw3 = Raw::connect_resp3(kw.port()).await;

    for req in reads {
        let name = req.iter().map(|a| esc(a)).collect::<Vec<_>>().join(" ");
        let want2 = direct2.call(req).await;
        let want3 = direct3.call(req).await;
        assert_ne!(
            want2, want3,
            "{name}: Redis's RESP2 and RESP3 replies should differ"
        );
        let got2 = cached_reply(&kw, &load, &mut kw2, req).await;
        assert_eq!(
            esc(&got2),
            esc(&want2),
            "{name}: cached reply to a RESP2 client"
        );
        let got3 = cached_reply(&kw, &load, &mut kw3, req).await;
        assert_eq!(
            esc(&got3),
            esc(&want3),
            "{name}: cached reply to a RESP3 client"
        );
    }
    load.stop().await;
}

/// `--cache-mb 0` turns the near cache off: a hot key's reads all reach
/// Redis, no hits are counted, and the data path is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_disabled_with_zero_mb() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"v1"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(MAX_TTL_DEFAULT), &["--cache-mb", "0"]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    // The key is hot, so an enabled cache would be serving it by now.
    wait_until("keyward_hotkeys_hot >= 1", DEADLINE, || async {
        metric(&metrics(&kw).await, "keyward_hotkeys_hot").unwrap_or(0.0) >= 1.0
    })
    .await;

    let mut raw = Raw::connect(kw.port()).await;
    let calls = {
        let _paused = load.pause().await;
        assert_eq!(
            esc(&redis.call(&[b"CONFIG", b"RESETSTAT"])),
            esc(b"+OK\r\n")
        );
        let batch: Vec<u8> = (0..10).flat_map(|_| cmd(&[b"GET", b"hk"])).collect();
        for _ in 0..100 {
            raw.send(&batch).await;
            for reply in raw.read_replies(10).await {
                assert_eq!(esc(&reply), esc(&bulk(b"v1")));
            }
        }
        redis_calls(redis.port(), "get")
    };
    assert!(
        calls >= 1000,
        "with the cache off every GET must reach Redis; Redis counted {calls} of 1000"
    );
    // Writes and reads still work.
    assert_eq!(
        esc(&raw.call(&[b"SET", b"hk", b"v2"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(esc(&raw.call(&[b"GET", b"hk"]).await), esc(&bulk(b"v2")));

    let m = metrics(&kw).await;
    for name in ["keyward_cache_hits_total", "keyward_cache_entries"] {
        let v = metric(&m, name).unwrap_or(0.0);
        assert_eq!(v, 0.0, "{name} is {v} with --cache-mb 0:\n{m}");
    }
    load.stop().await;
}

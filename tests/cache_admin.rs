//! The near cache's visibility: `KEYWARD CACHE` over RESP, `GET /cache` as
//! JSON and its metric families, with the cache on and off.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stats_show_the_hot_key() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, FAST_HOTKEYS, &[]);
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&raw.call(&[b"SET", b"ck", b"v"]).await),
        esc(b"+OK\r\n")
    );
    let batch: Vec<u8> = (0..50).flat_map(|_| cmd(&[b"GET", b"ck"])).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let stats = loop {
        raw.send(&batch).await;
        assert!(raw
            .read_replies(50)
            .await
            .iter()
            .all(|r| r == b"$1\r\nv\r\n"));
        let (status, body) = http_get(kw.admin_port(), "/cache?count=5");
        assert_eq!(status, 200, "{body}");
        if body.contains("\"hits\":") && !body.contains("\"hits\":0") && body.contains("\"ck\"") {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cache hits: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(stats.contains("\"link_up\":true"), "{stats}");
    assert!(stats.contains("\"budget_bytes\":67108864"), "{stats}");
    // Over RESP: a map (flat in RESP2) with the same facts and the key.
    let reply = raw.call(&[b"KEYWARD", b"CACHE"]).await;
    let text = String::from_utf8_lossy(&reply).into_owned();
    assert!(
        text.starts_with("*22\r\n$12\r\nbudget-bytes\r\n:67108864\r\n"),
        "{text}"
    );
    assert!(
        text.contains("$7\r\nflushes\r\n*10\r\n") && text.contains("$8\r\nflushall\r\n:0\r\n"),
        "{text}"
    );
    assert!(text.contains("$2\r\nck\r\n"), "{text}");
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"CACHE", b"COUNT", b"x"]).await),
        esc(b"-ERR syntax error\r\n")
    );
    let (_, metrics) = http_get(kw.admin_port(), "/metrics");
    for family in [
        "keyward_cache_hits_total",
        "keyward_cache_fills_total",
        "keyward_cache_invalidations_total",
        "keyward_cache_flushes_total{reason=\"start\"}",
        "keyward_cache_bytes",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    assert!(
        !metrics.contains("\"ck\"") && !metrics.contains("key=\"ck\""),
        "a key leaked into metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_cache_says_so() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, FAST_HOTKEYS, &["--cache-mb", "0"]);
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"CACHE"]).await),
        esc(b"-ERR the near cache is disabled (cache.max_mb = 0 or hotkeys.enabled = false)\r\n")
    );
    let (status, body) = http_get(kw.admin_port(), "/cache");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"enabled\":false"), "{body}");
}

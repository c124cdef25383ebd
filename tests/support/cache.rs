//! Near-cache helpers: whether a reply came from keyward's cache, decided
//! from what a user can observe (`keyward_cache_hits_total`).

use tokio::time::Instant;

use super::{esc, metric, metrics, wait_until, HotLoad, Keyward, Raw, Redis, DEADLINE, POLL};

pub async fn cache_hits(kw: &Keyward) -> f64 {
    let m = metrics(kw).await;
    metric(&m, "keyward_cache_hits_total")
        .unwrap_or_else(|| panic!("keyward_cache_hits_total missing from /metrics:\n{m}"))
}

/// Wait until keyward has answered at least one request from the cache.
pub async fn wait_cache_hits(kw: &Keyward) {
    wait_until("keyward_cache_hits_total > 0", DEADLINE, || async {
        cache_hits(kw).await > 0.0
    })
    .await;
}

/// Send `req` on `conn` while the load is paused, until keyward answers it
/// from the cache (its hit counter moves by exactly one across the request);
/// returns that reply. Between tries the load runs, so a miss gets filled.
pub async fn cached_reply(kw: &Keyward, load: &HotLoad, conn: &mut Raw, req: &[&[u8]]) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    let mut last: Vec<u8>;
    loop {
        {
            let _paused = load.pause().await;
            let before = cache_hits(kw).await;
            last = conn.call(req).await;
            let after = cache_hits(kw).await;
            if after == before + 1.0 {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} was never answered from the near cache within {DEADLINE:?}; last reply {}\n\
             --- keyward log ---\n{}",
            req.iter().map(|a| esc(a)).collect::<Vec<_>>().join(" "),
            esc(&last),
            kw.log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `hk` is "db0" in database 0 and "db1" in database 1; returns a
/// connection to Redis left in database 1.
pub async fn hk_in_two_databases(redis: &Redis) -> Raw {
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"db0"])), esc(b"+OK\r\n"));
    let mut direct = Raw::connect(redis.port()).await;
    assert_eq!(esc(&direct.call(&[b"SELECT", b"1"]).await), esc(b"+OK\r\n"));
    assert_eq!(
        esc(&direct.call(&[b"SET", b"hk", b"db1"]).await),
        esc(b"+OK\r\n")
    );
    direct
}

//! Near-cache coherence under races and events: a read through keyward
//! never returns a value older than the last write acknowledged before the
//! read started; expiry and a restart with a saved state folder.

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

fn int_of(reply: &[u8]) -> Option<u64> {
    // "$n\r\n<digits>\r\n"
    let nl = reply.iter().position(|&b| b == b'\n')?;
    std::str::from_utf8(&reply[nl + 1..reply.len().checked_sub(2)?])
        .ok()?
        .parse()
        .ok()
}

fn cache_hits(admin: u16) -> u64 {
    let (_, m) = http_get(admin, "/metrics");
    metric(&m, "keyward_cache_hits_total").unwrap_or(0.0) as u64
}

/// Writers (one through keyward, one straight to Redis) increment a hot
/// key while readers read it through keyward, for three seconds. Every read
/// sees at least the value keyward acknowledged before the read started
/// (read-your-writes through the proxy), and at least the value Redis
/// acknowledged to the outside writer 50 ms before it started (an outside
/// write reaches the cache through an invalidation push).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_go_back_in_time() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, FAST_HOTKEYS, &[]);
    let mut setup = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&setup.call(&[b"SET", b"race", b"0"]).await),
        esc(b"+OK\r\n")
    );
    let acked_kw = Arc::new(AtomicU64::new(0));
    let acked_ext: Arc<Mutex<VecDeque<(Instant, u64)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for through_keyward in [false, true] {
        let (acked_kw, acked_ext, stop) = (acked_kw.clone(), acked_ext.clone(), stop.clone());
        let port = if through_keyward {
            kw.port()
        } else {
            redis.port()
        };
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::connect(port).await;
            let mut pace = tokio::time::interval(Duration::from_millis(2));
            while !stop.load(Ordering::Acquire) {
                pace.tick().await;
                let r = raw.call(&[b"INCR", b"race"]).await;
                let v: u64 = std::str::from_utf8(&r[1..r.len() - 2])
                    .unwrap()
                    .parse()
                    .unwrap();
                if through_keyward {
                    acked_kw.fetch_max(v, Ordering::AcqRel);
                } else {
                    let mut q = acked_ext.lock().unwrap();
                    q.push_back((Instant::now(), v));
                    if q.len() > 10_000 {
                        q.pop_front();
                    }
                }
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (acked_kw, acked_ext, stop) = (acked_kw.clone(), acked_ext.clone(), stop.clone());
        let port = kw.port();
        readers.push(tokio::spawn(async move {
            let mut raw = Raw::connect(port).await;
            let mut reads = 0u64;
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                let floor_kw = acked_kw.load(Ordering::Acquire);
                let floor_ext = acked_ext
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .find(|(at, _)| started.duration_since(*at) >= Duration::from_millis(50))
                    .map(|(_, v)| *v)
                    .unwrap_or(0);
                let got = int_of(&raw.call(&[b"GET", b"race"]).await).expect("a number");
                assert!(got >= floor_kw, "read-your-writes broken: got {got}, keyward had acknowledged {floor_kw}");
                assert!(got >= floor_ext, "outside write not seen after 50 ms: got {got}, Redis had acknowledged {floor_ext}");
                reads += 1;
            }
            reads
        }));
    }
    // Let the key become hot and cached, then race for three seconds.
    wait_until("cache hits on the raced key", DEADLINE, || async {
        cache_hits(kw.admin_port()) > 0
    })
    .await;
    let hits_before = cache_hits(kw.admin_port());
    tokio::time::sleep(Duration::from_secs(3)).await; // the race's duration, not a synchronisation
    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await.unwrap();
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    let hits = cache_hits(kw.admin_port()) - hits_before;
    eprintln!("race: {reads} reads, {hits} cache hits");
    assert!(hits > 0, "the race never exercised the cache");
}

/// A writer straight on Redis increments a hot key as fast as it can (four
/// INCRs pipelined at a time) while clients read it through keyward, one
/// request at a time and pipelined, for three seconds: no client ever reads
/// a value older than one it has already read, as with one connection to
/// Redis (a fill that read the key before a write must not be served after
/// the client has seen that write in a reply forwarded to Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_never_reads_a_value_older_than_one_it_has_read() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, FAST_HOTKEYS, &[]);
    assert_eq!(esc(&redis.call(&[b"SET", b"mono", b"0"])), esc(b"+OK\r\n"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (stop, port) = (stop.clone(), redis.port());
        async move {
            let mut raw = Raw::connect(port).await;
            let four = cmd(&[b"INCR", b"mono"]).repeat(4);
            while !stop.load(Ordering::Acquire) {
                raw.send(&four).await;
                raw.read_replies(4).await;
            }
        }
    });
    // Each reader sends its batch over and over: GETs one at a time and
    // pipelined, reads the cache does not answer (SUBSTR, EVAL_RO) or
    // another cached request (GETRANGE) between GETs, and a read on a dedicated connection (CLIENT SETNAME holds one
    // until RESET) before GETs on the shared one.
    let get = cmd(&[b"GET", b"mono"]);
    let batches: Vec<(&str, Vec<u8>)> = vec![
        ("GET", get.clone()),
        ("GET x8", get.repeat(8)),
        (
            "SUBSTR, GET",
            [cmd(&[b"SUBSTR", b"mono", b"0", b"-1"]), get.clone()].concat(),
        ),
        (
            "GETRANGE, GET",
            [cmd(&[b"GETRANGE", b"mono", b"0", b"-1"]), get.clone()].concat(),
        ),
        (
            "EVAL_RO, GET",
            [
                cmd(&[
                    b"EVAL_RO",
                    b"return redis.call('get', KEYS[1])",
                    b"1",
                    b"mono",
                ]),
                get.clone(),
            ]
            .concat(),
        ),
        (
            "SETNAME, GET, RESET, GET",
            [
                cmd(&[b"CLIENT", b"SETNAME", b"x"]),
                get.clone(),
                cmd(&[b"RESET"]),
                get.clone(),
            ]
            .concat(),
        ),
    ];
    let mut readers = Vec::new();
    for (name, batch) in batches {
        let (stop, port) = (stop.clone(), kw.port());
        let n = split_frames(&batch).expect("requests").len();
        readers.push(tokio::spawn(async move {
            let mut raw = Raw::connect(port).await;
            let (mut last, mut reads) = (0u64, 0u64);
            while !stop.load(Ordering::Acquire) {
                raw.send(&batch).await;
                for r in raw.read_replies(n).await {
                    if !r.starts_with(b"$") {
                        continue; // +OK, +RESET
                    }
                    let got = int_of(&r).expect("a number");
                    assert!(
                        got >= last,
                        "read {got} after having read {last} on this connection ({name})"
                    );
                    last = got;
                    reads += 1;
                }
            }
            reads
        }));
    }
    wait_until("cache hits on the key", DEADLINE, || async {
        cache_hits(kw.admin_port()) > 0
    })
    .await;
    let hits_before = cache_hits(kw.admin_port());
    tokio::time::sleep(Duration::from_secs(3)).await; // the race's duration, not a synchronisation
    stop.store(true, Ordering::Release);
    writer.await.unwrap();
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    let hits = cache_hits(kw.admin_port()) - hits_before;
    eprintln!("monotonic: {reads} reads, {hits} cache hits");
    assert!(hits > 0, "the race never exercised the cache");
}

/// PEXPIRE straight on Redis: once Redis has expired the key, keyward does
/// not serve it from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_not_outlived() {
    let redis = Redis::start();
    let kw = Keyward::start_for(
        &redis,
        &format!("{FAST_HOTKEYS}[cache]\nmax_ttl_ms = 30000\n"),
        &[],
    );
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&raw.call(&[b"SET", b"ek", b"v"]).await),
        esc(b"+OK\r\n")
    );
    let batch: Vec<u8> = (0..50).flat_map(|_| cmd(&[b"GET", b"ek"])).collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cache_hits(kw.admin_port()) == 0 {
        raw.send(&batch).await;
        raw.read_replies(50).await;
        assert!(tokio::time::Instant::now() < deadline, "never cached");
    }
    assert_eq!(
        esc(&redis_cmd(redis.port(), &[b"PEXPIRE", b"ek", b"150"])),
        esc(b":1\r\n")
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        // Redis first, then keyward: if Redis no longer has it, neither may keyward.
        let direct_gone = redis_cmd(redis.port(), &[b"EXISTS", b"ek"]) == b":0\r\n";
        let through = raw.call(&[b"GET", b"ek"]).await;
        if direct_gone {
            assert_eq!(esc(&through), esc(b"$-1\r\n"), "served an expired key");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "key never expired");
    }
}

/// A restart with the saved state folder: the first reads are hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_state_dir_starts_warm() {
    let redis = Redis::start();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    for i in 0..20 {
        redis_cmd(redis.port(), &[b"SET", format!("w{i}").as_bytes(), b"x"]);
    }
    let mut kw = Keyward::start_for(&redis, FAST_HOTKEYS, &["--state-dir", &dir]);
    let mut raw = Raw::connect(kw.port()).await;
    let batch: Vec<u8> = (0..20)
        .flat_map(|i| cmd(&[b"GET", format!("w{i}").as_bytes()]))
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        raw.send(&batch).await;
        raw.read_replies(20).await;
        let (_, body) = http_get(kw.admin_port(), "/cache");
        if body.contains("\"entries\":20") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all keys cached: {body}"
        );
    }
    drop(raw);
    // SIGTERM saves the list.
    kw.signal_term();
    assert!(kw
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let saved = std::fs::read_to_string(state.path().join("near-cache.json")).unwrap();
    assert!(!saved.contains("\"x\""), "values must never be saved");
    let kw = Keyward::start_for(&redis, FAST_HOTKEYS, &["--state-dir", &dir]);
    wait_until("ready after warm-up", DEADLINE, || async {
        http_get(kw.admin_port(), "/ready").0 == 200
    })
    .await;
    let mut raw = Raw::connect(kw.port()).await;
    let before = cache_hits(kw.admin_port());
    raw.send(&batch).await;
    assert!(raw
        .read_replies(20)
        .await
        .iter()
        .all(|r| r == b"$1\r\nx\r\n"));
    let hits = cache_hits(kw.admin_port()) - before;
    assert!(
        hits >= 18,
        "only {hits} of the first 20 reads after restart were hits"
    );
}

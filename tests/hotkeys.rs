//! Hot-key detection through the proxy: a skewed pipelined workload makes
//! the hot key appear first in `KEYWARD HOTKEYS` and `/hotkeys`, flagged
//! hot; bad arguments get clear errors.

mod support;

use std::time::Duration;

use support::*;

const CONFIG: &str = "[hotkeys]\nwindow_ms = 200\nthreshold = 500\nsample_rate = 8\n";

/// Pipelines `rounds` batches: in each, 80 GETs of `hot:key` and 20 of
/// distinct cold keys.
async fn skewed_load(raw: &mut Raw, round: usize) {
    let mut batch = Vec::new();
    for i in 0..100 {
        if i % 5 == 0 {
            batch.extend(cmd(&[b"GET", format!("cold:{round}:{i}").as_bytes()]));
        } else {
            batch.extend(cmd(&[b"GET", b"hot:key"]));
        }
    }
    raw.send(&batch).await;
    let replies = raw.read_replies(100).await;
    assert!(
        replies.iter().all(|r| r == b"$-1\r\n"),
        "unexpected replies"
    );
}

/// The first entry of `KEYWARD HOTKEYS COUNT 3` as (key, hot flag).
async fn first_hotkey(raw: &mut Raw) -> Option<(Vec<u8>, bool)> {
    let reply = raw.call(&[b"KEYWARD", b"HOTKEYS", b"COUNT", b"3"]).await;
    let frames = split_frames(&reply[reply.iter().position(|&b| b == b'\n')? + 1..]).ok()?;
    // Each entry: *4 $key :rate :error :hot
    let first = frames.first()?;
    let parts = split_frames(&first[first.iter().position(|&b| b == b'\n')? + 1..]).ok()?;
    let key = parts.first()?;
    let body = &key[key.iter().position(|&b| b == b'\n')? + 1..key.len() - 2];
    Some((body.to_vec(), parts.get(3)? == b":1\r\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_workload_puts_the_hot_key_first() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, CONFIG, &[]);
    let mut load = Raw::connect(kw.port()).await;
    let mut admin = Raw::connect(kw.port()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut round = 0;
    loop {
        skewed_load(&mut load, round).await;
        round += 1;
        if let Some((key, hot)) = first_hotkey(&mut admin).await {
            if key == b"hot:key" && hot {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hot:key never became the first hot key; last reply {}",
            esc(&admin.call(&[b"KEYWARD", b"HOTKEYS"]).await)
        );
    }
    let (status, body) = http_get(kw.admin_port(), "/hotkeys?count=2");
    assert_eq!(status, 200, "{body}");
    // The first entry of "keys" is hot:key, flagged hot.
    let start = body.find("\"keys\":[{").expect(&body) + "\"keys\":[".len();
    let first = &body[start..start + body[start..].find('}').expect(&body)];
    assert!(first.contains("\"key\":\"hot:key\""), "{body}");
    assert!(first.contains("\"hot\":true"), "{body}");
    // Prometheus sees the samples and the hot key, never a key name.
    let metrics = get_metrics(kw.admin_port());
    let value = |name: &str| -> f64 {
        metric(&metrics, name).unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert!(value("keyward_hotkey_samples_total") > 0.0, "{metrics}");
    assert!(value("keyward_hotkeys_hot") >= 1.0, "{metrics}");
    assert!(value("keyward_hotkey_windows_total") >= 2.0, "{metrics}");
    assert_eq!(value("keyward_topology_healthy"), 1.0, "{metrics}");
    assert!(
        !metrics.contains("hot:key"),
        "a key name leaked into /metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_get_clear_errors() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, CONFIG, &[]);
    let mut raw = Raw::connect(kw.port()).await;
    let cases: &[(&[&[u8]], &[u8])] = &[
        (
            &[b"KEYWARD", b"HOTKEYS", b"COUNT", b"x"],
            b"-ERR value is not an integer or out of range\r\n",
        ),
        (
            &[b"KEYWARD", b"HOTKEYS", b"COUNT", b"0"],
            b"-ERR COUNT must be greater than 0\r\n",
        ),
        (
            &[b"KEYWARD", b"HOTKEYS", b"COUNT"],
            b"-ERR syntax error\r\n",
        ),
        (
            &[b"KEYWARD", b"HOTKEYS", b"BOGUS", b"1"],
            b"-ERR syntax error\r\n",
        ),
        (
            &[b"KEYWARD"],
            b"-ERR wrong number of arguments for 'keyward' command\r\n",
        ),
        (
            &[b"KEYWARD", b"NOPE"],
            b"-ERR unknown subcommand 'NOPE'. Try KEYWARD HELP.\r\n",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(esc(&raw.call(args).await), esc(want), "{args:?}");
    }
    // An empty detector answers an empty array, not an error.
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"HOTKEYS"]).await),
        esc(b"*0\r\n")
    );
    let (status, body) = http_get(kw.admin_port(), "/hotkeys?count=abc");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("count must be a positive integer"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_detection_says_so() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "[hotkeys]\nenabled = false\n", &[]);
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&raw.call(&[b"KEYWARD", b"HOTKEYS"]).await),
        esc(b"-ERR hot-key detection is disabled (hotkeys.enabled = false)\r\n")
    );
    // The data path is unaffected.
    assert_eq!(esc(&raw.call(&[b"SET", b"a", b"1"]).await), esc(b"+OK\r\n"));
}

/// Entries of a `KEYWARD HOTKEYS [FLEET]` reply as (key, n, third, hot).
fn entries(reply: &[u8]) -> Vec<(Vec<u8>, i64, i64, bool)> {
    let Some(nl) = reply.iter().position(|&b| b == b'\n') else {
        return Vec::new();
    };
    let Ok(frames) = split_frames(&reply[nl + 1..]) else {
        return Vec::new();
    };
    let int = |f: &[u8]| {
        std::str::from_utf8(&f[1..f.len() - 2])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    };
    frames
        .iter()
        .filter_map(|f| {
            let nl = f.iter().position(|&b| b == b'\n')?;
            let parts = split_frames(&f[nl + 1..]).ok()?;
            let k = &parts[0];
            let knl = k.iter().position(|&b| b == b'\n')?;
            Some((
                k[knl + 1..k.len() - 2].to_vec(),
                int(&parts[1]),
                int(&parts[2]),
                parts[3] == b":1\r\n",
            ))
        })
        .collect()
}

/// Two proxies in front of one Redis each carry 600 ops/s of one key: not
/// hot on either (threshold 1000), hot in the fleet view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_view_sums_instances() {
    let redis = Redis::start();
    let config = "[hotkeys]\nwindow_ms = 200\nthreshold = 1000\nsample_rate = 1\n";
    let a = Keyward::start_for(&redis, config, &[]);
    let b = Keyward::start_for(&redis, config, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loads = Vec::new();
    for port in [a.port(), b.port()] {
        let stop = stop.clone();
        loads.push(tokio::spawn(async move {
            let mut raw = Raw::connect(port).await;
            // 30 GETs every 50 ms: 600 ops/s per proxy.
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            // A late tick is dropped, not made up in a burst: a burst would
            // put one proxy over the threshold alone (seen on a busy machine).
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let batch: Vec<u8> = (0..30)
                .flat_map(|_| cmd(&[b"GET", b"shared:key"]))
                .collect();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                pace.tick().await;
                raw.send(&batch).await;
                raw.read_replies(30).await;
            }
        }));
    }
    let mut admin = Raw::connect(a.port()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let fleet = loop {
        let reply = admin
            .call(&[b"KEYWARD", b"HOTKEYS", b"FLEET", b"COUNT", b"1"])
            .await;
        let e = entries(&reply);
        if e.first()
            .is_some_and(|(k, _, instances, hot)| k == b"shared:key" && *instances == 2 && *hot)
        {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fleet never showed shared:key hot: {}",
            esc(&reply)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, rate, _, _) = &fleet[0];
    assert!(
        (1000..2000).contains(rate),
        "fleet rate {rate} should be about 1200 ops/s"
    );
    // Neither proxy alone calls it hot.
    for port in [a.port(), b.port()] {
        let mut raw = Raw::connect(port).await;
        let local = entries(&raw.call(&[b"KEYWARD", b"HOTKEYS"]).await);
        let mine = local
            .iter()
            .find(|e| e.0 == b"shared:key")
            .expect("key tracked locally");
        assert!(!mine.3 && mine.1 < 1000, "locally hot on {port}: {mine:?}");
    }
    let (status, body) = http_get(a.admin_port(), "/hotkeys?scope=fleet&count=1");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"key\":\"shared:key\"") && body.contains("\"instances\":2"),
        "{body}"
    );
    // The summaries travel on a channel: the clients' keyspace holds
    // nothing of them (the load only reads), and the channel has both.
    let mut direct = Raw::connect(redis.port()).await;
    assert_eq!(esc(&direct.call(&[b"DBSIZE"]).await), esc(b":0\r\n"));
    assert_eq!(
        esc(&direct
            .call(&[b"PUBSUB", b"NUMSUB", b"keyward:hotkeys"])
            .await),
        esc(b"*2\r\n$15\r\nkeyward:hotkeys\r\n:2\r\n")
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    for l in loads {
        l.await.unwrap();
    }
}

/// When the instances cannot use the channel (the upstream user's ACL
/// denies it), the fleet view says why instead of showing a partial view,
/// and the proxy serves clients as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_view_unavailable_says_why() {
    let redis = Redis::start();
    let mut direct = Raw::connect(redis.port()).await;
    let acl: &[&[u8]] = &[
        b"ACL", b"SETUSER", b"kw", b"on", b">pw", b"~*", b"&other", b"+@all",
    ];
    assert_eq!(direct.call(acl).await, b"+OK\r\n");
    // start_for opens the [upstream] table.
    let config = "username = \"kw\"\npassword = \"pw\"\n[hotkeys]\nwindow_ms = 200\n";
    let kw = Keyward::start_for(&redis, config, &[]);
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(c.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    // Until its first try, it is "not subscribed yet".
    let port = kw.port();
    let fleet_reply = || async move {
        let mut c = Raw::connect(port).await;
        let reply = c.call(&[b"KEYWARD", b"HOTKEYS", b"FLEET"]).await;
        String::from_utf8_lossy(&reply).to_string()
    };
    wait_until(
        "the fleet view names the refusal",
        Duration::from_secs(10),
        || async { fleet_reply().await.contains("NOPERM") },
    )
    .await;
    let text = fleet_reply().await;
    assert!(
        text.starts_with("-ERR fleet view unavailable: not subscribed to 'keyward:hotkeys'")
            && text.contains("NOPERM"),
        "{text}"
    );
    let (status, body) = http_get(kw.admin_port(), "/hotkeys?scope=fleet");
    assert!(status >= 500 && body.contains("NOPERM"), "{status} {body}");
    assert_eq!(c.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
}

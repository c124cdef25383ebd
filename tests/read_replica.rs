//! `sentinel.read_from = "replica"`: read-only commands go to a replica
//! that ROLE shows connected to the master, writes to the master, and
//! reads fall back to the master when no replica is left.

mod support;

use std::time::Duration;

use support::*;

/// `cmdstat_get` calls on a node (0 when none yet).
fn get_calls(port: u16) -> u64 {
    let info = String::from_utf8_lossy(&redis_cmd(port, &[b"INFO", b"commandstats"])).into_owned();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_fall_back_to_the_master() {
    let master = Redis::start();
    let mut replica = Redis::start_replica_of(&master);
    let sentinels = Sentinels::start(&master);
    let kw = Keyward::launch(
        None,
        Some("[sentinel]\nread_from = \"replica\"\n"),
        &sentinels
            .addrs()
            .iter()
            .flat_map(|a| ["--sentinel", a.as_str()])
            .chain(["--master-name", "mymaster"])
            .collect::<Vec<_>>(),
        true,
    );
    wait_until("keyward ready", DEADLINE, || async {
        http_get(kw.admin_port(), "/ready").0 == 200
    })
    .await;
    let mut raw = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&raw.call(&[b"SET", b"rk", b"v1"]).await),
        esc(b"+OK\r\n")
    );
    // The replica list is verified on the tracker's poll; once it is in
    // use, GETs land on the replica and not on the master.
    let rport = replica.port();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let before = get_calls(rport);
        let got = raw.call(&[b"GET", b"rk"]).await;
        if got == b"$2\r\nv1\r\n" && get_calls(rport) > before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reads never reached the replica"
        );
        tokio::time::sleep(POLL).await;
    }
    let (m0, r0) = (get_calls(master.port()), get_calls(replica.port()));
    for _ in 0..20 {
        assert_eq!(esc(&raw.call(&[b"GET", b"rk"]).await), esc(b"$2\r\nv1\r\n"));
    }
    assert_eq!(get_calls(master.port()), m0, "reads reached the master");
    assert_eq!(get_calls(replica.port()), r0 + 20);
    // A read may be stale, but never sees a write the client sent after it
    // (the write waits for the replica's answer).
    for i in 0..300 {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        let pipeline = [
            cmd(&[b"SET", b"fk", a.as_bytes()]),
            cmd(&[b"GET", b"fk"]),
            cmd(&[b"SET", b"fk", b.as_bytes()]),
        ]
        .concat();
        raw.send(&pipeline).await;
        let replies = raw.read_replies(3).await;
        assert_ne!(
            esc(&replies[1]),
            esc(&bulk(b.as_bytes())),
            "round {i}: the GET saw the SET after it"
        );
    }
    assert!(
        get_calls(replica.port()) > r0 + 20,
        "reads reached the replica"
    );
    // Writes still go to the master (the replica is read-only).
    assert_eq!(
        esc(&raw.call(&[b"SET", b"rk", b"v2"]).await),
        esc(b"+OK\r\n")
    );
    // The replica goes away: reads are answered by the master again.
    replica.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = raw.call(&[b"GET", b"rk"]).await;
        if got == b"$2\r\nv2\r\n" {
            break;
        }
        // Until the tracker drops it, a read on the dead replica may fail
        // over to the master (a retried read) or report the loss.
        assert!(
            got.starts_with(b"-ERR") || got.starts_with(b"$2\r\nv1"),
            "unexpected {}",
            esc(&got)
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "reads never came back from the master"
        );
    }
    assert!(get_calls(master.port()) > m0);
}

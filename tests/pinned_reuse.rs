//! Dedicated connections given back are RESET and reused
//! (`upstream.max_idle_pinned`): back-to-back transactions cost no new
//! upstream connection each, and nothing of one client's state (database,
//! name, subscriptions) reaches the next client that gets the connection.

mod support;

use support::*;

const QUIET: &str = "[hotkeys]\nfleet = false\n[cache]\nmax_mb = 0\n";

/// Redis's `total_connections_received`, asked on `direct` (a connection
/// of its own would count itself).
async fn connections_received(direct: &mut Raw) -> u64 {
    let info = direct.call(&[b"INFO", b"stats"]).await;
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

async fn idle_pinned(kw: &Keyward) -> f64 {
    metric(&metrics(kw).await, "keyward_pinned_idle_connections").unwrap_or(0.0)
}

async fn wait_idle_pinned(kw: &Keyward, n: f64) {
    wait_until(
        &format!("{n} pinned connection(s) kept for reuse"),
        DEADLINE,
        || async { idle_pinned(kw).await == n },
    )
    .await;
}

/// 200 transactions back to back on one client: their replies are right,
/// and they share one reset upstream connection instead of opening 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_transactions_reuse_one_connection() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut direct = Raw::connect(redis.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(c.call(&[b"PING"]).await, b"+PONG\r\n");
    let before = connections_received(&mut direct).await;
    for i in 1..=200u32 {
        assert_eq!(c.call(&[b"MULTI"]).await, b"+OK\r\n");
        assert_eq!(c.call(&[b"INCR", b"n"]).await, b"+QUEUED\r\n");
        assert_eq!(
            esc(&c.call(&[b"EXEC"]).await),
            esc(format!("*1\r\n:{i}\r\n").as_bytes())
        );
    }
    let opened = connections_received(&mut direct).await - before;
    eprintln!("200 transactions opened {opened} upstream connection(s)");
    assert!(
        opened <= 5,
        "200 back-to-back transactions opened {opened} upstream connections"
    );
    wait_idle_pinned(&kw, 1.0).await;
}

/// A connection given back carries nothing to the next client: not the
/// database, the name, nor the subscriptions of the client before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_starts_clean() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut direct = Raw::connect(redis.port()).await;

    // A: a transaction in database 2 (its connection is opened there and
    // given back after EXEC).
    let mut a = Raw::connect(kw.port()).await;
    for (req, want) in [
        (&[&b"SELECT"[..], b"2"][..], &b"+OK\r\n"[..]),
        (&[b"MULTI"], b"+OK\r\n"),
        (&[b"SET", b"only2", b"x"], b"+QUEUED\r\n"),
        (&[b"EXEC"], b"*1\r\n+OK\r\n"),
    ] {
        assert_eq!(esc(&a.call(req).await), esc(want));
    }
    wait_idle_pinned(&kw, 1.0).await;
    let before = connections_received(&mut direct).await;

    // B gets that connection: in database 0, without a name.
    let mut b = Raw::connect(kw.port()).await;
    assert_eq!(b.call(&[b"MULTI"]).await, b"+OK\r\n");
    assert_eq!(b.call(&[b"GET", b"only2"]).await, b"+QUEUED\r\n");
    assert_eq!(b.call(&[b"CLIENT", b"GETNAME"]).await, b"+QUEUED\r\n");
    assert_eq!(esc(&b.call(&[b"EXEC"]).await), esc(b"*2\r\n$-1\r\n$-1\r\n"));
    assert_eq!(
        connections_received(&mut direct).await,
        before,
        "B's transaction should have reused A's connection"
    );
    // CLIENT GETNAME keeps B on its connection until RESET gives it back.
    assert_eq!(b.call(&[b"RESET"]).await, b"+RESET\r\n");
    wait_idle_pinned(&kw, 1.0).await;

    // C subscribes and unsubscribes; D gets the connection and must not
    // receive what is published to C's channel.
    let mut c = Raw::connect(kw.port()).await;
    c.send(&cmd(&[b"SUBSCRIBE", b"ch"])).await;
    assert_eq!(
        esc(&c.read_reply().await),
        esc(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
    );
    c.send(&cmd(&[b"UNSUBSCRIBE", b"ch"])).await;
    assert_eq!(
        esc(&c.read_reply().await),
        esc(b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n")
    );
    assert_eq!(c.call(&[b"PING"]).await, b"+PONG\r\n");
    wait_idle_pinned(&kw, 1.0).await;
    let mut d = Raw::connect(kw.port()).await;
    assert_eq!(d.call(&[b"MULTI"]).await, b"+OK\r\n");
    let mut publisher = Raw::connect(redis.port()).await;
    assert_eq!(
        publisher.call(&[b"PUBLISH", b"ch", b"m"]).await,
        b":0\r\n",
        "nobody is subscribed to ch any more"
    );
    assert_eq!(d.call(&[b"PING"]).await, b"+QUEUED\r\n");
    assert_eq!(esc(&d.call(&[b"EXEC"]).await), esc(b"*1\r\n+PONG\r\n"));
}

/// `upstream.max_idle_pinned = 0`: connections given back are closed, as
/// each transaction's new connection shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_idle_pinned_zero_closes_connections_given_back() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, &format!("max_idle_pinned = 0\n{QUIET}"), &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut direct = Raw::connect(redis.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    assert_eq!(c.call(&[b"PING"]).await, b"+PONG\r\n");
    let before = connections_received(&mut direct).await;
    for _ in 0..5 {
        assert_eq!(c.call(&[b"MULTI"]).await, b"+OK\r\n");
        assert_eq!(esc(&c.call(&[b"EXEC"]).await), esc(b"*0\r\n"));
        // Given back before the next MULTI (the pinned gauge drops to 0).
        wait_until("the pinned connection given back", DEADLINE, || async {
            metric(&metrics(&kw).await, "keyward_pinned_connections") == Some(0.0)
        })
        .await;
    }
    assert_eq!(connections_received(&mut direct).await - before, 5);
    assert_eq!(idle_pinned(&kw).await, 0.0);
}

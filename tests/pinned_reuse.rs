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

/// The integer of a `:n` reply.
fn int_reply(r: &[u8]) -> i64 {
    std::str::from_utf8(r)
        .ok()
        .and_then(|s| s.strip_prefix(':'))
        .and_then(|s| s.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("not an integer reply: {}", esc(r)))
}

/// A connection whose id its client learned (CLIENT ID, here a tracking
/// REDIRECT target) or that ran CLIENT TRACKING is closed when given back,
/// not reused: the tracking client learns its target is gone
/// (`tracking-redir-broken`, as with Redis), and a new client neither
/// inherits the target's invalidations nor the keys another client had
/// tracked on that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_tied_to_tracking_are_not_reused() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut direct = Raw::connect(redis.port()).await;

    // X is the redirect target of Y's tracking.
    let mut x = Raw::connect(kw.port()).await;
    let x_id = int_reply(&x.call(&[b"CLIENT", b"ID"]).await);
    x.send(&cmd(&[b"SUBSCRIBE", b"__redis__:invalidate"])).await;
    assert!(x.read_reply().await.starts_with(b"*3\r\n$9\r\nsubscribe"));
    let mut y = Raw::connect_resp3(kw.port()).await;
    let id = x_id.to_string();
    assert_eq!(
        esc(&y
            .call(&[b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", id.as_bytes()])
            .await),
        esc(b"+OK\r\n")
    );
    assert_eq!(esc(&y.call(&[b"GET", b"rl1"]).await), esc(b"_\r\n"));
    drop(x);
    let redis_port = redis.port();
    wait_until("the target's connection closed at Redis", DEADLINE, || {
        let id = id.clone();
        async move {
            let mut d = Raw::connect(redis_port).await;
            d.call(&[b"CLIENT", b"LIST", b"ID", id.as_bytes()]).await == b"$0\r\n\r\n"
        }
    })
    .await;
    // Z may get any connection, but never the target's.
    let mut z = Raw::connect(kw.port()).await;
    let z_id = int_reply(&z.call(&[b"CLIENT", b"ID"]).await);
    assert_ne!(z_id, x_id, "the redirect target's connection was reused");
    z.send(&cmd(&[b"SUBSCRIBE", b"__redis__:invalidate"])).await;
    assert!(z.read_reply().await.starts_with(b"*3\r\n$9\r\nsubscribe"));
    assert_eq!(
        esc(&direct.call(&[b"SET", b"rl1", b"v1"]).await),
        esc(b"+OK\r\n")
    );
    let broken = format!(">2\r\n$21\r\ntracking-redir-broken\r\n:{x_id}\r\n");
    assert_eq!(esc(&y.read_reply().await), esc(broken.as_bytes()));
    assert_eq!(
        esc(&z.call(&[b"PING"]).await),
        esc(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    );

    // T tracks tr1 and leaves; U, tracking too, never read tr1.
    let mut t = Raw::connect_resp3(kw.port()).await;
    assert_eq!(
        esc(&t.call(&[b"CLIENT", b"TRACKING", b"ON"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(esc(&t.call(&[b"GET", b"tr1"]).await), esc(b"_\r\n"));
    drop(t);
    let mut u = Raw::connect_resp3(kw.port()).await;
    assert_eq!(
        esc(&u.call(&[b"CLIENT", b"TRACKING", b"ON"]).await),
        esc(b"+OK\r\n")
    );
    assert_eq!(
        esc(&direct.call(&[b"SET", b"tr1", b"v1"]).await),
        esc(b"+OK\r\n")
    );
    // An invalidation of tr1 would come before the PONG.
    assert_eq!(esc(&u.call(&[b"PING"]).await), esc(b"+PONG\r\n"));
}

/// `CLIENT NO-EVICT on` survives RESET at Redis: a connection it was sent on
/// is closed when given back, never handed to the next client (which would
/// become exempt from client eviction without asking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_evict_does_not_pass_to_the_next_client() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, QUIET, &[]);
    wait_ready(&kw, DEADLINE).await;
    for end in [&b"RESET"[..], b"QUIT"] {
        let mut a = Raw::connect(kw.port()).await;
        assert_eq!(
            esc(&a.call(&[b"CLIENT", b"NO-EVICT", b"on"]).await),
            esc(b"+OK\r\n")
        );
        // (Not CLIENT INFO here: that alone keeps the connection from reuse.)
        let list = redis.call(&[b"CLIENT", b"LIST"]);
        assert!(
            String::from_utf8_lossy(&list).contains(" flags=e "),
            "{}",
            esc(&list)
        );
        let want: &[u8] = if end == b"RESET" {
            b"+RESET\r\n"
        } else {
            b"+OK\r\n"
        };
        assert_eq!(esc(&a.call(&[end]).await), esc(want));
        let mut b = Raw::connect(kw.port()).await;
        let info = b.call(&[b"CLIENT", b"INFO"]).await;
        assert!(
            String::from_utf8_lossy(&info).contains(" flags=N "),
            "after {}: {}",
            String::from_utf8_lossy(end),
            esc(&info)
        );
        assert_eq!(esc(&b.call(&[b"RESET"]).await), esc(b"+RESET\r\n"));
    }
}

//! Stateful command families through keyward, byte-exact on the wire:
//! transactions (MULTI/EXEC/DISCARD/WATCH), blocking commands, Pub/Sub in
//! RESP2 and RESP3 (channels, patterns, shard channels), MONITOR, SELECT,
//! per-connection CLIENT state (SETNAME, ID, REPLY), RESET and QUIT, and a
//! pipeline that crosses all of them.
//!
//! These are the commands keyward cannot serve from its shared upstream
//! connections, so each test checks both the replies and that the state
//! stays with the one client that created it: other clients through the
//! proxy must neither see it nor wait for it. Where Redis's own answer is the
//! reference, the same bytes are also sent straight to the redis-server.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Start a redis-server and a keyward in front of it, and wait until keyward
/// reports ready (`GET /ready` is 200: upstream connected, command table
/// loaded); before that keyward fails requests fast by design.
async fn setup() -> (Redis, Keyward) {
    let redis = Redis::start();
    let kw = Keyward::start(&redis.addr());
    wait_ready(&kw, DEADLINE).await;
    (redis, kw)
}

/// Assert `got == want`, showing both escaped.
#[track_caller]
fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(esc(got), esc(want), "{what}");
}

/// Poll redis's `INFO clients` until `blocked_clients:<n>`: proof that a
/// blocking command sent through keyward really is blocked upstream.
async fn wait_blocked(redis_port: u16, n: usize) {
    let needle = format!("blocked_clients:{n}\r\n");
    wait_until(
        &format!("redis reports {}", needle.trim()),
        DEADLINE,
        move || {
            let needle = needle.clone();
            async move {
                let mut probe = Raw::connect(redis_port).await;
                let info = probe.call(&[b"INFO", b"clients"]).await;
                String::from_utf8_lossy(&info).contains(&needle)
            }
        },
    )
    .await;
}

/// Send `frames` and read replies until (and including) the first one equal
/// to `last`: for sequences where some commands get no reply at all.
async fn replies_until(c: &mut Raw, frames: &[u8], last: &[u8]) -> Vec<u8> {
    c.send(frames).await;
    let mut out = Vec::new();
    loop {
        let r = c.read_reply().await;
        out.extend_from_slice(&r);
        if r == last {
            return out;
        }
    }
}

/// Concatenate encoded commands into one write.
fn pipeline(cmds: &[&[&[u8]]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| cmd(c)).collect()
}

// ---------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_discard_and_watch() {
    let (redis, kw) = setup().await;
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;

    // MULTI / SET / INCR / EXEC returns every queued command's reply.
    let table: &[(&[&[u8]], &[u8])] = &[
        (&[b"MULTI"], b"+OK\r\n"),
        (&[b"SET", b"t", b"1"], b"+QUEUED\r\n"),
        (&[b"INCR", b"t"], b"+QUEUED\r\n"),
        (&[b"EXEC"], b"*2\r\n+OK\r\n:2\r\n"),
        (&[b"GET", b"t"], b"$1\r\n2\r\n"),
        // DISCARD drops what was queued.
        (&[b"MULTI"], b"+OK\r\n"),
        (&[b"SET", b"d", b"1"], b"+QUEUED\r\n"),
        (&[b"DISCARD"], b"+OK\r\n"),
        (&[b"GET", b"d"], b"$-1\r\n"),
        // EXEC / DISCARD without MULTI are errors, as on Redis.
        (&[b"EXEC"], b"-ERR EXEC without MULTI\r\n"),
        (&[b"DISCARD"], b"-ERR DISCARD without MULTI\r\n"),
        // WATCH with no conflicting write: EXEC runs.
        (&[b"WATCH", b"w"], b"+OK\r\n"),
        (&[b"MULTI"], b"+OK\r\n"),
        (&[b"SET", b"w", b"mine"], b"+QUEUED\r\n"),
        (&[b"EXEC"], b"*1\r\n+OK\r\n"),
        (&[b"GET", b"w"], b"$4\r\nmine\r\n"),
    ];
    for (req, want) in table {
        same(
            &format!("{} through keyward", esc(&cmd(req))),
            &a.call(req).await,
            want,
        );
    }

    // Other clients see the transaction's effect only after EXEC.
    same("MULTI", &a.call(&[b"MULTI"]).await, b"+OK\r\n");
    same(
        "queued SET",
        &a.call(&[b"SET", b"iso", b"x"]).await,
        b"+QUEUED\r\n",
    );
    same(
        "B's GET before EXEC",
        &b.call(&[b"GET", b"iso"]).await,
        b"$-1\r\n",
    );
    same("EXEC", &a.call(&[b"EXEC"]).await, b"*1\r\n+OK\r\n");
    same(
        "B's GET after EXEC",
        &b.call(&[b"GET", b"iso"]).await,
        b"$1\r\nx\r\n",
    );

    // WATCH, then a conflicting write from another client through keyward:
    // EXEC aborts with a null array and nothing queued runs.
    same("WATCH", &a.call(&[b"WATCH", b"w"]).await, b"+OK\r\n");
    same(
        "B's conflicting SET",
        &b.call(&[b"SET", b"w", b"changed"]).await,
        b"+OK\r\n",
    );
    same("MULTI", &a.call(&[b"MULTI"]).await, b"+OK\r\n");
    same(
        "queued SET",
        &a.call(&[b"SET", b"w", b"mine2"]).await,
        b"+QUEUED\r\n",
    );
    same(
        "queued INCR",
        &a.call(&[b"INCR", b"counter"]).await,
        b"+QUEUED\r\n",
    );
    same(
        "EXEC after a conflict",
        &a.call(&[b"EXEC"]).await,
        b"*-1\r\n",
    );

    // The client keeps working, and the aborted commands had no effect.
    same(
        "GET after aborted EXEC",
        &a.call(&[b"GET", b"w"]).await,
        b"$7\r\nchanged\r\n",
    );
    same(
        "GET counter",
        &a.call(&[b"GET", b"counter"]).await,
        b"$-1\r\n",
    );
    same(
        "SET after",
        &a.call(&[b"SET", b"after", b"1"]).await,
        b"+OK\r\n",
    );
    same(
        "direct GET w",
        &redis.call(&[b"GET", b"w"]),
        b"$7\r\nchanged\r\n",
    );

    // UNWATCH clears the watch: a later conflicting write no longer aborts.
    same("WATCH", &a.call(&[b"WATCH", b"w"]).await, b"+OK\r\n");
    same("UNWATCH", &a.call(&[b"UNWATCH"]).await, b"+OK\r\n");
    same(
        "B's SET",
        &b.call(&[b"SET", b"w", b"again"]).await,
        b"+OK\r\n",
    );
    same("MULTI", &a.call(&[b"MULTI"]).await, b"+OK\r\n");
    same("queued GET", &a.call(&[b"GET", b"w"]).await, b"+QUEUED\r\n");
    same("EXEC", &a.call(&[b"EXEC"]).await, b"*1\r\n$5\r\nagain\r\n");

    // A queued command with a syntax error aborts the whole transaction.
    same("MULTI", &a.call(&[b"MULTI"]).await, b"+OK\r\n");
    let bad = a.call(&[b"SET", b"only-one-arg"]).await;
    same(
        "bad queued command",
        &bad,
        b"-ERR wrong number of arguments for 'set' command\r\n",
    );
    same(
        "EXEC after a queuing error",
        &a.call(&[b"EXEC"]).await,
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    );
    same("PING after", &a.call(&[b"PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// Blocking commands
// ---------------------------------------------------------------------------

/// One blocking command, woken by another client's write.
struct BlockingCase {
    name: &'static str,
    block: &'static [&'static [u8]],
    wake: &'static [&'static [u8]],
    wake_reply: &'static [u8],
    blocked_reply: &'static [u8],
    /// A read (through another client) and its reply after the wake-up.
    after: (&'static [&'static [u8]], &'static [u8]),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_wake_and_do_not_stall_others() {
    let (redis, kw) = setup().await;
    let cases = [
        BlockingCase {
            name: "BLPOP",
            block: &[b"BLPOP", b"bl", b"0"],
            wake: &[b"LPUSH", b"bl", b"x"],
            wake_reply: b":1\r\n",
            blocked_reply: b"*2\r\n$2\r\nbl\r\n$1\r\nx\r\n",
            after: (&[b"EXISTS", b"bl"], b":0\r\n"),
        },
        BlockingCase {
            name: "BRPOP",
            block: &[b"BRPOP", b"br", b"0"],
            wake: &[b"RPUSH", b"br", b"a", b"b"],
            wake_reply: b":2\r\n",
            blocked_reply: b"*2\r\n$2\r\nbr\r\n$1\r\nb\r\n",
            after: (&[b"LRANGE", b"br", b"0", b"-1"], b"*1\r\n$1\r\na\r\n"),
        },
        BlockingCase {
            name: "BLMOVE",
            block: &[b"BLMOVE", b"src", b"dst", b"LEFT", b"RIGHT", b"0"],
            wake: &[b"LPUSH", b"src", b"e"],
            wake_reply: b":1\r\n",
            blocked_reply: b"$1\r\ne\r\n",
            after: (&[b"LRANGE", b"dst", b"0", b"-1"], b"*1\r\n$1\r\ne\r\n"),
        },
        BlockingCase {
            name: "BZPOPMIN",
            block: &[b"BZPOPMIN", b"z", b"0"],
            wake: &[b"ZADD", b"z", b"1", b"m"],
            wake_reply: b":1\r\n",
            blocked_reply: b"*3\r\n$1\r\nz\r\n$1\r\nm\r\n$1\r\n1\r\n",
            after: (&[b"ZCARD", b"z"], b":0\r\n"),
        },
        BlockingCase {
            name: "XREAD BLOCK",
            block: &[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"s", b"$"],
            wake: &[b"XADD", b"s", b"1-1", b"f", b"v"],
            wake_reply: b"$3\r\n1-1\r\n",
            blocked_reply:
                b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n",
            after: (&[b"XLEN", b"s"], b":1\r\n"),
        },
    ];

    let mut b = Raw::connect(kw.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    for case in &cases {
        let name = case.name;
        let mut a = Raw::connect(kw.port()).await;
        a.send(&cmd(case.block)).await;
        wait_blocked(redis.port(), 1).await;

        // A third client is not held up by A's blocked command.
        let key = format!("third:{name}");
        same(
            &format!("{name}: third client's SET while A is blocked"),
            &c.call(&[b"SET", key.as_bytes(), b"free"]).await,
            b"+OK\r\n",
        );
        same(
            &format!("{name}: third client's GET while A is blocked"),
            &c.call(&[b"GET", key.as_bytes()]).await,
            b"$4\r\nfree\r\n",
        );
        // ...and those completed while A was still blocked.
        let info = String::from_utf8_lossy(&redis.call(&[b"INFO", b"clients"])).into_owned();
        assert!(
            info.contains("blocked_clients:1\r\n"),
            "{name}: A should still be blocked after the third client's commands:\n{info}"
        );

        same(
            &format!("{name}: waking write from B"),
            &b.call(case.wake).await,
            case.wake_reply,
        );
        same(
            &format!("{name}: A's reply once woken"),
            &a.read_reply().await,
            case.blocked_reply,
        );
        same(
            &format!("{name}: state after the wake-up"),
            &b.call(case.after.0).await,
            case.after.1,
        );
        // A is an ordinary client again.
        same(
            &format!("{name}: A's SET afterwards"),
            &a.call(&[b"SET", b"a-after", name.as_bytes()]).await,
            b"+OK\r\n",
        );
        same(
            &format!("{name}: A's GET afterwards"),
            &a.call(&[b"GET", b"a-after"]).await,
            &[format!("${}\r\n{name}\r\n", name.len()).as_bytes()].concat(),
        );
        wait_blocked(redis.port(), 0).await;
    }

    // Timeouts and non-blocking forms.
    let mut a = Raw::connect(kw.port()).await;
    same("WAIT 0 0", &a.call(&[b"WAIT", b"0", b"0"]).await, b":0\r\n");
    let started = Instant::now();
    same(
        "BLPOP with a 0.1 s timeout on an empty list",
        &a.call(&[b"BLPOP", b"empty", b"0.1"]).await,
        b"*-1\r\n",
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "BLPOP 0.1 returned before its timeout ({:?})",
        started.elapsed()
    );
    same(
        "BZPOPMIN with a timeout",
        &a.call(&[b"BZPOPMIN", b"emptyz", b"0.1"]).await,
        b"*-1\r\n",
    );
    same(
        "XREAD BLOCK with a timeout",
        &a.call(&[b"XREAD", b"BLOCK", b"100", b"STREAMS", b"nostream", b"$"])
            .await,
        b"*-1\r\n",
    );
    same(
        "BLPOP on a non-empty list answers at once",
        &{
            same(
                "RPUSH",
                &a.call(&[b"RPUSH", b"full", b"1"]).await,
                b":1\r\n",
            );
            a.call(&[b"BLPOP", b"full", b"0"]).await
        },
        b"*2\r\n$4\r\nfull\r\n$1\r\n1\r\n",
    );
    same("PING after", &a.call(&[b"PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// Pub/Sub
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_psubscribe_in_resp2() {
    let (redis, kw) = setup().await;
    let mut sub = Raw::connect(kw.port()).await;
    let mut publisher = Raw::connect(kw.port()).await;

    sub.send(&cmd(&[b"SUBSCRIBE", b"ch1", b"ch2"])).await;
    sub.expect(b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n")
        .await;
    sub.expect(b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch2\r\n:2\r\n")
        .await;
    same(
        "PSUBSCRIBE",
        &sub.call(&[b"PSUBSCRIBE", b"p.*"]).await,
        b"*3\r\n$10\r\npsubscribe\r\n$3\r\np.*\r\n:3\r\n",
    );

    // PUBLISH through keyward reaches the subscriber through keyward.
    same(
        "PUBLISH ch1",
        &publisher.call(&[b"PUBLISH", b"ch1", b"hello"]).await,
        b":1\r\n",
    );
    same(
        "message on ch1",
        &sub.read_reply().await,
        b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n",
    );
    same(
        "PUBLISH p.x",
        &publisher.call(&[b"PUBLISH", b"p.x", b"hi"]).await,
        b":1\r\n",
    );
    same(
        "pmessage on p.x",
        &sub.read_reply().await,
        b"*4\r\n$8\r\npmessage\r\n$3\r\np.*\r\n$3\r\np.x\r\n$2\r\nhi\r\n",
    );
    // Binary payloads are delivered verbatim.
    same(
        "PUBLISH binary",
        &publisher.call(&[b"PUBLISH", b"ch2", b"a\r\n\0b"]).await,
        b":1\r\n",
    );
    same(
        "binary message on ch2",
        &sub.read_reply().await,
        b"*3\r\n$7\r\nmessage\r\n$3\r\nch2\r\n$5\r\na\r\n\0b\r\n",
    );

    // In RESP2 subscribed mode only (P|S)(UN)SUBSCRIBE, PING, QUIT and RESET
    // are allowed: keyward gives exactly Redis's answers.
    let mut direct = Raw::connect(redis.port()).await;
    same(
        "direct SUBSCRIBE",
        &direct.call(&[b"SUBSCRIBE", b"other"]).await,
        b"*3\r\n$9\r\nsubscribe\r\n$5\r\nother\r\n:1\r\n",
    );
    let while_subscribed: [&[&[u8]]; 3] = [&[b"GET", b"k"], &[b"PING"], &[b"PING", b"hey"]];
    for req in while_subscribed {
        let want = direct.call(req).await;
        same(
            &format!("{} while subscribed (vs redis)", esc(&cmd(req))),
            &sub.call(req).await,
            &want,
        );
    }

    same(
        "UNSUBSCRIBE ch1 ch2 (first reply)",
        &{
            sub.send(&cmd(&[b"UNSUBSCRIBE", b"ch1", b"ch2"])).await;
            sub.read_reply().await
        },
        b"*3\r\n$11\r\nunsubscribe\r\n$3\r\nch1\r\n:2\r\n",
    );
    same(
        "UNSUBSCRIBE ch1 ch2 (second reply)",
        &sub.read_reply().await,
        b"*3\r\n$11\r\nunsubscribe\r\n$3\r\nch2\r\n:1\r\n",
    );
    same(
        "PUBLISH to a channel nobody listens on",
        &publisher.call(&[b"PUBLISH", b"ch1", b"lost"]).await,
        b":0\r\n",
    );
    same(
        "PUNSUBSCRIBE",
        &sub.call(&[b"PUNSUBSCRIBE"]).await,
        b"*3\r\n$12\r\npunsubscribe\r\n$3\r\np.*\r\n:0\r\n",
    );

    // Out of subscribed mode: ordinary commands work on the same connection.
    same(
        "SET after",
        &sub.call(&[b"SET", b"k", b"v"]).await,
        b"+OK\r\n",
    );
    same(
        "GET after",
        &sub.call(&[b"GET", b"k"]).await,
        b"$1\r\nv\r\n",
    );
    same("PING after", &sub.call(&[b"PING"]).await, b"+PONG\r\n");
    same(
        "PUBLISH after unsubscribing",
        &publisher.call(&[b"PUBLISH", b"p.x", b"gone"]).await,
        b":0\r\n",
    );
    assert!(
        !sub.is_closed_within(Duration::from_millis(200)).await && sub.buffered().is_empty(),
        "no message may arrive after unsubscribing: {}",
        esc(sub.buffered())
    );

    // UNSUBSCRIBE with no subscriptions answers like Redis.
    let mut fresh_direct = Raw::connect(redis.port()).await;
    same(
        "UNSUBSCRIBE when not subscribed (vs redis)",
        &sub.call(&[b"UNSUBSCRIBE"]).await,
        &fresh_direct.call(&[b"UNSUBSCRIBE"]).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssubscribe_and_spublish() {
    let (_redis, kw) = setup().await;
    let mut sub = Raw::connect(kw.port()).await;
    let mut publisher = Raw::connect(kw.port()).await;

    same(
        "SSUBSCRIBE",
        &sub.call(&[b"SSUBSCRIBE", b"sch"]).await,
        b"*3\r\n$10\r\nssubscribe\r\n$3\r\nsch\r\n:1\r\n",
    );
    same(
        "SPUBLISH",
        &publisher.call(&[b"SPUBLISH", b"sch", b"m"]).await,
        b":1\r\n",
    );
    same(
        "smessage",
        &sub.read_reply().await,
        b"*3\r\n$8\r\nsmessage\r\n$3\r\nsch\r\n$1\r\nm\r\n",
    );
    same(
        "SUNSUBSCRIBE",
        &sub.call(&[b"SUNSUBSCRIBE", b"sch"]).await,
        b"*3\r\n$12\r\nsunsubscribe\r\n$3\r\nsch\r\n:0\r\n",
    );
    same(
        "SPUBLISH after",
        &publisher.call(&[b"SPUBLISH", b"sch", b"gone"]).await,
        b":0\r\n",
    );
    same(
        "SET after",
        &sub.call(&[b"SET", b"k", b"v"]).await,
        b"+OK\r\n",
    );
    same(
        "GET after",
        &sub.call(&[b"GET", b"k"]).await,
        b"$1\r\nv\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_in_resp3_uses_pushes_and_allows_commands() {
    let (_redis, kw) = setup().await;
    let mut sub = Raw::connect(kw.port()).await;
    let mut publisher = Raw::connect(kw.port()).await;
    same(
        "SET",
        &publisher.call(&[b"SET", b"k", b"v"]).await,
        b"+OK\r\n",
    );

    let hello = sub.call(&[b"HELLO", b"3"]).await;
    assert!(hello.starts_with(b"%7\r\n"), "HELLO 3: {}", esc(&hello));
    same(
        "SUBSCRIBE in RESP3",
        &sub.call(&[b"SUBSCRIBE", b"ch"]).await,
        b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    );
    same(
        "PSUBSCRIBE in RESP3",
        &sub.call(&[b"PSUBSCRIBE", b"c*"]).await,
        b">3\r\n$10\r\npsubscribe\r\n$2\r\nc*\r\n:2\r\n",
    );
    // RESP3 lets a subscribed connection run ordinary commands.
    same(
        "GET while subscribed",
        &sub.call(&[b"GET", b"k"]).await,
        b"$1\r\nv\r\n",
    );
    same(
        "GET missing while subscribed",
        &sub.call(&[b"GET", b"nope"]).await,
        b"_\r\n",
    );
    same(
        "PING while subscribed",
        &sub.call(&[b"PING"]).await,
        b"+PONG\r\n",
    );

    same(
        "PUBLISH",
        &publisher.call(&[b"PUBLISH", b"ch", b"x"]).await,
        b":2\r\n",
    );
    // Redis delivers the channel message, then the pattern one.
    same(
        "message push",
        &sub.read_reply().await,
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n",
    );
    same(
        "pmessage push",
        &sub.read_reply().await,
        b">4\r\n$8\r\npmessage\r\n$2\r\nc*\r\n$2\r\nch\r\n$1\r\nx\r\n",
    );
    // A command sent after the publish completed: Redis has already queued
    // both pushes on the subscriber's connection, so they come first, whole,
    // and the GET reply follows (exactly what a direct connection sees).
    same(
        "PUBLISH again",
        &publisher.call(&[b"PUBLISH", b"ch", b"y"]).await,
        b":2\r\n",
    );
    sub.send(&cmd(&[b"GET", b"k"])).await;
    let got = sub.read_replies(3).await;
    let want: [&[u8]; 3] = [
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\ny\r\n",
        b">4\r\n$8\r\npmessage\r\n$2\r\nc*\r\n$2\r\nch\r\n$1\r\ny\r\n",
        b"$1\r\nv\r\n",
    ];
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        same(&format!("frame #{i} after PUBLISH then GET"), g, w);
    }

    same(
        "UNSUBSCRIBE",
        &sub.call(&[b"UNSUBSCRIBE", b"ch"]).await,
        b">3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:1\r\n",
    );
    same(
        "PUNSUBSCRIBE",
        &sub.call(&[b"PUNSUBSCRIBE", b"c*"]).await,
        b">3\r\n$12\r\npunsubscribe\r\n$2\r\nc*\r\n:0\r\n",
    );
    same(
        "SET after",
        &sub.call(&[b"SET", b"k2", b"w"]).await,
        b"+OK\r\n",
    );
    same(
        "GET after",
        &sub.call(&[b"GET", b"k2"]).await,
        b"$1\r\nw\r\n",
    );
    same(
        "PUBLISH after",
        &publisher.call(&[b"PUBLISH", b"ch", b"z"]).await,
        b":0\r\n",
    );
}

// ---------------------------------------------------------------------------
// MONITOR
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_sees_other_clients_commands() {
    let (_redis, kw) = setup().await;
    let mut mon = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;

    same("MONITOR", &mon.call(&[b"MONITOR"]).await, b"+OK\r\n");
    same(
        "SET through keyward",
        &b.call(&[b"SET", b"mon", b"v"]).await,
        b"+OK\r\n",
    );

    // MONITOR lines are status replies; anything else keyward itself sends
    // upstream may show up too, so look for ours within the deadline.
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let line = mon.read_reply().await;
        assert!(
            line.starts_with(b"+"),
            "MONITOR output must be status lines: {}",
            esc(&line)
        );
        let text = String::from_utf8_lossy(&line).into_owned();
        if text.contains(r#""SET" "mon" "v""#) {
            break;
        }
        seen.push(text);
        assert!(
            Instant::now() < deadline,
            "MONITOR did not show \"SET\" \"mon\" \"v\" within {DEADLINE:?}; saw: {seen:?}"
        );
    }
    // Other clients are unaffected by someone monitoring.
    same("GET by B", &b.call(&[b"GET", b"mon"]).await, b"$1\r\nv\r\n");
}

/// A MONITOR line (`+<secs>.<micros> [...] ...`), as opposed to a reply.
fn is_monitor_line(frame: &[u8]) -> bool {
    let t = String::from_utf8_lossy(frame);
    let Some(rest) = t.strip_prefix('+') else {
        return false;
    };
    let (secs, rest) = rest.split_once('.').unwrap_or(("", ""));
    !secs.is_empty() && secs.bytes().all(|b| b.is_ascii_digit()) && rest.contains(" [")
}

/// The replies (MONITOR lines left out) up to and including `last`.
async fn replies_through(c: &mut Raw, last: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let f = c.read_reply().await;
        if is_monitor_line(&f) {
            continue;
        }
        let done = f == last;
        out.push(f);
        if done {
            return out;
        }
    }
}

/// A monitoring client's own requests (PING, RESET, HELLO ... SETNAME)
/// get every reply, in order, while MONITOR streams other clients' traffic
/// on the same connection: the lines are not taken for replies (they were,
/// so a RESET lost PONGs still owed and a HELLO's SETNAME leaked its +OK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitoring_client_gets_its_replies_in_order_under_traffic() {
    let (redis, kw) = setup().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let (stop, port) = (stop.clone(), redis.port());
        async move {
            let mut d = Raw::connect(port).await;
            let batch: Vec<u8> = (0..100).flat_map(|_| cmd(&[b"SET", b"k", b"v"])).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                d.send(&batch).await;
                d.read_replies(100).await;
            }
        }
    });
    for round in 0..5 {
        let mut mon = Raw::connect(kw.port()).await;
        same("MONITOR", &mon.call(&[b"MONITOR"]).await, b"+OK\r\n");
        let mut pipeline: Vec<u8> = (0..200).flat_map(|_| cmd(&[b"PING"])).collect();
        pipeline.extend(cmd(&[b"RESET"]));
        pipeline.extend(cmd(&[b"ECHO", b"after"]));
        mon.send(&pipeline).await;
        let got = replies_through(&mut mon, b"$5\r\nafter\r\n").await;
        let mut want = vec![b"+PONG\r\n".to_vec(); 200];
        want.push(b"+RESET\r\n".to_vec());
        want.push(b"$5\r\nafter\r\n".to_vec());
        assert_eq!(
            got.iter().map(|f| esc(f)).collect::<Vec<_>>(),
            want.iter().map(|f| esc(f)).collect::<Vec<_>>(),
            "round {round}"
        );

        let mut mon = Raw::connect(kw.port()).await;
        same("MONITOR", &mon.call(&[b"MONITOR"]).await, b"+OK\r\n");
        let mut pipeline = cmd(&[b"HELLO", b"2", b"SETNAME", b"foo"]);
        pipeline.extend(cmd(&[b"PING"]));
        pipeline.extend(cmd(&[b"CLIENT", b"GETNAME"]));
        mon.send(&pipeline).await;
        let got = replies_through(&mut mon, b"$3\r\nfoo\r\n").await;
        assert_eq!(
            got.len(),
            3,
            "round {round}: {:?}",
            got.iter().map(|f| esc(f)).collect::<Vec<_>>()
        );
        assert!(
            got[0].starts_with(b"*14\r\n$6\r\nserver\r\n"),
            "{}",
            esc(&got[0])
        );
        same("PING", &got[1], b"+PONG\r\n");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.await.expect("flood task");
}

// ---------------------------------------------------------------------------
// SELECT
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_is_per_client() {
    let (redis, kw) = setup().await;
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;

    same(
        "B sets in db 0",
        &b.call(&[b"SET", b"zero", b"db0"]).await,
        b"+OK\r\n",
    );
    same("SELECT 1", &a.call(&[b"SELECT", b"1"]).await, b"+OK\r\n");
    same(
        "SET in db 1",
        &a.call(&[b"SET", b"sel", b"one"]).await,
        b"+OK\r\n",
    );
    same(
        "GET in db 1",
        &a.call(&[b"GET", b"sel"]).await,
        b"$3\r\none\r\n",
    );
    same(
        "db 0 key not visible from db 1",
        &a.call(&[b"GET", b"zero"]).await,
        b"$-1\r\n",
    );

    // Another client through keyward is still in db 0.
    same(
        "B does not see db 1",
        &b.call(&[b"GET", b"sel"]).await,
        b"$-1\r\n",
    );
    same(
        "B still sees db 0",
        &b.call(&[b"GET", b"zero"]).await,
        b"$3\r\ndb0\r\n",
    );

    // It really went to db 1 upstream.
    let direct = redis_pipeline(redis.port(), &[&[b"SELECT", b"1"], &[b"GET", b"sel"]]);
    same("direct GET in db 1", &direct[1], b"$3\r\none\r\n");
    same(
        "direct GET in db 0",
        &redis.call(&[b"GET", b"sel"]),
        b"$-1\r\n",
    );

    // Bad SELECTs answer like Redis and leave the db unchanged.
    let mut d = Raw::connect(redis.port()).await;
    let bad_selects: [&[&[u8]]; 2] = [&[b"SELECT", b"99999"], &[b"SELECT", b"x"]];
    for req in bad_selects {
        let want = d.call(req).await;
        same(
            &format!("{} (vs redis)", esc(&cmd(req))),
            &a.call(req).await,
            &want,
        );
    }
    same(
        "still db 1",
        &a.call(&[b"GET", b"sel"]).await,
        b"$3\r\none\r\n",
    );

    same("SELECT 0", &a.call(&[b"SELECT", b"0"]).await, b"+OK\r\n");
    same(
        "db 0 data again",
        &a.call(&[b"GET", b"zero"]).await,
        b"$3\r\ndb0\r\n",
    );
    same(
        "db 1 data gone from view",
        &a.call(&[b"GET", b"sel"]).await,
        b"$-1\r\n",
    );
    same(
        "write in db 0",
        &a.call(&[b"SET", b"back", b"0"]).await,
        b"+OK\r\n",
    );
    same(
        "B sees it",
        &b.call(&[b"GET", b"back"]).await,
        b"$1\r\n0\r\n",
    );
}

// ---------------------------------------------------------------------------
// CLIENT state
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_setname_getname_and_id() {
    let (redis, kw) = setup().await;
    let mut a = Raw::connect(kw.port()).await;
    let mut b = Raw::connect(kw.port()).await;

    same(
        "GETNAME before",
        &a.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$-1\r\n",
    );
    same(
        "SETNAME x",
        &a.call(&[b"CLIENT", b"SETNAME", b"x"]).await,
        b"+OK\r\n",
    );
    same(
        "GETNAME",
        &a.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$1\r\nx\r\n",
    );
    same(
        "GETNAME again",
        &a.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$1\r\nx\r\n",
    );
    // The name belongs to A's connection only.
    same(
        "B's GETNAME",
        &b.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$-1\r\n",
    );
    let mut direct = Raw::connect(redis.port()).await;
    let refused = direct.call(&[b"CLIENT", b"SETNAME", b"a b"]).await;
    assert!(
        refused.starts_with(b"-ERR "),
        "redis refuses a name with a space: {}",
        esc(&refused)
    );
    same(
        "SETNAME with a space is refused like Redis",
        &a.call(&[b"CLIENT", b"SETNAME", b"a b"]).await,
        &refused,
    );
    same(
        "name unchanged",
        &a.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$1\r\nx\r\n",
    );

    let id1 = a.call(&[b"CLIENT", b"ID"]).await;
    assert!(
        id1.starts_with(b":") && id1.ends_with(b"\r\n") && id1.len() > 3,
        "CLIENT ID is an integer: {}",
        esc(&id1)
    );
    same(
        "GET in between",
        &a.call(&[b"GET", b"nothing"]).await,
        b"$-1\r\n",
    );
    let id2 = a.call(&[b"CLIENT", b"ID"]).await;
    same("CLIENT ID twice on one connection", &id2, &id1);
    let other = b.call(&[b"CLIENT", b"ID"]).await;
    assert!(other.starts_with(b":"), "B's CLIENT ID: {}", esc(&other));
    assert_ne!(
        esc(&other),
        esc(&id1),
        "two clients must not share a CLIENT ID"
    );
    same(
        "B's id is stable too",
        &b.call(&[b"CLIENT", b"ID"]).await,
        &other,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_on_skip_matches_redis() {
    let (redis, kw) = setup().await;

    let skip = pipeline(&[
        &[b"CLIENT", b"REPLY", b"SKIP"],
        &[b"SET", b"a", b"1"],
        &[b"GET", b"a"],
        &[b"PING"],
    ]);
    let off_on = pipeline(&[
        &[b"CLIENT", b"REPLY", b"OFF"],
        &[b"SET", b"b", b"2"],
        &[b"GET", b"b"],
        &[b"PING"],
        &[b"CLIENT", b"REPLY", b"ON"],
        &[b"GET", b"b"],
        &[b"PING"],
    ]);
    let table: &[(&str, &[u8], &[u8])] = &[
        // SKIP suppresses the SKIP reply and the next command's (SET).
        (
            "CLIENT REPLY SKIP, SET a 1, GET a, PING",
            &skip,
            b"$1\r\n1\r\n+PONG\r\n",
        ),
        // OFF suppresses everything until ON, whose +OK is sent.
        (
            "CLIENT REPLY OFF, SET, GET, PING, CLIENT REPLY ON, GET, PING",
            &off_on,
            b"+OK\r\n$1\r\n2\r\n+PONG\r\n",
        ),
    ];
    for (name, frames, want) in table {
        let mut proxied = Raw::connect(kw.port()).await;
        let got = replies_until(&mut proxied, frames, b"+PONG\r\n").await;
        same(&format!("{name} through keyward"), &got, want);
        let mut direct = Raw::connect(redis.port()).await;
        let from_redis = replies_until(&mut direct, frames, b"+PONG\r\n").await;
        same(&format!("{name}: keyward vs redis"), &got, &from_redis);
        // Replies are back on afterwards.
        same(
            &format!("{name}: GET afterwards"),
            &proxied.call(&[b"GET", b"a"]).await,
            b"$1\r\n1\r\n",
        );
    }

    // The writes made with replies off did happen.
    same("direct GET b", &redis.call(&[b"GET", b"b"]), b"$1\r\n2\r\n");
}

/// A write silenced by CLIENT REPLY SKIP or OFF, then the end of the
/// client's state (the SKIP spent, or RESET): the client's next request
/// goes to the shared connection and must still see the write. Redis
/// answers nothing once the SET has run, so keyward must find out before it
/// lets the GET go elsewhere. Writes are paused at Redis so the SET is sure
/// to wait: a GET that overtook it would read nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_silenced_write_sees_the_write() {
    let (redis, kw) = setup().await;
    let mut direct = Raw::connect(redis.port()).await;
    // (name, the command that silences the SET, RESET's reply if RESET
    // follows the SET)
    type Case<'a> = (&'a str, &'a [&'a [u8]], &'a [u8]);
    let cases: &[Case] = &[
        ("CLIENT REPLY SKIP", &[b"CLIENT", b"REPLY", b"SKIP"], b""),
        (
            "CLIENT REPLY SKIP, RESET",
            &[b"CLIENT", b"REPLY", b"SKIP"],
            b"+RESET\r\n",
        ),
        (
            "CLIENT REPLY OFF, RESET",
            &[b"CLIENT", b"REPLY", b"OFF"],
            b"+RESET\r\n",
        ),
    ];
    for (i, (name, silence, reset_reply)) in cases.iter().enumerate() {
        let key = format!("silenced{i}");
        same(
            "CLIENT PAUSE",
            &direct.call(&[b"CLIENT", b"PAUSE", b"300", b"WRITE"]).await,
            b"+OK\r\n",
        );
        let mut c = Raw::connect(kw.port()).await;
        let mut frames = pipeline(&[silence, &[b"SET", key.as_bytes(), b"v"]]);
        if !reset_reply.is_empty() {
            frames.extend(cmd(&[b"RESET"]));
        }
        frames.extend(cmd(&[b"GET", key.as_bytes()]));
        c.send(&frames).await;
        if !reset_reply.is_empty() {
            same(
                &format!("{name}: RESET"),
                &c.read_reply().await,
                reset_reply,
            );
        }
        same(
            &format!("{name}: GET after the silenced SET"),
            &c.read_reply().await,
            b"$1\r\nv\r\n",
        );
    }
}

// ---------------------------------------------------------------------------
// RESET and QUIT
// ---------------------------------------------------------------------------

/// RESET pipelined behind commands on a pinned connection, then commands
/// that pin a new one: every reply arrives, in order, exactly as from Redis
/// (the RESET reply once went missing behind the new connection's relay),
/// and nothing sent on the new connection overtakes the old one's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_between_pinned_connections_keeps_every_reply_in_order() {
    let (redis, kw) = setup().await;
    let requests = pipeline(&[
        &[b"CLIENT", b"SETNAME", b"n"],
        &[b"CLIENT", b"GETNAME"],
        &[b"PING"],
        &[b"RESET"],
        &[b"CLIENT", b"GETNAME"],
        &[b"SELECT", b"1"],
        &[b"SET", b"r", b"1"],
        &[b"RESET"],
        &[b"SELECT", b"1"],
        &[b"GET", b"r"],
        &[b"RESET"],
        &[b"GET", b"r"],
    ]);
    let want: &[u8] = b"+OK\r\n$1\r\nn\r\n+PONG\r\n+RESET\r\n$-1\r\n+OK\r\n+OK\r\n\
+RESET\r\n+OK\r\n$1\r\n1\r\n+RESET\r\n$-1\r\n";
    let mut direct = Raw::connect(redis.port()).await;
    direct.send(&requests).await;
    same("Redis itself", &direct.read_exact_n(want.len()).await, want);
    redis.call(&[b"FLUSHALL"]);

    let mut a = Raw::connect(kw.port()).await;
    a.send(&requests).await;
    same("through keyward", &a.read_exact_n(want.len()).await, want);
    same("nothing more", &a.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_restores_a_fresh_connection_and_quit_closes() {
    let (_redis, kw) = setup().await;
    let mut other = Raw::connect(kw.port()).await;
    same(
        "db 0 data",
        &other.call(&[b"SET", b"k0", b"zero"]).await,
        b"+OK\r\n",
    );
    same(
        "hash in db 0",
        &other.call(&[b"HSET", b"h", b"f", b"v"]).await,
        b":1\r\n",
    );

    let mut a = Raw::connect_resp3(kw.port()).await;
    same("SELECT 1", &a.call(&[b"SELECT", b"1"]).await, b"+OK\r\n");
    same(
        "SETNAME",
        &a.call(&[b"CLIENT", b"SETNAME", b"n"]).await,
        b"+OK\r\n",
    );
    same(
        "SUBSCRIBE",
        &a.call(&[b"SUBSCRIBE", b"ch"]).await,
        b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    );
    same(
        "PUBLISH while subscribed",
        &other.call(&[b"PUBLISH", b"ch", b"m"]).await,
        b":1\r\n",
    );
    same(
        "message",
        &a.read_reply().await,
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n",
    );

    same("RESET", &a.call(&[b"RESET"]).await, b"+RESET\r\n");

    // RESP2 again: null bulk and arrays, not `_` and maps.
    same(
        "GET missing after RESET",
        &a.call(&[b"GET", b"missing"]).await,
        b"$-1\r\n",
    );
    same(
        "HGETALL after RESET",
        &a.call(&[b"HGETALL", b"h"]).await,
        b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n",
    );
    // db 0 again.
    same(
        "GET k0 after RESET",
        &a.call(&[b"GET", b"k0"]).await,
        b"$4\r\nzero\r\n",
    );
    // Not subscribed: nobody receives, and RESP2 commands are allowed.
    same(
        "PUBLISH after RESET",
        &other.call(&[b"PUBLISH", b"ch", b"m2"]).await,
        b":0\r\n",
    );
    same(
        "SET after RESET",
        &a.call(&[b"SET", b"k1", b"v"]).await,
        b"+OK\r\n",
    );
    same("PING after RESET", &a.call(&[b"PING"]).await, b"+PONG\r\n");
    // The name is cleared, as Redis's RESET does.
    same(
        "GETNAME after RESET",
        &a.call(&[b"CLIENT", b"GETNAME"]).await,
        b"$-1\r\n",
    );
    // A transaction open at RESET is discarded.
    same("MULTI", &a.call(&[b"MULTI"]).await, b"+OK\r\n");
    same(
        "queued",
        &a.call(&[b"SET", b"never", b"1"]).await,
        b"+QUEUED\r\n",
    );
    same("RESET in MULTI", &a.call(&[b"RESET"]).await, b"+RESET\r\n");
    same(
        "EXEC after RESET",
        &a.call(&[b"EXEC"]).await,
        b"-ERR EXEC without MULTI\r\n",
    );
    same(
        "discarded write",
        &other.call(&[b"GET", b"never"]).await,
        b"$-1\r\n",
    );

    // QUIT: +OK, then the connection closes.
    a.send(&cmd(&[b"QUIT"])).await;
    same("QUIT then close", &a.read_to_close().await, b"+OK\r\n");
    // Pipelined after QUIT: never executed.
    let mut q = Raw::connect(kw.port()).await;
    q.send(&pipeline(&[&[b"QUIT"], &[b"SET", b"after-quit", b"1"]]))
        .await;
    same("QUIT in a pipeline", &q.read_to_close().await, b"+OK\r\n");
    same(
        "command after QUIT not run",
        &other.call(&[b"GET", b"after-quit"]).await,
        b"$-1\r\n",
    );
}

// ---------------------------------------------------------------------------
// Everything in one pipeline
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_stateful_pipeline_keeps_order() {
    let (redis, kw) = setup().await;
    let frames = pipeline(&[
        &[b"SET", b"a", b"1"],
        &[b"MULTI"],
        &[b"INCR", b"a"],
        &[b"EXEC"],
        &[b"GET", b"a"],
        &[b"SUBSCRIBE", b"ch"],
        &[b"UNSUBSCRIBE", b"ch"],
        &[b"GET", b"a"],
    ]);
    let want: [&[u8]; 8] = [
        b"+OK\r\n",
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"*1\r\n:2\r\n",
        b"$1\r\n2\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n",
        b"$1\r\n2\r\n",
    ];

    let mut proxied = Raw::connect(kw.port()).await;
    proxied.send(&frames).await;
    let got = proxied.read_replies(want.len()).await;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        same(&format!("reply #{i} through keyward"), g, w);
    }
    assert!(
        !proxied.is_closed_within(Duration::from_millis(200)).await,
        "connection should stay open"
    );
    assert!(
        proxied.buffered().is_empty(),
        "stray: {}",
        esc(proxied.buffered())
    );

    // Redis answers the same bytes with the same bytes.
    assert_eq!(redis.call(&[b"FLUSHALL"]), b"+OK\r\n");
    let mut direct = Raw::connect(redis.port()).await;
    direct.send(&frames).await;
    let from_redis = direct.read_replies(want.len()).await;
    for (i, (g, w)) in got.iter().zip(&from_redis).enumerate() {
        same(&format!("reply #{i}: keyward vs redis"), g, w);
    }

    // Twice in a row on one connection, back to back with plain commands.
    let mut again = frames.clone();
    again.extend(cmd(&[b"PING"]));
    again.extend(frames.clone());
    let mut p2 = Raw::connect(kw.port()).await;
    assert_eq!(redis.call(&[b"FLUSHALL"]), b"+OK\r\n");
    p2.send(&again).await;
    let got2 = p2.read_replies(17).await;
    let mut want2: Vec<&[u8]> = want.to_vec();
    want2.push(b"+PONG\r\n");
    want2.extend([
        b"+OK\r\n" as &[u8],
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"*1\r\n:2\r\n",
        b"$1\r\n2\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n",
        b"$1\r\n2\r\n",
    ]);
    for (i, (g, w)) in got2.iter().zip(&want2).enumerate() {
        same(&format!("doubled pipeline reply #{i}"), g, w);
    }
}

// ---------------------------------------------------------------------------
// Commands keyward answers itself, where Redis's own rules decide
// ---------------------------------------------------------------------------

/// Each sequence, pipelined in one write on a fresh connection, gets the
/// same reply bytes through keyward as from Redis directly: UNSUBSCRIBE
/// without subscriptions, RESET behind a blocked BLPOP, CLIENT REPLY OFF
/// silencing keyward's own replies, RESP2 subscriber mode and MULTI
/// refusing what Redis refuses, and the strict integer parsing of SELECT,
/// HELLO, RESET and AUTH. `n` is the number of replies the sequence gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_rules_match_redis_for_commands_keyward_answers() {
    let (redis, kw) = setup().await;
    let cases: Vec<(&str, bool, Vec<u8>, usize)> = vec![
        (
            "UNSUBSCRIBE with names, not subscribed",
            false,
            pipeline(&[&[b"UNSUBSCRIBE", b"x", b"y", b"z"], &[b"PING"]]),
            4,
        ),
        (
            "(P|S)UNSUBSCRIBE, not subscribed, RESP3",
            true,
            pipeline(&[
                &[b"UNSUBSCRIBE", b"x", b"y"],
                &[b"PUNSUBSCRIBE"],
                &[b"SUNSUBSCRIBE", b"s"],
                &[b"PING"],
            ]),
            5,
        ),
        (
            "RESET behind a blocked BLPOP",
            false,
            pipeline(&[&[b"BLPOP", b"empty", b"0.3"], &[b"RESET"], &[b"PING"]]),
            3,
        ),
        (
            "CLIENT REPLY OFF silences HELLO and AUTH too",
            false,
            pipeline(&[
                &[b"CLIENT", b"REPLY", b"OFF"],
                &[b"HELLO"],
                &[b"AUTH", b"x"],
                &[b"PING"],
                &[b"CLIENT", b"REPLY", b"ON"],
                &[b"PING"],
            ]),
            2,
        ),
        (
            "CLIENT REPLY SKIP skips AUTH's reply only",
            false,
            pipeline(&[
                &[b"CLIENT", b"REPLY", b"SKIP"],
                &[b"AUTH", b"x"],
                &[b"PING"],
            ]),
            1,
        ),
        (
            "CLIENT REPLY SKIP on a pinned connection skips AUTH's reply, not GET's",
            false,
            pipeline(&[
                &[b"SELECT", b"1"],
                &[b"CLIENT", b"REPLY", b"SKIP"],
                &[b"AUTH", b"x"],
                &[b"GET", b"a"],
                &[b"PING"],
            ]),
            3,
        ),
        (
            "CLIENT REPLY SKIP silences RESET, twice, then MULTI",
            false,
            pipeline(&[
                &[b"SELECT", b"2"],
                &[b"CLIENT", b"REPLY", b"SKIP"],
                &[b"RESET"],
                &[b"CLIENT", b"REPLY", b"SKIP"],
                &[b"RESET"],
                &[b"MULTI"],
                &[b"EXEC"],
            ]),
            3,
        ),
        (
            "an empty command (a blank line, *0) ends CLIENT REPLY SKIP",
            false,
            [
                pipeline(&[&[b"SELECT", b"1"], &[b"CLIENT", b"REPLY", b"SKIP"]]),
                b"\r\n".to_vec(),
                cmd(&[b"PING"]),
                cmd(&[b"CLIENT", b"REPLY", b"SKIP"]),
                b"*0\r\n".to_vec(),
                cmd(&[b"PING"]),
            ]
            .concat(),
            3,
        ),
        (
            "a SUBSCRIBE queued in MULTI: after EXEC, HELLO and AUTH are refused",
            false,
            pipeline(&[
                &[b"MULTI"],
                &[b"SUBSCRIBE", b"c"],
                &[b"EXEC"],
                &[b"HELLO", b"2"],
                &[b"AUTH", b"x"],
                &[b"SELECT", b"1"],
                &[b"RESET"],
            ]),
            7,
        ),
        (
            "CLIENT REPLY OFF, MULTI: RESET ends both and is answered",
            false,
            pipeline(&[
                &[b"CLIENT", b"REPLY", b"OFF"],
                &[b"MULTI"],
                &[b"SET", b"never", b"1"],
                &[b"RESET"],
                &[b"PING"],
            ]),
            2,
        ),
        (
            "CLIENT REPLY SKIP is spent on CLIENT REPLY OFF; RESET is answered",
            false,
            pipeline(&[
                &[b"CLIENT", b"REPLY", b"SKIP"],
                &[b"CLIENT", b"REPLY", b"OFF"],
                &[b"RESET"],
                &[b"PING"],
            ]),
            2,
        ),
        (
            "RESP2 subscriber mode refuses AUTH, HELLO, KEYWARD, SCRIPT DEBUG",
            false,
            pipeline(&[
                &[b"SUBSCRIBE", b"ch"],
                &[b"AUTH", b"x"],
                &[b"HELLO"],
                &[b"KEYWARD", b"HELP"],
                &[b"SCRIPT", b"DEBUG", b"YES"],
                &[b"RESET"],
            ]),
            6,
        ),
        (
            "KEYWARD and SYNC inside MULTI abort the transaction",
            false,
            pipeline(&[
                &[b"MULTI"],
                &[b"KEYWARD", b"HELP"],
                &[b"SYNC"],
                &[b"SET", b"never", b"1"],
                &[b"EXEC"],
                &[b"GET", b"never"],
            ]),
            6,
        ),
        (
            "integers as string2ll reads them",
            false,
            pipeline(&[
                &[b"SELECT", b"00"],
                &[b"SELECT", b"-0"],
                &[b"HELLO", b"03"],
                &[b"HELLO", b"+3"],
                &[b"RESET", b"x"],
                &[b"AUTH", b"a", b"b", b"c"],
                &[b"PING"],
            ]),
            7,
        ),
        (
            "RESET after CLIENT SETNAME, then MULTI",
            false,
            pipeline(&[
                &[b"CLIENT", b"SETNAME", b"foo"],
                &[b"RESET"],
                &[b"MULTI"],
                &[b"EXEC"],
            ]),
            4,
        ),
        (
            "a value starting with CRLF, read on a dedicated connection",
            false,
            pipeline(&[
                &[b"SET", b"crlfval", b"\r\nhello"],
                &[b"CLIENT", b"SETNAME", b"app"],
                &[b"GET", b"crlfval"],
                &[b"PING"],
                &[b"RESET"],
            ]),
            5,
        ),
        (
            "EXEC with extra arguments aborts the transaction",
            false,
            pipeline(&[
                &[b"MULTI"],
                &[b"EXEC", b"x"],
                &[b"CLIENT", b"REPLY", b"OFF"],
                &[b"RESET"],
                &[b"PING"],
            ]),
            4,
        ),
        (
            "EXEC with extra arguments leaves no transaction open",
            false,
            pipeline(&[
                &[b"MULTI"],
                &[b"EXEC", b"x"],
                &[b"SET", b"a", b"1"],
                &[b"EXEC"],
            ]),
            4,
        ),
        (
            "script replies shaped like subscribe confirmations and messages",
            false,
            pipeline(&[
                &[b"CLIENT", b"GETNAME"],
                &[b"EVAL", b"return {'subscribe','x',1}", b"0"],
                &[b"EVAL", b"return {'message','x','y'}", b"0"],
                &[b"MULTI"],
                &[b"EVAL", b"return {'subscribe','x',1}", b"0"],
                &[b"EXEC"],
                &[b"GET", b"a"],
                &[b"RESET"],
                &[b"PING"],
            ]),
            9,
        ),
    ];
    for (case, resp3, bytes, n) in &cases {
        let connect = |port| async move {
            if *resp3 {
                Raw::connect_resp3(port).await
            } else {
                Raw::connect(port).await
            }
        };
        let mut direct = connect(redis.port()).await;
        direct.send(bytes).await;
        let want = direct.read_replies(*n).await.concat();
        let mut through = connect(kw.port()).await;
        through.send(bytes).await;
        let got = through.read_replies(*n).await.concat();
        same(case, &got, &want);
        // Nothing more is owed: the next reply is the next request's.
        same(
            &format!("{case}: then ECHO"),
            &through.call(&[b"ECHO", b"next"]).await,
            &direct.call(&[b"ECHO", b"next"]).await,
        );
    }
}

/// HELLO 3 pipelined right behind an EXEC switches the protocol, as on
/// Redis: the transaction's connection is given back once EXEC's reply is
/// in (it was refused as "holding state").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_right_after_exec_switches_protocol() {
    let (_redis, kw) = setup().await;
    let mut c = Raw::connect(kw.port()).await;
    c.send(&pipeline(&[
        &[b"MULTI"],
        &[b"PING"],
        &[b"EXEC"],
        &[b"HELLO", b"3"],
        &[b"PING"],
    ]))
    .await;
    let r = c.read_replies(5).await;
    same("MULTI", &r[0], b"+OK\r\n");
    same("PING queued", &r[1], b"+QUEUED\r\n");
    same("EXEC", &r[2], b"*1\r\n+PONG\r\n");
    assert!(
        r[3].starts_with(b"%7\r\n$6\r\nserver\r\n"),
        "{}",
        esc(&r[3])
    );
    same("PING", &r[4], b"+PONG\r\n");
    same("RESP3 now", &c.call(&[b"GET", b"none"]).await, b"_\r\n");
}

/// HELLO on a client that holds a dedicated connection for a name, a
/// database or tracking switches that connection's protocol, as on Redis:
/// replies change shape from then on and tracking's invalidations arrive
/// as pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_switches_a_dedicated_connections_protocol() {
    let (redis, kw) = setup().await;
    let steps: &[&[&[u8]]] = &[
        &[b"CLIENT", b"SETNAME", b"n1"],
        &[b"HELLO", b"3"],
        &[b"CLIENT", b"GETNAME"],
        &[b"HGETALL", b"nohash"],
        &[b"HELLO", b"2"],
        &[b"HGETALL", b"nohash"],
        &[b"CLIENT", b"TRACKING", b"ON", b"BCAST", b"PREFIX", b"tk"],
        &[b"HELLO", b"3"],
        &[b"GET", b"tk1"],
    ];
    let mut direct = Raw::connect(redis.port()).await;
    let mut c = Raw::connect(kw.port()).await;
    let all = pipeline(steps);
    direct.send(&all).await;
    c.send(&all).await;
    let want = direct.read_replies(steps.len()).await.concat();
    let got = c.read_replies(steps.len()).await.concat();
    assert_eq!(ids_masked(&got), ids_masked(&want), "pipelined");
    assert!(got.ends_with(b"_\r\n"), "RESP3 at the end: {}", esc(&got));
    // Another client's write: the invalidation is a RESP3 push now.
    let mut writer = Raw::connect(redis.port()).await;
    assert_eq!(writer.call(&[b"SET", b"tk1", b"v"]).await, b"+OK\r\n");
    let push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\ntk1\r\n";
    same("direct push", &direct.read_reply().await, push);
    same("push through keyward", &c.read_reply().await, push);
    // Back to RESP2 with RESET; the switched connection is not kept.
    same("RESET", &c.call(&[b"RESET"]).await, b"+RESET\r\n");
    same("RESP2 again", &c.call(&[b"GET", b"none"]).await, b"$-1\r\n");
    // Still refused where replies would change shape mid-state.
    let mut m = Raw::connect(kw.port()).await;
    m.send(&pipeline(&[&[b"MULTI"], &[b"HELLO", b"3"], &[b"DISCARD"]]))
        .await;
    let r = m.read_replies(3).await;
    assert!(
        r[1].starts_with(
            b"-ERR keyward cannot change the protocol while the connection holds state"
        ),
        "{}",
        esc(&r[1])
    );
    same("DISCARD", &r[2], b"+OK\r\n");
}

/// UNSUBSCRIBE of several channels by a client subscribed to nothing,
/// while another client pipelines GETs: that client gets its own replies
/// only (Redis's extra confirmations on a shared connection would be taken
/// for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_without_subscriptions_does_not_disturb_others() {
    let (_redis, kw) = setup().await;
    let mut other = Raw::connect(kw.port()).await;
    same("SET", &other.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    let mut a = Raw::connect(kw.port()).await;
    for _ in 0..20 {
        a.send(&cmd(&[b"UNSUBSCRIBE", b"x", b"y", b"z"])).await;
        other
            .send(&pipeline(&[
                &[b"GET", b"k"],
                &[b"GET", b"k"],
                &[b"GET", b"k"],
            ]))
            .await;
        for r in other.read_replies(3).await {
            same("another client's GET", &r, b"$1\r\nv\r\n");
        }
        let confirmations = a.read_replies(3).await.concat();
        same(
            "the three confirmations",
            &confirmations,
            b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:0\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\ny\r\n:0\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nz\r\n:0\r\n",
        );
    }
}

/// A RESP3 push on a shared connection answers no request: here a client
/// points its CLIENT TRACKING invalidations at the shared RESP3 connection
/// (its id is in CLIENT LIST), then a write makes Redis push an
/// invalidation there. The RESP3 clients on that connection still get
/// exactly their own replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_on_a_shared_connection_is_not_taken_for_a_reply() {
    let (redis, kw) = setup().await;
    let mut victim = Raw::connect_resp3(kw.port()).await;
    let list = victim.call(&[b"CLIENT", b"LIST"]).await;
    let list = String::from_utf8_lossy(&list).into_owned();
    let shared_id = list
        .lines()
        .find(|l| l.contains("cmd=client|list"))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no CLIENT LIST line for the shared connection: {list}"))
        .trim_start_matches("txt:")
        .to_string();

    let mut tracker = Raw::connect(kw.port()).await;
    same(
        "CLIENT TRACKING ON REDIRECT <shared connection>",
        &tracker
            .call(&[
                b"CLIENT",
                b"TRACKING",
                b"ON",
                b"REDIRECT",
                shared_id.as_bytes(),
            ])
            .await,
        b"+OK\r\n",
    );
    for round in 0..20 {
        let value = format!("v{round}");
        same("tracked GET", &tracker.call(&[b"GET", b"k"]).await, &{
            if round == 0 {
                b"$-1\r\n".to_vec()
            } else {
                let v = format!("v{}", round - 1);
                format!("${}\r\n{v}\r\n", v.len()).into_bytes()
            }
        });
        // Redis pushes an invalidation of k to the shared connection.
        same(
            "SET on Redis",
            &redis.call(&[b"SET", b"k", value.as_bytes()]),
            b"+OK\r\n",
        );
        for word in [&b"a"[..], b"bb", b"ccc"] {
            let mut want = format!("${}\r\n", word.len()).into_bytes();
            want.extend_from_slice(word);
            want.extend_from_slice(b"\r\n");
            same(
                "the RESP3 client's own ECHO",
                &victim.call(&[b"ECHO", word]).await,
                &want,
            );
        }
    }
}

/// A script can return tables nested thousands deep (up to Lua's own
/// stack limit): the reply passes through the shared connection as from
/// Redis, and the other clients on it are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_script_reply_passes_through() {
    let (redis, kw) = setup().await;
    let script: &[u8] =
        b"local t = {} local c = t for i = 1, tonumber(ARGV[1]) do local n = {} c[1] = n c = n end return t";
    let mut other = Raw::connect(kw.port()).await;
    for depth in [&b"200"[..], b"5000", b"20000"] {
        let req = pipeline(&[&[b"EVAL", script, b"0", depth], &[b"PING"]]);
        let mut direct = Raw::connect(redis.port()).await;
        direct.send(&req).await;
        let want = direct.read_through(b"+PONG\r\n").await;
        let mut a = Raw::connect(kw.port()).await;
        a.send(&req).await;
        let got = a.read_through(b"+PONG\r\n").await;
        assert!(
            got == want,
            "EVAL nesting {} levels: {} bytes through keyward, {} from Redis",
            String::from_utf8_lossy(depth),
            got.len(),
            want.len()
        );
        same(
            "another client's PING after it",
            &other.call(&[b"PING"]).await,
            b"+PONG\r\n",
        );
    }
}

/// Redis compares command names, subcommands and keywords only up to a NUL
/// (strcasecmp), so "multi\0x" could run as MULTI on a shared connection:
/// keyward answers such names itself, reads keywords up to the NUL as
/// Redis does, and refuses SCRIPT DEBUG YES|SYNC (the Lua debugger would
/// take over the shared connection). Another client is never disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_names_and_script_debug_cannot_take_over_a_shared_connection() {
    let (redis, kw) = setup().await;
    let mut other = Raw::connect(kw.port()).await;
    async fn check_other(other: &mut Raw) {
        same(
            "other SET",
            &other.call(&[b"SET", b"o", b"1"]).await,
            b"+OK\r\n",
        );
        same(
            "other GET",
            &other.call(&[b"GET", b"o"]).await,
            b"$1\r\n1\r\n",
        );
    }
    let mut a = Raw::connect(kw.port()).await;
    same(
        "a name with a NUL",
        &a.call(&[b"multi\0x", b"arg\0y"]).await,
        b"-ERR unknown command 'multi', with args beginning with: 'arg' \r\n",
    );
    check_other(&mut other).await;
    same(
        "a CLIENT subcommand with a NUL",
        &a.call(&[b"CLIENT", b"reply\0x", b"off"]).await,
        b"-ERR unknown subcommand 'reply'. Try CLIENT HELP.\r\n",
    );
    check_other(&mut other).await;
    same(
        "SCRIPT DEBUG YES",
        &a.call(&[b"SCRIPT", b"DEBUG", b"YES"]).await,
        b"-ERR keyward does not support SCRIPT DEBUG YES|SYNC (the Lua debugger needs a connection of its own); connect to Redis directly to debug scripts\r\n",
    );
    same(
        "EVAL afterwards",
        &other.call(&[b"EVAL", b"return 1", b"0"]).await,
        b":1\r\n",
    );
    // A keyword with a NUL means what Redis reads: SKIP.
    let seq = pipeline(&[
        &[b"CLIENT", b"REPLY", b"SKIP\0"],
        &[b"PING", b"skipped"],
        &[b"PING", b"seen"],
    ]);
    let mut direct = Raw::connect(redis.port()).await;
    direct.send(&seq).await;
    let want = direct.read_reply().await;
    a.send(&seq).await;
    same("CLIENT REPLY SKIP\\0", &a.read_reply().await, &want);
    same("(Redis itself)", &want, b"$4\r\nseen\r\n");
    check_other(&mut other).await;
}

// ---------------------------------------------------------------------------
// State commands Redis refuses or defers: keyward's tracking must follow
// ---------------------------------------------------------------------------

/// A step: a request and how many replies Redis sends it.
type Step = (&'static [&'static [u8]], usize);

/// Each sequence, one request at a time (a pinned connection is given back
/// between requests when keyward thinks the state ended), gets the same
/// reply bytes through keyward as from Redis directly, on a flushed Redis
/// each time: a DISCARD or EXEC Redis refuses keeps the transaction and the
/// WATCH, `MULTI x` starts none, SELECT refused in subscriber mode keeps the
/// database, subscriptions queued in MULTI owe one reply, CLIENT REPLY
/// refused or silenced is followed, and RESP2 subscriber mode ends with the
/// last subscription. None hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_queued_state_commands_match_redis_step_by_step() {
    let (redis, kw) = setup().await;
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "DISCARD with an argument inside MULTI",
            vec![
                (&[b"MULTI"], 1),
                (&[b"SET", b"k1", b"a"], 1),
                (&[b"DISCARD", b"x"], 1),
                (&[b"SET", b"k2", b"b"], 1),
                (&[b"EXEC"], 1),
                (&[b"GET", b"k2"], 1),
            ],
        ),
        (
            "WATCH survives DISCARD without MULTI",
            vec![
                (&[b"WATCH", b"k1"], 1),
                (&[b"DISCARD"], 1),
                (&[b"SET", b"k1", b"2"], 1),
                (&[b"MULTI"], 1),
                (&[b"PING"], 1),
                (&[b"EXEC"], 1),
            ],
        ),
        (
            "WATCH survives EXEC without MULTI",
            vec![
                (&[b"WATCH", b"k1"], 1),
                (&[b"EXEC"], 1),
                (&[b"SET", b"k1", b"2"], 1),
                (&[b"MULTI"], 1),
                (&[b"PING"], 1),
                (&[b"EXEC"], 1),
            ],
        ),
        (
            "MULTI with an argument starts no transaction",
            vec![
                (&[b"MULTI", b"x"], 1),
                (&[b"WATCH", b"k1"], 1),
                (&[b"SET", b"k1", b"2"], 1),
                (&[b"MULTI"], 1),
                (&[b"PING"], 1),
                (&[b"EXEC"], 1),
            ],
        ),
        (
            "SELECT refused in subscriber mode keeps the database",
            vec![
                (&[b"SELECT", b"1"], 1),
                (&[b"SET", b"k1", b"a"], 1),
                (&[b"SUBSCRIBE", b"c"], 1),
                (&[b"SELECT", b"0"], 1),
                (&[b"UNSUBSCRIBE"], 1),
                (&[b"GET", b"k1"], 1),
            ],
        ),
        (
            "PSUBSCRIBE of two patterns queued in MULTI",
            vec![
                (&[b"MULTI"], 1),
                (&[b"PSUBSCRIBE", b"a*", b"b*"], 1),
                (&[b"RESET"], 1),
            ],
        ),
        (
            "a SUBSCRIBE queued in MULTI under CLIENT REPLY OFF, then RESET",
            vec![
                (&[b"CLIENT", b"REPLY", b"OFF"], 0),
                (&[b"MULTI"], 0),
                (&[b"SUBSCRIBE", b"c"], 0),
                // The confirmation goes out whatever CLIENT REPLY says.
                (&[b"EXEC"], 1),
                (&[b"RESET"], 1),
                (&[b"PING"], 1),
            ],
        ),
        (
            "CLIENT REPLY ON refused while subscribed under CLIENT REPLY OFF",
            vec![
                (&[b"CLIENT", b"REPLY", b"OFF"], 0),
                // Confirmations are sent whatever CLIENT REPLY says.
                (&[b"SUBSCRIBE", b"c"], 1),
                (&[b"CLIENT", b"REPLY", b"ON"], 0),
                (&[b"RESET"], 1),
            ],
        ),
        (
            "subscriber mode ends with the last UNSUBSCRIBE",
            vec![
                (&[b"SELECT", b"1"], 1),
                (&[b"SUBSCRIBE", b"c"], 1),
                (&[b"UNSUBSCRIBE"], 1),
                (&[b"RPUSH", b"l", b"message"], 1),
                (&[b"LRANGE", b"l", b"0", b"-1"], 1),
                (&[b"AUTH", b"pw"], 1),
            ],
        ),
        (
            "SUBSCRIBE queued in MULTI subscribes at EXEC",
            vec![
                (&[b"MULTI"], 1),
                (&[b"SUBSCRIBE", b"c"], 1),
                (&[b"EXEC"], 1),
                (&[b"PING"], 1),
                (&[b"RESET"], 1),
            ],
        ),
        (
            "CLIENT REPLY SKIP is spent on SUBSCRIBE",
            vec![
                (&[b"CLIENT", b"REPLY", b"SKIP"], 0),
                (&[b"SUBSCRIBE", b"c"], 1),
                (&[b"PING"], 1),
                (&[b"RESET"], 1),
            ],
        ),
        (
            "CLIENT REPLY OFF with an argument changes nothing",
            vec![
                (&[b"CLIENT", b"REPLY", b"OFF", b"x"], 1),
                (&[b"GET", b"k1"], 1),
                (&[b"AUTH", b"pw"], 1),
            ],
        ),
        (
            "HELLO SETNAME under CLIENT REPLY OFF",
            vec![
                (&[b"CLIENT", b"REPLY", b"OFF"], 0),
                (&[b"HELLO", b"2", b"SETNAME", b"n"], 0),
                (&[b"CLIENT", b"REPLY", b"ON"], 1),
                (&[b"PING"], 1),
            ],
        ),
    ];
    for (case, steps) in &cases {
        let run = |port: u16| async move {
            let mut c = Raw::connect(port).await;
            let mut replies = Vec::new();
            for (req, n) in steps {
                c.send(&cmd(req)).await;
                for r in within(DEADLINE, case, c.read_replies(*n)).await {
                    replies.push(r);
                }
            }
            let next = within(DEADLINE, case, c.call(&[b"ECHO", b"next"])).await;
            (replies, next)
        };
        same("FLUSHALL", &redis.call(&[b"FLUSHALL"]), b"+OK\r\n");
        let (want, want_next) = run(redis.port()).await;
        same("FLUSHALL", &redis.call(&[b"FLUSHALL"]), b"+OK\r\n");
        let (got, got_next) = run(kw.port()).await;
        same(case, &got.concat(), &want.concat());
        same(&format!("{case}: then ECHO"), &got_next, &want_next);
    }
}

/// HELLO with SETNAME pipelined behind other requests: keyward drops the
/// reply to its own CLIENT SETNAME, not a reply still on its way to one of
/// the client's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_setname_pipelined_drops_only_its_own_reply() {
    let (_redis, kw) = setup().await;
    let mut c = Raw::connect(kw.port()).await;
    c.send(&pipeline(&[
        &[b"SET", b"k1", b"val"],
        &[b"CLIENT", b"SETNAME", b"a"],
        &[b"GET", b"k1"],
        &[b"HELLO", b"2", b"SETNAME", b"n"],
        &[b"GET", b"k1"],
        &[b"CLIENT", b"GETNAME"],
    ]))
    .await;
    let r = c.read_replies(6).await;
    same("SET", &r[0], b"+OK\r\n");
    same("CLIENT SETNAME", &r[1], b"+OK\r\n");
    same("GET", &r[2], b"$3\r\nval\r\n");
    assert!(r[3].starts_with(b"*"), "HELLO: {}", esc(&r[3]));
    same("GET after HELLO", &r[4], b"$3\r\nval\r\n");
    same("CLIENT GETNAME", &r[5], b"$1\r\nn\r\n");
}

/// A client that leaves while its RESET (or a reply keyward makes, such as
/// HELLO's) waits behind its own `BLPOP q 0`: the session ends and its
/// connection to Redis closes, as Redis drops a client that leaves, so the
/// blocked BLPOP does not linger and take the next item pushed to `q`.
/// A request that arrives while keyward confirms a silenced write before
/// giving the dedicated connection back (the write waits behind a `CLIENT
/// PAUSE WRITE`, so the confirmation does too) is answered as soon as the
/// connection is given back, not when the client next sends something
/// (every later reply came one request late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_read_during_a_release_is_answered_at_once() {
    let (redis, kw) = setup().await;
    let mut direct = Raw::connect(redis.port()).await;
    same(
        "CLIENT PAUSE",
        &direct.call(&[b"CLIENT", b"PAUSE", b"300", b"WRITE"]).await,
        b"+OK\r\n",
    );
    let mut c = Raw::connect(kw.port()).await;
    c.send(&pipeline(&[
        &[b"CLIENT", b"REPLY", b"SKIP"],
        &[b"SET", b"paused", b"v"],
    ]))
    .await;
    // The SET waits at Redis, and keyward's RESET behind it too.
    wait_blocked(redis.port(), 1).await;
    c.send(&cmd(&[b"PING", b"E1"])).await;
    same("PING E1", &c.read_reply().await, b"$2\r\nE1\r\n");
    same("PING E2", &c.call(&[b"PING", b"E2"]).await, b"$2\r\nE2\r\n");
    same("GET", &c.call(&[b"GET", b"paused"]).await, b"$1\r\nv\r\n");
}

/// A client that sends its pipeline and half-closes (as `printf ... | nc`
/// does) gets every reply, as from Redis, when keyward answers some of them
/// itself behind a pinned connection's (QUIT, AUTH): only a blocking call
/// is given up when its client closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_pipeline_behind_a_pinned_connection_gets_every_reply() {
    let (redis, kw) = setup().await;
    let cases: &[(&str, Vec<u8>)] = &[
        (
            "SELECT 1, SET, QUIT",
            pipeline(&[&[b"SELECT", b"1"], &[b"SET", b"a", b"1"], &[b"QUIT"]]),
        ),
        (
            "MULTI, SET, EXEC, AUTH, PING",
            pipeline(&[
                &[b"MULTI"],
                &[b"SET", b"a", b"1"],
                &[b"EXEC"],
                &[b"AUTH", b"x"],
                &[b"PING"],
            ]),
        ),
        (
            "a SUBSCRIBE run by EXEC under CLIENT REPLY OFF (its confirmation still goes out)",
            pipeline(&[
                &[b"CLIENT", b"REPLY", b"OFF"],
                &[b"MULTI"],
                &[b"SUBSCRIBE", b"c"],
                &[b"EXEC"],
            ]),
        ),
        (
            "BLPOP with a timeout, then PING",
            pipeline(&[&[b"SELECT", b"1"], &[b"BLPOP", b"q", b"0.1"], &[b"PING"]]),
        ),
    ];
    for (name, frames) in cases {
        let mut got = Vec::new();
        for port in [kw.port(), redis.port()] {
            let mut c = Raw::connect(port).await;
            c.send(frames).await;
            c.shutdown_write().await;
            got.push(c.read_to_close().await);
        }
        same(&format!("{name}: keyward vs redis"), &got[0], &got[1]);
        assert!(
            got[0].ends_with(b"\r\n"),
            "{name}: replies {}",
            esc(&got[0])
        );
    }
}

/// A client on a dedicated connection (CLIENT SETNAME holds one) that
/// pipelines 8 MiB of replies and half-closes gets all of them: keyward
/// waits for them before it gives the connection up (Redis drops what it
/// has not sent yet when its client closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_on_a_dedicated_connection_gets_big_replies() {
    let (redis, kw) = setup().await;
    let value = vec![b'v'; 1024 * 1024];
    same(
        "SET big",
        &redis.call(&[b"SET", b"big", &value]),
        b"+OK\r\n",
    );
    let mut c = Raw::connect(kw.port()).await;
    let mut frames = cmd(&[b"CLIENT", b"SETNAME", b"x"]);
    for _ in 0..8 {
        frames.extend(cmd(&[b"GET", b"big"]));
    }
    frames.extend(cmd(&[b"PING"]));
    c.send(&frames).await;
    c.shutdown_write().await;
    let got = c.read_to_close().await;
    let mut want = b"+OK\r\n".to_vec();
    for _ in 0..8 {
        want.extend(bulk(&value));
    }
    want.extend(b"+PONG\r\n");
    assert_eq!(got.len(), want.len(), "bytes received");
    assert!(got == want, "the replies differ");
}

/// Redis 7.0 answers `MULTI; CLIENT REPLY SKIP; EXEC` with an array header
/// and no element, a reply that never completes. A client that half-closes
/// behind it (keyward waits for it before answering HELLO) is let go after
/// `upstream.command_timeout_ms`, and its dedicated connection with it,
/// rather than kept for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_client_behind_a_reply_that_never_completes_is_let_go() {
    let redis = Redis::start();
    let kw = Keyward::start_for(&redis, "command_timeout_ms = 300\n", &[]);
    wait_ready(&kw, DEADLINE).await;
    let mut c = Raw::connect(kw.port()).await;
    c.send(&pipeline(&[
        &[b"MULTI"],
        &[b"CLIENT", b"REPLY", b"SKIP"],
        &[b"EXEC"],
        &[b"HELLO", b"2"],
    ]))
    .await;
    c.shutdown_write().await;
    assert!(
        c.is_closed_within(DEADLINE).await,
        "keyward closes the client"
    );
    // The dedicated connection's last command was EXEC (HELLO is keyward's).
    let port = redis.port();
    wait_until(
        "the dedicated connection is closed (no client left with cmd=exec)",
        DEADLINE,
        || async move {
            let list = Raw::connect(port).await.call(&[b"CLIENT", b"LIST"]).await;
            !String::from_utf8_lossy(&list).contains(" cmd=exec ")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_behind_its_blocked_call_leaves_nothing_blocked() {
    let (redis, kw) = setup().await;
    // keyward answers RESET and HELLO itself, after BLPOP's reply; more
    // requests may come behind them before the client leaves.
    let blpop: &[&[u8]] = &[b"BLPOP", b"q", b"0"];
    let cases = [
        (pipeline(&[blpop, &[b"RESET"]]), vec![]),
        (pipeline(&[blpop, &[b"HELLO", b"2"]]), vec![]),
        (
            pipeline(&[blpop, &[b"RESET"]]),
            pipeline(&[&[b"PING"], &[b"GET", b"q"]]),
        ),
    ];
    for (frames, more) in cases {
        let mut c = Raw::connect(kw.port()).await;
        c.send(&frames).await;
        wait_blocked(redis.port(), 1).await;
        if !more.is_empty() {
            c.send(&more).await;
        }
        drop(c);
        wait_blocked(redis.port(), 0).await;
        let mut other = Raw::connect(kw.port()).await;
        same(
            "LPUSH",
            &other.call(&[b"LPUSH", b"q", b"item"]).await,
            b":1\r\n",
        );
        same("LLEN", &other.call(&[b"LLEN", b"q"]).await, b":1\r\n");
        same("DEL", &other.call(&[b"DEL", b"q"]).await, b":1\r\n");
    }
}

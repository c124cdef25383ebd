//! Writes the near cache must recognise as writes. A client that sends a
//! write and then a read through keyward reads what the write left, however
//! the write names its keys: through a script's KEYS, a counted key list
//! (LMPOP), a keyword (GEORADIUS ... STORE), a position only the command
//! knows (SORT ... STORE), a "read" that rewrites the value (PFCOUNT), or no
//! key at all (FLUSHALL). Pipelined, the read is parsed before the write's
//! reply (or its invalidation push) can arrive, so only keyward's own
//! recognition of the write keeps it from being served from the cache.
//! Redis is the oracle: after each pipeline, the read is repeated on Redis.

mod support;

use support::*;

fn config() -> String {
    // A long max_ttl_ms: an entry expiring by itself cannot pass a test.
    format!("{FAST_HOTKEYS}[cache]\nmax_mb = 16\nmax_ttl_ms = 30000\nping_ms = 250\n")
}

struct Case {
    name: &'static str,
    setup: &'static [&'static [&'static [u8]]],
    read: &'static [&'static [u8]],
    write: &'static [&'static [u8]],
}

const SET_BY_SCRIPT: &[u8] = b"return redis.call('set', KEYS[1], ARGV[1])";
const LIBRARY: &[u8] = b"#!lua name=kwtest\n\
redis.register_function('setit', function(keys, args) return redis.call('set', keys[1], args[1]) end)";

const CASES: &[Case] = &[
    Case {
        name: "EVAL with the key in KEYS",
        setup: &[&[b"SET", b"k:eval", b"old"]],
        read: &[b"GET", b"k:eval"],
        write: &[b"EVAL", SET_BY_SCRIPT, b"1", b"k:eval", b"new"],
    },
    Case {
        name: "FCALL with the key in KEYS",
        setup: &[
            &[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY],
            &[b"SET", b"k:fcall", b"old"],
        ],
        read: &[b"GET", b"k:fcall"],
        write: &[b"FCALL", b"setit", b"1", b"k:fcall", b"new"],
    },
    Case {
        name: "SORT ... STORE",
        setup: &[
            &[b"RPUSH", b"k:sort", b"old"],
            &[b"RPUSH", b"src:sort", b"c", b"a", b"b"],
        ],
        read: &[b"LRANGE", b"k:sort", b"0", b"-1"],
        write: &[b"SORT", b"src:sort", b"ALPHA", b"STORE", b"k:sort"],
    },
    Case {
        name: "GEORADIUS ... STORE",
        setup: &[
            &[b"ZADD", b"k:geo", b"1", b"old"],
            &[
                b"GEOADD",
                b"src:geo",
                b"13.361389",
                b"38.115556",
                b"palermo",
            ],
        ],
        read: &[b"ZRANGE", b"k:geo", b"0", b"-1"],
        write: &[
            b"GEORADIUS",
            b"src:geo",
            b"15",
            b"37",
            b"200",
            b"km",
            b"STORE",
            b"k:geo",
        ],
    },
    Case {
        name: "LMPOP",
        setup: &[&[b"RPUSH", b"k:lmpop", b"a", b"b", b"c"]],
        read: &[b"LRANGE", b"k:lmpop", b"0", b"-1"],
        write: &[b"LMPOP", b"1", b"k:lmpop", b"LEFT"],
    },
    Case {
        name: "ZMPOP",
        setup: &[&[b"ZADD", b"k:zmpop", b"1", b"a", b"2", b"b"]],
        read: &[b"ZRANGE", b"k:zmpop", b"0", b"-1"],
        write: &[b"ZMPOP", b"1", b"k:zmpop", b"MIN"],
    },
    Case {
        name: "PFCOUNT (rewrites the cached cardinality)",
        setup: &[&[b"PFADD", b"k:hll", b"a", b"b", b"c"]],
        read: &[b"GET", b"k:hll"],
        write: &[b"PFCOUNT", b"k:hll"],
    },
];

/// Each write, pipelined with a read of what it changed, on a key whose
/// read is served from the cache: the read gets what Redis holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_pipelined_behind_a_write_sees_the_write() {
    let redis = Redis::start();
    for case in CASES {
        for cmd in case.setup {
            let r = redis.call(cmd);
            assert!(!r.starts_with(b"-"), "{}: setup {}", case.name, esc(&r));
        }
    }
    let kw = Keyward::start_for(&redis, &config(), &[]);
    let reads: Vec<&[&[u8]]> = CASES.iter().map(|c| c.read).collect();
    let load = HotLoad::start(kw.port(), &reads).await;
    wait_cache_hits(&kw).await;
    let mut conn = Raw::connect(kw.port()).await;
    let mut direct = Raw::connect(redis.port()).await;
    for case in CASES {
        let before = direct.call(case.read).await;
        assert_eq!(
            esc(&cached_reply(&kw, &load, &mut conn, case.read).await),
            esc(&before),
            "{}: the cached reply before the write",
            case.name
        );
        let mut pipeline = cmd(case.write);
        pipeline.extend(cmd(case.read));
        conn.send(&pipeline).await;
        let replies = conn.read_replies(2).await;
        assert!(
            !replies[0].starts_with(b"-"),
            "{}: the write failed: {}",
            case.name,
            esc(&replies[0])
        );
        let after = direct.call(case.read).await;
        assert_ne!(
            esc(&before),
            esc(&after),
            "{}: the write should change what the read returns",
            case.name
        );
        assert_eq!(
            esc(&replies[1]),
            esc(&after),
            "{}: the read pipelined behind the write",
            case.name
        );
    }

    // Writes that name no key drop the whole cache.
    for write in [&[&b"FLUSHALL"[..]][..], &[b"FLUSHDB", b"ASYNC"]] {
        assert_eq!(
            esc(&redis.call(&[b"SET", b"k:eval", b"again"])),
            esc(b"+OK\r\n")
        );
        let read: &[&[u8]] = &[b"GET", b"k:eval"];
        assert_eq!(
            esc(&cached_reply(&kw, &load, &mut conn, read).await),
            esc(&bulk(b"again"))
        );
        let mut pipeline = cmd(write);
        pipeline.extend(cmd(read));
        conn.send(&pipeline).await;
        let replies = conn.read_replies(2).await;
        assert_eq!(esc(&replies[0]), esc(b"+OK\r\n"));
        assert_eq!(
            esc(&replies[1]),
            esc(b"$-1\r\n"),
            "GET pipelined behind {}",
            esc(write[0])
        );
    }
    load.stop().await;
}

/// A client's read sent behind its own write that Redis has not run yet
/// (writes paused on Redis) is not answered from the cache, even once
/// another client's read has filled the entry with the value before the
/// write: the client reads its writes, never new then old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_behind_an_unanswered_write_skips_the_cache() {
    let redis = Redis::start();
    assert_eq!(esc(&redis.call(&[b"SET", b"hk", b"old"])), esc(b"+OK\r\n"));
    let kw = Keyward::start_for(&redis, &config(), &[]);
    // The load keeps hk hot without reading it with GET: the only GET
    // fills are the ones this test causes.
    let load = HotLoad::start(kw.port(), &[&[b"STRLEN", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut writer = Raw::connect(kw.port()).await;
    let mut other = Raw::connect(kw.port()).await;
    let mut direct = Raw::connect(redis.port()).await;

    assert_eq!(
        esc(&direct.call(&[b"CLIENT", b"PAUSE", b"3000", b"WRITE"]).await),
        esc(b"+OK\r\n")
    );
    let mut pipeline = cmd(&[b"SET", b"hk", b"new"]);
    pipeline.extend(cmd(&[b"GET", b"hk"]));
    writer.send(&pipeline).await;
    // Another client's read misses and fills GET hk on the tracking
    // connection with the value before the write (reads run during the
    // pause); its own GET waits behind the paused SET on the shared
    // connection, so it runs after the write.
    let fills = |m: &str| metric(m, "keyward_cache_fills_total").unwrap_or(0.0);
    let before = fills(&metrics(&kw).await);
    other.send(&cmd(&[b"GET", b"hk"])).await;
    wait_until(
        "the other client's read filled GET hk",
        DEADLINE,
        || async { fills(&metrics(&kw).await) > before },
    )
    .await;
    writer.send(&cmd(&[b"GET", b"hk"])).await;
    let replies = writer.read_replies(3).await;
    assert_eq!(
        replies.iter().map(|r| esc(r)).collect::<Vec<_>>(),
        [esc(b"+OK\r\n"), esc(&bulk(b"new")), esc(&bulk(b"new"))],
        "SET, then GET behind it twice (the second sent once the entry was cached)"
    );
    assert_eq!(esc(&other.read_reply().await), esc(&bulk(b"new")));
    load.stop().await;
}

/// SELECT 0 queued in a transaction that never runs leaves the client in
/// its database: it is not released to the shared pool (database 0) or
/// answered from the cache (database 0 only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_queued_in_a_discarded_transaction_keeps_the_database() {
    let redis = Redis::start();
    let mut direct = hk_in_two_databases(&redis).await;
    let kw = Keyward::start_for(&redis, &config(), &[]);
    let load = HotLoad::start(kw.port(), &[&[b"GET", b"hk"]]).await;
    wait_cache_hits(&kw).await;
    let mut probe = Raw::connect(kw.port()).await;
    assert_eq!(
        esc(&cached_reply(&kw, &load, &mut probe, &[b"GET", b"hk"]).await),
        esc(&bulk(b"db0"))
    );

    let mut c = Raw::connect(kw.port()).await;
    let steps: [(&[&[u8]], &[u8]); 6] = [
        (&[b"SELECT", b"1"], b"+OK\r\n"),
        (&[b"MULTI"], b"+OK\r\n"),
        (&[b"SELECT", b"0"], b"+QUEUED\r\n"),
        (&[b"DISCARD"], b"+OK\r\n"),
        (&[b"GET", b"hk"], b"$3\r\ndb1\r\n"),
        (&[b"SET", b"probe", b"x"], b"+OK\r\n"),
    ];
    for (req, want) in steps {
        assert_eq!(
            esc(&c.call(req).await),
            esc(want),
            "{}",
            req.iter().map(|a| esc(a)).collect::<Vec<_>>().join(" ")
        );
    }
    assert_eq!(
        esc(&direct.call(&[b"GET", b"probe"]).await),
        esc(&bulk(b"x")),
        "the SET went to database 1"
    );
    load.stop().await;
}

//! Data-path codec costs: request framing, reply boundary scanning and the
//! routing decision for one request, measured per command and per byte.
//!
//! `decode_and_route_get` is the whole per-request cost before a request is
//! queued upstream: frame it, view its arguments, classify it against the
//! command table. Run with `cargo bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use keyward::command::{classify, CommandTable};
use keyward::resp::{Limits, Parsed, RequestParser, Scanner};

/// A command table with the shape Redis reports, built from a COMMAND reply
/// of a few common commands (the benches run without a server).
fn table() -> CommandTable {
    /// (name, arity, flags, first key, last key, key step)
    type Spec<'a> = (&'a str, i64, &'a [&'a str], i64, i64, i64);
    let mut reply = Vec::new();
    let cmds: &[Spec] = &[
        ("get", 2, &["readonly", "fast"], 1, 1, 1),
        ("set", -3, &["write", "denyoom"], 1, 1, 1),
        ("blpop", -3, &["write", "blocking"], 1, -2, 1),
        ("mget", -2, &["readonly", "fast"], 1, -1, 1),
        ("incr", 2, &["write", "fast"], 1, 1, 1),
    ];
    reply.extend_from_slice(format!("*{}\r\n", cmds.len()).as_bytes());
    for (name, arity, flags, first, last, step) in cmds {
        reply.extend_from_slice(
            format!(
                "*10\r\n${}\r\n{}\r\n:{}\r\n*{}\r\n",
                name.len(),
                name,
                arity,
                flags.len()
            )
            .as_bytes(),
        );
        for f in *flags {
            reply.extend_from_slice(format!("+{f}\r\n").as_bytes());
        }
        reply.extend_from_slice(
            format!(":{first}\r\n:{last}\r\n:{step}\r\n*0\r\n*0\r\n*0\r\n*0\r\n").as_bytes(),
        );
    }
    CommandTable::from_reply(&reply).expect("bench table")
}

fn bench(c: &mut Criterion) {
    let table = table();
    let limits = Limits::default();
    let get = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000012345\r\n";

    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_and_route_get", |b| {
        let mut parser = RequestParser::new();
        b.iter(|| {
            let buf = black_box(&get[..]);
            let Ok(Some(Parsed::Request(req))) = parser.parse(buf, &limits) else {
                panic!("GET must parse")
            };
            let args: smallvec::SmallVec<[&[u8]; 8]> =
                (0..req.args.len()).map(|i| req.arg(buf, i)).collect();
            black_box(classify(Some(&table), &args))
        })
    });
    let mut pipeline = Vec::new();
    for i in 0..1000 {
        pipeline.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n$10\r\nkey:{i:06}\r\n$32\r\n{:032}\r\n",
                i
            )
            .as_bytes(),
        );
    }
    g.throughput(Throughput::Bytes(pipeline.len() as u64));
    g.bench_function("frame_1000_set_pipeline", |b| {
        let mut parser = RequestParser::new();
        b.iter(|| {
            let mut off = 0;
            let buf = black_box(&pipeline[..]);
            while let Ok(Some(Parsed::Request(r))) = parser.parse(&buf[off..], &limits) {
                off += r.consumed;
            }
            assert_eq!(off, buf.len());
        })
    });
    g.finish();

    let mut g = c.benchmark_group("reply");
    let mut replies = Vec::new();
    for i in 0..1000 {
        match i % 4 {
            0 => replies.extend_from_slice(b"+OK\r\n"),
            1 => replies.extend_from_slice(format!("$32\r\n{:032}\r\n", i).as_bytes()),
            2 => replies.extend_from_slice(b":42\r\n"),
            _ => replies.extend_from_slice(b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n"),
        }
    }
    g.throughput(Throughput::Bytes(replies.len() as u64));
    g.bench_function("scan_1000_mixed_replies", |b| {
        b.iter(|| {
            let mut s = Scanner::new();
            let buf = black_box(&replies[..]);
            let mut n = 0;
            while let Ok(Some(_)) = s.next(buf) {
                n += 1;
            }
            assert_eq!(n, 1000);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

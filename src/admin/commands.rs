//! The KEYWARD command family, answered by keyward itself over RESP:
//! `KEYWARD TOPOLOGY`, `HOTKEYS`, `CACHE`, `SLOWLOG`, `CLIENTS`, `CONFIG GET`
//! (those three in `introspect`), `FAILOVER` (in `server::client`, as it
//! waits) and `KEYWARD HELP`.

use bytes::BytesMut;

use crate::resp::reply::{self, Proto};
use crate::server::Ctx;

/// Answer `KEYWARD <sub> ...` (args exclude the command name).
pub fn keyward(ctx: &Ctx, proto: Proto, args: &[&[u8]], out: &mut BytesMut) {
    let Some(sub) = args.first() else {
        return reply::error(out, "ERR wrong number of arguments for 'keyward' command");
    };
    match sub.to_ascii_lowercase().as_slice() {
        b"topology" if args.len() == 1 => topology(ctx, proto, out),
        b"hotkeys" => hotkeys(ctx, &args[1..], out),
        b"cache" => cache(ctx, proto, &args[1..], out),
        b"slowlog" => super::introspect::slowlog(ctx, &args[1..], out),
        b"clients" => super::introspect::clients(ctx, &args[1..], out),
        b"config" => super::introspect::config(ctx, proto, &args[1..], out),
        b"help" => {
            let lines = [
                "KEYWARD <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "TOPOLOGY",
                "    Master, config epoch, tracker state, replicas and sentinels.",
                "HOTKEYS [FLEET] [COUNT <n>]",
                "    The hottest keys: key, estimated ops/s, error bound (ops/s), hot flag (1/0).",
                "    FLEET merges every keyward publishing to the same Redis: key, ops/s, instances, hot flag.",
                "CACHE [COUNT <n>]",
                "    Near cache: budget, bytes, entries, hits, misses, fills, invalidations, flushes, keys cached.",
                "SLOWLOG GET [<count>] | LEN | RESET",
                "    Requests slower than admin.slowlog_slower_than_us, measured at the proxy (read to reply written).",
                "CLIENTS [COUNT <n>]",
                "    Proxy clients, one line each: id, addr, age, idle, pinned, last command, requests, protocol.",
                "CONFIG GET <pattern> [<pattern> ...]",
                "    The effective configuration, as section.key names and values.",
                "FAILOVER",
                "    Planned switchover to a caught-up replica through Sentinel, holding requests meanwhile.",
                "HELP",
                "    Print this help.",
            ];
            reply::array(out, lines.len());
            for l in lines {
                reply::simple(out, l);
            }
        }
        b"topology" => reply::error(
            out,
            "ERR wrong number of arguments for 'keyward|topology' command",
        ),
        _ => reply::error(
            out,
            [
                &b"ERR unknown subcommand '"[..],
                sub,
                b"'. Try KEYWARD HELP.",
            ]
            .concat(),
        ),
    }
}

/// Parse `[FLEET] [COUNT n]` (after HOTKEYS): (fleet, count); the error is
/// the reply line.
pub fn parse_hotkeys(args: &[&[u8]]) -> Result<(bool, usize), &'static str> {
    let (fleet, rest) = match args.first() {
        Some(a) if a.eq_ignore_ascii_case(b"fleet") => (true, &args[1..]),
        _ => (false, args),
    };
    let count = match rest {
        [] => 10,
        [opt, n] if opt.eq_ignore_ascii_case(b"count") => {
            match std::str::from_utf8(n)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(n) if n > 0 => n as usize,
                Some(_) => return Err("ERR COUNT must be greater than 0"),
                None => return Err("ERR value is not an integer or out of range"),
            }
        }
        _ => return Err("ERR syntax error"),
    };
    Ok((fleet, count))
}

/// The reply for `KEYWARD HOTKEYS FLEET`, merging every instance's summary.
pub async fn hotkeys_fleet(ctx: &Ctx, count: usize, out: &mut BytesMut) {
    match crate::hotkey::fleet::read(ctx).await {
        Ok(entries) => {
            let n = count.min(entries.len());
            reply::array(out, n);
            for e in &entries[..n] {
                reply::array(out, 4);
                reply::bulk(out, &e.key);
                reply::int(out, e.rate as i64);
                reply::int(out, e.instances as i64);
                reply::int(out, e.hot as i64);
            }
        }
        Err(e) => reply::error(out, format!("ERR fleet view unavailable: {e}")),
    }
}

fn hotkeys(ctx: &Ctx, args: &[&[u8]], out: &mut BytesMut) {
    let Some(d) = &ctx.hotkeys else {
        return reply::error(
            out,
            "ERR hot-key detection is disabled (hotkeys.enabled = false)",
        );
    };
    let count = match parse_hotkeys(args) {
        Ok((false, n)) => n,
        Ok((true, _)) => {
            return reply::error(out, "ERR KEYWARD HOTKEYS FLEET is answered asynchronously")
        }
        Err(e) => return reply::error(out, e),
    };
    let snap = d.snapshot();
    let n = count.min(snap.keys.len());
    reply::array(out, n);
    for e in &snap.keys[..n] {
        reply::array(out, 4);
        reply::bulk(out, &e.key);
        reply::int(out, e.rate as i64);
        reply::int(out, e.error as i64);
        reply::int(out, e.hot as i64);
    }
}

fn cache(ctx: &Ctx, proto: Proto, args: &[&[u8]], out: &mut BytesMut) {
    let Some(c) = &ctx.cache else {
        return reply::error(
            out,
            "ERR the near cache is disabled (cache.max_mb = 0 or hotkeys.enabled = false)",
        );
    };
    let count = match parse_hotkeys(args) {
        Ok((false, n)) => n,
        _ => return reply::error(out, "ERR syntax error"),
    };
    let st = c.stats(count);
    reply::map(out, proto, 11);
    for (name, v) in [
        ("budget-bytes", st.budget_bytes),
        ("bytes", st.bytes),
        ("entries", st.entries),
        ("hits", st.hits),
        ("misses", st.misses),
        ("fills", st.fills),
        ("fills-voided", st.fills_voided),
        ("invalidations", st.invalidations),
    ] {
        reply::bulk(out, name.as_bytes());
        reply::int(out, v as i64);
    }
    reply::bulk(out, b"link-up");
    reply::int(out, st.link_up as i64);
    reply::bulk(out, b"flushes");
    reply::map(out, proto, st.flushes.len());
    for (reason, n) in &st.flushes {
        reply::bulk(out, reason.as_bytes());
        reply::int(out, *n as i64);
    }
    reply::bulk(out, b"keys");
    reply::array(out, st.keys.len());
    for (k, n, b) in &st.keys {
        reply::array(out, 3);
        reply::bulk(out, k.as_bytes());
        reply::int(out, *n as i64);
        reply::int(out, *b as i64);
    }
}

fn topology(ctx: &Ctx, proto: Proto, out: &mut BytesMut) {
    let t = ctx.topology.snapshot();
    reply::map(out, proto, 6);
    reply::bulk(out, b"master");
    match &t.master {
        Some(m) => reply::bulk(out, m.as_bytes()),
        None => null(out, proto),
    }
    reply::bulk(out, b"epoch");
    reply::int(out, t.epoch as i64);
    reply::bulk(out, b"state");
    reply::bulk(out, t.state.name().as_bytes());
    reply::bulk(out, b"master-name");
    match &t.master_name {
        Some(m) => reply::bulk(out, m.as_bytes()),
        None => null(out, proto),
    }
    reply::bulk(out, b"replicas");
    reply::array(out, t.replicas.len());
    for r in &t.replicas {
        reply::bulk(out, r.as_bytes());
    }
    reply::bulk(out, b"sentinels");
    reply::array(out, t.sentinels.len());
    for s in &t.sentinels {
        reply::map(out, proto, 2);
        reply::bulk(out, b"address");
        reply::bulk(out, s.address.as_bytes());
        reply::bulk(out, b"reachable");
        reply::int(out, s.reachable as i64);
    }
}

fn null(out: &mut BytesMut, proto: Proto) {
    match proto {
        Proto::Resp2 => out.extend_from_slice(b"$-1\r\n"),
        Proto::Resp3 => out.extend_from_slice(b"_\r\n"),
    }
}

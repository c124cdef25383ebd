//! The KEYWARD command family, answered by keyward itself over RESP:
//! `KEYWARD TOPOLOGY`, `KEYWARD FAILOVER` (in `server::client`, as it
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
        b"help" => {
            let lines = [
                "KEYWARD <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "TOPOLOGY",
                "    Master, config epoch, tracker state, replicas and sentinels.",
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
            &format!(
                "ERR unknown subcommand '{}'. Try KEYWARD HELP.",
                String::from_utf8_lossy(sub)
            ),
        ),
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

//! INFO through the proxy: the upstream's own text plus a `# Keyward`
//! section, so redis-cli, RedisInsight and redis_exporter keep working and
//! also see the proxy. Every field is prefixed `keyward_`: tools that fold
//! INFO into one flat map must not have Redis's `connected_clients`
//! overwritten by the proxy's.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use bytes::BytesMut;

use crate::resp::scan::{line_end, parse_int};
use crate::server::Ctx;

/// Does `INFO <args>` include the Keyward section? Yes for the default
/// set (no argument, `default`, `all`, `everything`) and for `keyward`.
pub fn wanted(args: &[&[u8]]) -> bool {
    args.is_empty()
        || args.iter().any(|a| {
            let a = a.to_ascii_lowercase();
            matches!(
                a.as_slice(),
                b"default" | b"all" | b"everything" | b"keyward"
            )
        })
}

/// The `# Keyward` section's text (CRLF line ends).
pub fn section(ctx: &Ctx) -> String {
    let st = &ctx.stats;
    let (requests, errors) = st.totals();
    let lat = st.latency();
    let t = ctx.topology.snapshot();
    let mut s = String::with_capacity(1024);
    let mut line = |k: &str, v: &dyn std::fmt::Display| {
        let _ = write!(s, "keyward_{k}:{v}\r\n");
    };
    line("version", &env!("CARGO_PKG_VERSION"));
    line("uptime_in_seconds", &st.started.elapsed().as_secs());
    line("clients", &ctx.clients.load(Relaxed));
    line("clients_accepted", &st.accepted.load(Relaxed));
    line("clients_rejected", &st.rejected.load(Relaxed));
    line("total_requests", &requests);
    line("total_error_replies", &errors);
    line("latency_p50_us", &format_args!("{:.0}", lat.quantile(0.5)));
    line("latency_p99_us", &format_args!("{:.0}", lat.quantile(0.99)));
    line("topology_state", &t.state.name());
    line("master", &t.master.as_deref().unwrap_or(""));
    line("master_epoch", &t.epoch);
    line("replicas", &t.replicas.len());
    line("sentinels", &t.sentinels.len());
    line(
        "sentinels_reachable",
        &t.sentinels.iter().filter(|s| s.reachable).count(),
    );
    line("failovers", &ctx.topology.failovers());
    line("held_requests", &ctx.held());
    let max_pinned = ctx.config.upstream.max_pinned;
    line(
        "pinned_connections",
        &max_pinned.saturating_sub(ctx.pinned.available_permits()),
    );
    line("hotkeys_enabled", &(ctx.hotkeys.is_some() as u8));
    if let Some(d) = &ctx.hotkeys {
        line("hotkeys_hot", &d.hot_now.load(Relaxed));
    }
    line("cache_enabled", &(ctx.cache.is_some() as u8));
    if let Some(c) = &ctx.cache {
        line("cache_link_up", &(c.link_up.load(Relaxed) as u8));
        line("cache_entries", &c.store.len());
        line("cache_bytes", &c.store.bytes());
        line("cache_hits", &c.store.hits.load(Relaxed));
        line("cache_misses", &c.store.misses.load(Relaxed));
    }
    line("slowlog_len", &ctx.slowlog.len());
    format!("# Keyward\r\n{s}")
}

/// Write `upstream` (INFO's reply: a bulk string in RESP2, a verbatim
/// string in RESP3) with `section` appended; anything else (an error) is
/// passed through untouched.
pub fn append(out: &mut BytesMut, upstream: &[u8], section: &str) {
    let Some(text) = body(upstream) else {
        out.extend_from_slice(upstream);
        return;
    };
    let (kind, prefix, text) = match upstream[0] {
        b'=' if text.len() >= 4 => (b'=', &text[..4], &text[4..]),
        _ => (b'$', &b""[..], text),
    };
    let sep: &[u8] = if text.is_empty() { b"" } else { b"\r\n" };
    let len = prefix.len() + text.len() + sep.len() + section.len();
    out.reserve(len + 16);
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(prefix);
    out.extend_from_slice(text);
    out.extend_from_slice(sep);
    out.extend_from_slice(section.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The payload of a bulk or verbatim string reply.
fn body(reply: &[u8]) -> Option<&[u8]> {
    if !matches!(reply.first(), Some(b'$' | b'=')) {
        return None;
    }
    // line_end finds the '\n' of the header's "\r\n".
    let nl = line_end(reply, 1)?;
    let len = usize::try_from(parse_int(reply.get(1..nl.checked_sub(1)?)?)?).ok()?;
    reply.get(nl + 1..nl + 1 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_to_bulk_and_verbatim() {
        let mut out = BytesMut::new();
        append(
            &mut out,
            b"$15\r\n# Server\r\na:1\r\n\r\n",
            "# Keyward\r\nk:v\r\n",
        );
        assert_eq!(
            &out[..],
            b"$33\r\n# Server\r\na:1\r\n\r\n# Keyward\r\nk:v\r\n\r\n"
        );
        let mut out = BytesMut::new();
        append(
            &mut out,
            b"=19\r\ntxt:# Server\r\na:1\r\n\r\n",
            "# Keyward\r\nk:v\r\n",
        );
        assert_eq!(
            &out[..],
            b"=37\r\ntxt:# Server\r\na:1\r\n\r\n# Keyward\r\nk:v\r\n\r\n"
        );
        let mut out = BytesMut::new();
        append(&mut out, b"$0\r\n\r\n", "# Keyward\r\nk:v\r\n");
        assert_eq!(&out[..], b"$16\r\n# Keyward\r\nk:v\r\n\r\n");
        let mut out = BytesMut::new();
        append(&mut out, b"-ERR no\r\n", "x");
        assert_eq!(&out[..], b"-ERR no\r\n");
    }

    #[test]
    fn wanted_sections() {
        assert!(wanted(&[]));
        assert!(wanted(&[b"ALL"]));
        assert!(wanted(&[b"server", b"Keyward"]));
        assert!(!wanted(&[b"server"]));
    }
}

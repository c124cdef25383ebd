//! `KEYWARD SLOWLOG`, `KEYWARD CLIENTS` and `KEYWARD CONFIG GET`: the proxy's
//! own counterparts of Redis's SLOWLOG, CLIENT LIST and CONFIG GET, in the
//! shapes Redis tools already parse.

use std::fmt::Write as _;

use bytes::BytesMut;

use crate::resp::reply::{self, Proto};
use crate::server::Ctx;

/// `KEYWARD SLOWLOG GET [count] | LEN | RESET` (args after SLOWLOG).
pub fn slowlog(ctx: &Ctx, args: &[&[u8]], out: &mut BytesMut) {
    let sub = args.first().map(|a| a.to_ascii_lowercase());
    match (sub.as_deref(), args.len()) {
        (Some(b"get"), 1) => ctx.slowlog.reply(out, 10),
        (Some(b"get"), 2) => match std::str::from_utf8(args[1])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(-1) => ctx.slowlog.reply(out, usize::MAX),
            Some(n) if n >= 0 => ctx.slowlog.reply(out, n as usize),
            Some(_) => reply::error(out, "ERR count should be greater than or equal to -1"),
            None => reply::error(out, "ERR value is not an integer or out of range"),
        },
        (Some(b"len"), 1) => reply::int(out, ctx.slowlog.len() as i64),
        (Some(b"reset"), 1) => {
            ctx.slowlog.reset();
            reply::simple(out, "OK");
        }
        _ => reply::error(
            out,
            "ERR unknown or malformed KEYWARD SLOWLOG subcommand. Try KEYWARD HELP.",
        ),
    }
}

/// `KEYWARD CLIENTS [COUNT n]`: one line per client like CLIENT LIST's,
/// oldest connection first.
pub fn clients(ctx: &Ctx, args: &[&[u8]], out: &mut BytesMut) {
    let count = match args {
        [] => usize::MAX,
        [opt, n] if opt.eq_ignore_ascii_case(b"count") => match std::str::from_utf8(n)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(n) if n > 0 => n as usize,
            Some(_) => return reply::error(out, "ERR COUNT must be greater than 0"),
            None => return reply::error(out, "ERR value is not an integer or out of range"),
        },
        _ => return reply::error(out, "ERR syntax error"),
    };
    let mut text = String::new();
    for c in ctx.registry.list(count) {
        let _ = writeln!(
            text,
            "id={} addr={} age={} idle={} pinned={} cmd={} requests={} resp={}",
            c.id,
            c.addr,
            c.age_s as u64,
            c.idle_s as u64,
            c.pinned as u8,
            if c.cmd.is_empty() { "NULL" } else { &c.cmd },
            c.requests,
            c.proto
        );
    }
    reply::bulk(out, text.as_bytes());
}

/// `KEYWARD CONFIG GET pattern [pattern ...]`: `section.key` names of the
/// effective configuration (secrets redacted) matching any glob pattern,
/// as name/value pairs (a map in RESP3), like CONFIG GET.
pub fn config(ctx: &Ctx, proto: Proto, args: &[&[u8]], out: &mut BytesMut) {
    let (Some(sub), true) = (args.first(), args.len() >= 2) else {
        return reply::error(
            out,
            "ERR wrong number of arguments for 'keyward|config' command",
        );
    };
    if !sub.eq_ignore_ascii_case(b"get") {
        return reply::error(
            out,
            [
                &b"ERR unknown KEYWARD CONFIG subcommand '"[..],
                sub,
                b"' (keyward's configuration is read-only at runtime; only GET)",
            ]
            .concat(),
        );
    }
    let pairs: Vec<(String, String)> = flatten(&ctx.config)
        .into_iter()
        .filter(|(k, _)| args[1..].iter().any(|p| glob(p, k.as_bytes())))
        .collect();
    reply::map(out, proto, pairs.len());
    for (k, v) in pairs {
        reply::bulk(out, k.as_bytes());
        reply::bulk(out, v.as_bytes());
    }
}

/// Every configuration key as (`section.key`, value as text), sorted.
pub fn flatten(config: &crate::Config) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let Ok(toml::Value::Table(sections)) = toml::Value::try_from(config) else {
        return all;
    };
    for (section, table) in sections {
        let toml::Value::Table(keys) = table else {
            continue;
        };
        for (k, v) in keys {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).unwrap_or(x.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            all.push((format!("{section}.{k}"), text));
        }
    }
    all.sort();
    all
}

/// Redis's glob match (`*`, `?`, `[...]`, `\` escapes), case-insensitive
/// like CONFIG GET.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    // Where to resume after the last `*`: (pattern index, text index).
    let mut star: Option<(usize, usize)> = None;
    let lower = |c: u8| c.to_ascii_lowercase();
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => class(pattern, p, lower(text[t])),
            Some(b'\\') if p + 1 < pattern.len() => {
                (lower(pattern[p + 1]) == lower(text[t])).then_some(p + 2)
            }
            Some(&c) => (lower(c) == lower(text[t])).then_some(p + 1),
            None => None,
        };
        match step {
            Some(next) => {
                p = next;
                t += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Match `c` against the `[...]` class starting at `pattern[p]`; the index
/// after the class if it matches.
fn class(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    let mut i = p + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut hit = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            hit |= pattern[i + 1].to_ascii_lowercase() == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (a, b) = (
                pattern[i].to_ascii_lowercase(),
                pattern[i + 2].to_ascii_lowercase(),
            );
            hit |= a.min(b) <= c && c <= a.max(b);
            i += 3;
        } else {
            hit |= pattern[i].to_ascii_lowercase() == c;
            i += 1;
        }
    }
    // An unterminated class matches up to the end, as in Redis.
    (hit != negate).then_some((i + 1).min(pattern.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_like_redis() {
        assert!(glob(b"*", b"server.listen"));
        assert!(glob(b"server.*", b"server.listen"));
        assert!(glob(b"SERVER.LIS?EN", b"server.listen"));
        assert!(glob(b"*max*", b"server.max_clients"));
        assert!(!glob(b"cache.*", b"server.listen"));
        assert!(glob(b"[sc]*", b"cache.max_mb"));
        assert!(!glob(b"[^sc]*", b"cache.max_mb"));
        assert!(glob(b"a\\*b", b"a*b"));
        assert!(!glob(b"a\\*b", b"axb"));
        assert!(glob(b"[a-c]x", b"bx"));
        assert!(!glob(b"", b"x"));
    }

    #[test]
    fn flatten_names_every_key() {
        let c = crate::Config::default();
        let all = flatten(&c);
        assert!(all
            .iter()
            .any(|(k, v)| k == "server.listen" && v == "127.0.0.1:6380"));
        assert!(all
            .iter()
            .any(|(k, v)| k == "admin.slowlog_max_len" && v == "128"));
        assert!(all.iter().all(|(k, _)| k.contains('.')));
    }
}

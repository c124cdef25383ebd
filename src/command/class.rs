//! Routing families: which requests keyward answers itself, which need a
//! dedicated (pinned) upstream connection, and which share the pool.
//!
//! This is the one hand-written list of command names in keyward, and it is
//! deliberately short: the commands the proxy answers or intercepts (HELLO,
//! AUTH, QUIT, RESET, SELECT) and the stateful families that cannot share a
//! connection (transactions, subscriptions, MONITOR, client-specific CLIENT
//! state). Whether a command blocks comes from the server's own `blocking`
//! flag in the command table.

use super::family::Family;
use super::table::{flags, lowercase, CommandTable};

/// Which subscription namespace a (UN)SUBSCRIBE command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubKind {
    Channel,
    Pattern,
    Shard,
}

/// `CLIENT REPLY` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    Skip,
}

/// The routing family of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// An ordinary command: the shared pool, or the pinned connection if the
    /// client holds one.
    Forward,
    Hello,
    Auth,
    Quit,
    Reset,
    Select,
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
    /// A command that may block the connection until its reply.
    Blocking,
    Subscribe(SubKind),
    Unsubscribe(SubKind),
    Monitor,
    /// CLIENT subcommands whose effect or answer belongs to one connection.
    ClientState,
    ClientReply(ReplyMode),
    /// The KEYWARD admin family, answered by keyward.
    Keyward,
    /// INFO: the upstream's answer plus a `# Keyward` section.
    Info,
    /// Answered with an error by keyward, never forwarded: a name or
    /// CLIENT/SCRIPT subcommand with a NUL in it (Redis compares names only
    /// up to a NUL, so "multi\0x" can run as MULTI on a shared connection),
    /// and SCRIPT DEBUG YES|SYNC (the Lua debugger takes over the
    /// connection it is enabled on). See `server::local::refusal`.
    Refused,
    /// SYNC/PSYNC/REPLCONF: a replication stream is not RESP and would wreck a
    /// shared connection, so keyward refuses it.
    Replication,
    /// SCRIPT KILL, FUNCTION KILL and CLIENT UNPAUSE: sent on a connection
    /// of their own (see `upstream::side`), so they reach Redis while a busy
    /// script or a paused write holds up the shared connection.
    Kill,
}

/// Where a request goes and the family it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub class: Class,
    pub family: Family,
    /// GET or SET: the one key is the second argument, no table needed to
    /// find it (the hot-key sampler's commonest case).
    pub key_is_second: bool,
}

/// Classify a request from its arguments (`args[0]` is the command name).
pub fn classify(table: Option<&CommandTable>, args: &[&[u8]]) -> Class {
    route(table, args).class
}

/// Classify a request and find its family, with one table lookup at most.
pub fn route(table: Option<&CommandTable>, args: &[&[u8]]) -> Routed {
    let other = |class| Routed {
        class,
        family: Family::Other,
        key_is_second: false,
    };
    let Some(name) = args.first() else {
        return other(Class::Forward);
    };
    // Redis compares names only up to a NUL, so a name with one could run
    // as another command: refused. No name below contains a NUL, so only
    // names matched by nothing (unknown or too long) need the check, which
    // keeps it off the GET/SET path.
    let unknown = || {
        other(if name.contains(&0) {
            Class::Refused
        } else {
            Class::Forward
        })
    };
    let mut buf = [0u8; 64];
    let Some(lower) = lowercase(name, &mut buf) else {
        return unknown();
    };
    let class = match lower {
        // The two commands that make most of any workload skip the table.
        b"get" | b"set" => {
            return Routed {
                class: Class::Forward,
                family: Family::String,
                key_is_second: args.len() >= 2,
            }
        }
        b"keyward" => {
            return Routed {
                class: Class::Keyward,
                family: Family::Keyward,
                key_is_second: false,
            }
        }
        b"hello" => Class::Hello,
        b"auth" => Class::Auth,
        b"quit" => Class::Quit,
        b"reset" => Class::Reset,
        b"select" => Class::Select,
        b"multi" => Class::Multi,
        b"exec" => Class::Exec,
        b"discard" => Class::Discard,
        b"watch" => Class::Watch,
        b"unwatch" => Class::Unwatch,
        b"subscribe" => Class::Subscribe(SubKind::Channel),
        b"psubscribe" => Class::Subscribe(SubKind::Pattern),
        b"ssubscribe" => Class::Subscribe(SubKind::Shard),
        b"unsubscribe" => Class::Unsubscribe(SubKind::Channel),
        b"punsubscribe" => Class::Unsubscribe(SubKind::Pattern),
        b"sunsubscribe" => Class::Unsubscribe(SubKind::Shard),
        b"monitor" => Class::Monitor,
        // REPLCONF too: ACK and GETACK get no reply at all, which would
        // shift every later reply on a shared connection.
        b"sync" | b"psync" | b"replconf" => Class::Replication,
        b"info" => Class::Info,
        b"wait" | b"waitaof" => Class::Blocking,
        b"client" => classify_client(args),
        b"script" | b"function" if args.len() == 2 && args[1].eq_ignore_ascii_case(b"kill") => {
            Class::Kill
        }
        b"script" => match args.get(1) {
            Some(sub) if sub.contains(&0) => Class::Refused,
            Some(sub) if sub.eq_ignore_ascii_case(b"debug") => match args.get(2) {
                Some(mode)
                    if upto_nul(mode).eq_ignore_ascii_case(b"yes")
                        || upto_nul(mode).eq_ignore_ascii_case(b"sync") =>
                {
                    Class::Refused
                }
                _ => Class::Forward,
            },
            _ => Class::Forward,
        },
        b"xread" | b"xreadgroup" => {
            // XREAD is flagged `blocking` but only blocks with BLOCK.
            let blocks = args[1..]
                .iter()
                .any(|a| upto_nul(a).eq_ignore_ascii_case(b"block"));
            if blocks {
                Class::Blocking
            } else {
                Class::Forward
            }
        }
        _ => {
            return match table.and_then(|t| t.get(lower)) {
                Some(info) => Routed {
                    class: if info.has(flags::BLOCKING) {
                        Class::Blocking
                    } else {
                        Class::Forward
                    },
                    family: info.sub(args.get(1).copied()).family,
                    key_is_second: false,
                },
                None => unknown(),
            }
        }
    };
    let family = match table.and_then(|t| t.get(lower)) {
        Some(info) => info.sub(args.get(1).copied()).family,
        // Before the table is loaded (or for HELLO and AUTH against a
        // Redis that does not list them): name the obvious ones.
        None => match class {
            Class::Hello | Class::Auth | Class::Quit | Class::Reset | Class::Select => {
                Family::Connection
            }
            Class::Multi | Class::Exec | Class::Discard | Class::Watch | Class::Unwatch => {
                Family::Transaction
            }
            Class::Subscribe(_) | Class::Unsubscribe(_) => Family::PubSub,
            _ => Family::Other,
        },
    };
    Routed {
        class,
        family,
        key_is_second: false,
    }
}

/// An argument as Redis's strcasecmp sees it: up to its first NUL.
pub fn upto_nul(a: &[u8]) -> &[u8] {
    a.split(|&b| b == 0).next().unwrap_or(a)
}

fn classify_client(args: &[&[u8]]) -> Class {
    let Some(sub) = args.get(1) else {
        return Class::Forward;
    };
    if sub.contains(&0) {
        return Class::Refused;
    }
    let mut buf = [0u8; 64];
    match lowercase(sub, &mut buf) {
        Some(b"reply") => match args.get(2).map(|m| upto_nul(m).to_ascii_lowercase()) {
            Some(m) if m == b"on" => Class::ClientReply(ReplyMode::On),
            Some(m) if m == b"off" => Class::ClientReply(ReplyMode::Off),
            Some(m) if m == b"skip" => Class::ClientReply(ReplyMode::Skip),
            // A malformed CLIENT REPLY gets Redis's own error, on the pool.
            _ => Class::Forward,
        },
        Some(
            b"setname" | b"getname" | b"id" | b"info" | b"no-evict" | b"no-touch" | b"tracking"
            | b"caching" | b"trackinginfo" | b"getredir" | b"setinfo",
        ) => Class::ClientState,
        Some(b"unpause") if args.len() == 2 => Class::Kill,
        _ => Class::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        let cases: &[(&[&[u8]], Class)] = &[
            (&[b"GET", b"k"], Class::Forward),
            (&[b"hello", b"3"], Class::Hello),
            (&[b"Multi"], Class::Multi),
            (&[b"WAIT", b"1", b"0"], Class::Blocking),
            (&[b"XREAD", b"STREAMS", b"s", b"0"], Class::Forward),
            (
                &[b"XREAD", b"block", b"0", b"STREAMS", b"s", b"$"],
                Class::Blocking,
            ),
            (&[b"SSUBSCRIBE", b"c"], Class::Subscribe(SubKind::Shard)),
            (&[b"punsubscribe"], Class::Unsubscribe(SubKind::Pattern)),
            (&[b"CLIENT", b"SETNAME", b"x"], Class::ClientState),
            (&[b"CLIENT", b"LIST"], Class::Forward),
            (
                &[b"client", b"reply", b"OFF"],
                Class::ClientReply(ReplyMode::Off),
            ),
        ];
        let nul_cases: &[(&[&[u8]], Class)] = &[
            // Redis compares names and keywords only up to a NUL.
            (&[b"multi\0x"], Class::Refused),
            (&[b"CLIENT", b"reply\0x", b"off"], Class::Refused),
            (
                &[b"CLIENT", b"REPLY", b"SKIP\0"],
                Class::ClientReply(ReplyMode::Skip),
            ),
            (
                &[b"XREAD", b"BLOCK\0", b"0", b"STREAMS", b"s", b"$"],
                Class::Blocking,
            ),
            (&[b"SCRIPT", b"DEBUG", b"YES"], Class::Refused),
            (&[b"script", b"debug", b"sync"], Class::Refused),
            (&[b"SCRIPT", b"DEBUG", b"NO"], Class::Forward),
            (&[b"script", b"kill"], Class::Kill),
            (&[b"FUNCTION", b"KILL"], Class::Kill),
            (&[b"FUNCTION", b"KILL", b"x"], Class::Forward),
            (&[b"client", b"UNPAUSE"], Class::Kill),
            (&[b"CLIENT", b"UNPAUSE", b"x"], Class::Forward),
            (&[b"FUNCTION", b"STATS"], Class::Forward),
            (&[b"SCRIPT", b"FLUSH"], Class::Forward),
            (&[b"GET", b"a\0b"], Class::Forward),
        ];
        for (args, want) in cases.iter().chain(nul_cases) {
            assert_eq!(classify(None, args), *want, "{args:?}");
        }
        assert!(route(None, &[b"get", b"k"]).key_is_second);
        assert!(route(None, &[b"SET", b"k", b"v"]).key_is_second);
        assert!(!route(None, &[b"GET"]).key_is_second, "no key to sample");
        assert!(!route(None, &[b"HGET", b"h", b"f"]).key_is_second);
    }
}

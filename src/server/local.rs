//! Replies keyward gives itself: HELLO, AUTH, and the errors for them, with
//! Redis's exact texts (a client library must not see a difference).

use bytes::BytesMut;

use crate::command::class::{upto_nul, SubKind};
use crate::resp::reply::{self, Proto};
use crate::resp::scan::parse_int;

/// A parsed HELLO request.
#[derive(Debug, PartialEq, Eq)]
pub struct Hello {
    pub proto: Option<Proto>,
    pub auth: Option<(Vec<u8>, Vec<u8>)>,
    pub setname: Option<Vec<u8>>,
}

/// Parse HELLO's arguments (after the name) with Redis 7's checks and order;
/// `Err` carries the error line to send (the client's bytes in it as sent).
pub fn parse_hello(args: &[&[u8]]) -> Result<Hello, Vec<u8>> {
    let mut hello = Hello {
        proto: None,
        auth: None,
        setname: None,
    };
    let mut j = 0;
    if let Some(v) = args.first() {
        let ver = parse_int(v)
            .ok_or(b"ERR Protocol version is not an integer or out of range".to_vec())?;
        hello.proto = match ver {
            2 => Some(Proto::Resp2),
            3 => Some(Proto::Resp3),
            _ => return Err(b"NOPROTO unsupported protocol version".to_vec()),
        };
        j = 1;
    }
    while j < args.len() {
        let more = args.len() - 1 - j;
        let opt = args[j];
        if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            hello.auth = Some((args[j + 1].to_vec(), args[j + 2].to_vec()));
            j += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            // Checked here, as Redis does while it reads the options.
            let name = args[j + 1];
            if name.iter().any(|c| !(b'!'..=b'~').contains(c)) {
                return Err(
                    b"ERR Client names cannot contain spaces, newlines or special characters."
                        .to_vec(),
                );
            }
            hello.setname = Some(name.to_vec());
            j += 2;
        } else {
            return Err([b"ERR Syntax error in HELLO option '", opt, b"'"].concat());
        }
    }
    Ok(hello)
}

/// Check AUTH credentials the way a Redis with no password answers them: the
/// `default` user accepts any password; no other user exists.
pub fn check_auth(user: Option<&[u8]>, _password: &[u8]) -> Result<(), String> {
    match user {
        None => Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into()),
        Some(u) if u == b"default" => Ok(()),
        Some(_) => Err("WRONGPASS invalid username-password pair or user is disabled.".into()),
    }
}

/// AUTH with its arguments (after the name).
pub fn auth(out: &mut BytesMut, args: &[&[u8]]) {
    let res = match args {
        [pass] => check_auth(None, pass),
        [user, pass] => check_auth(Some(user), pass),
        [] => Err("ERR wrong number of arguments for 'auth' command".into()),
        _ => Err("ERR syntax error".into()),
    };
    match res {
        Ok(()) => reply::simple(out, "OK"),
        Err(e) => reply::error(out, &e),
    }
}

/// The HELLO reply: the server map in the client's (new) protocol.
pub fn hello_reply(out: &mut BytesMut, proto: Proto, id: u64, version: &str) {
    reply::map(out, proto, 7);
    reply::bulk(out, b"server");
    reply::bulk(out, b"redis");
    reply::bulk(out, b"version");
    reply::bulk(out, version.as_bytes());
    reply::bulk(out, b"proto");
    reply::int(out, proto.number());
    reply::bulk(out, b"id");
    reply::int(out, id as i64);
    reply::bulk(out, b"mode");
    reply::bulk(out, b"standalone");
    reply::bulk(out, b"role");
    reply::bulk(out, b"master");
    reply::bulk(out, b"modules");
    reply::array(out, 0);
}

/// Redis's confirmations of (P|S)UNSUBSCRIBE from a client subscribed to
/// nothing: one per name (a null name when none is given), each with a
/// count of 0; pushes in RESP3.
pub fn unsubscribed(out: &mut BytesMut, proto: Proto, kind: SubKind, names: &[&[u8]]) {
    let command: &[u8] = match kind {
        SubKind::Channel => b"unsubscribe",
        SubKind::Pattern => b"punsubscribe",
        SubKind::Shard => b"sunsubscribe",
    };
    let head = if proto == Proto::Resp3 { b'>' } else { b'*' };
    let mut one = |name: Option<&[u8]>| {
        reply::header(out, head, 3);
        reply::bulk(out, command);
        match (name, proto) {
            (Some(n), _) => reply::bulk(out, n),
            (None, Proto::Resp3) => out.extend_from_slice(b"_\r\n"),
            (None, Proto::Resp2) => out.extend_from_slice(b"$-1\r\n"),
        }
        reply::int(out, 0);
    };
    if names.is_empty() {
        one(None);
    }
    for n in names {
        one(Some(n));
    }
}

/// The error for a request `command::class` marks `Refused`, in Redis's
/// words where Redis has them: a name with a NUL is an unknown command, a
/// CLIENT or SCRIPT subcommand with a NUL an unknown subcommand (texts cut
/// at the NUL, as Redis's `%s` does); SCRIPT DEBUG YES|SYNC is refused.
pub fn refusal(args: &[&[u8]]) -> Vec<u8> {
    // Redis's `%.*s`: up to a NUL, and at most `max` bytes.
    let text = |a: &'_ [u8], max: usize| -> Vec<u8> {
        let a = upto_nul(a);
        a[..a.len().min(max)].to_vec()
    };
    let name = args.first().copied().unwrap_or_default();
    if name.contains(&0) {
        let mut rest = Vec::new();
        for a in &args[1..] {
            if rest.len() >= 128 {
                break;
            }
            let arg = text(a, 128 - rest.len());
            rest.push(b'\'');
            rest.extend(arg);
            rest.extend_from_slice(b"' ");
        }
        [
            &b"ERR unknown command '"[..],
            &text(name, 128),
            b"', with args beginning with: ",
            &rest,
        ]
        .concat()
    } else if args.get(1).is_some_and(|s| s.contains(&0)) {
        [
            &b"ERR unknown subcommand '"[..],
            &text(args[1], 128),
            b"'. Try ",
            &name.to_ascii_uppercase(),
            b" HELP.",
        ]
        .concat()
    } else {
        b"ERR keyward does not support SCRIPT DEBUG YES|SYNC (the Lua debugger needs a \
          connection of its own); connect to Redis directly to debug scripts"
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_parsing_matches_redis() {
        assert_eq!(parse_hello(&[]).unwrap().proto, None);
        assert_eq!(parse_hello(&[b"3"]).unwrap().proto, Some(Proto::Resp3));
        assert_eq!(
            parse_hello(&[b"4"]).unwrap_err(),
            b"NOPROTO unsupported protocol version"
        );
        assert_eq!(
            parse_hello(&[b"x"]).unwrap_err(),
            b"ERR Protocol version is not an integer or out of range"
        );
        assert_eq!(
            parse_hello(&[b"3", b"AUTH", b"u"]).unwrap_err(),
            b"ERR Syntax error in HELLO option 'AUTH'"
        );
        let h = parse_hello(&[b"2", b"auth", b"default", b"pw", b"SETNAME", b"n"]).unwrap();
        assert_eq!(h.auth, Some((b"default".to_vec(), b"pw".to_vec())));
        assert_eq!(h.setname, Some(b"n".to_vec()));
        // The name is checked as it is read, before a later bad option.
        assert_eq!(
            parse_hello(&[b"2", b"SETNAME", b"bad name", b"FOO"]).unwrap_err(),
            b"ERR Client names cannot contain spaces, newlines or special characters."
        );
        // The client's bytes as sent, not made UTF-8.
        assert_eq!(
            parse_hello(&[b"3", b"\xc9\xfa"]).unwrap_err(),
            b"ERR Syntax error in HELLO option '\xc9\xfa'"
        );
    }

    #[test]
    fn refusals_quote_the_request_as_redis_does() {
        let long = [b'a'; 200];
        let got = refusal(&[b"GE\0T", b"k\xff\0x", &long, b"more"]);
        let want = [
            &b"ERR unknown command 'GE', with args beginning with: 'k\xff' '"[..],
            &long[..123],
            b"' ",
        ]
        .concat();
        assert_eq!(got, want);
        assert_eq!(
            refusal(&[b"client", b"\xe9\0"]),
            b"ERR unknown subcommand '\xe9'. Try CLIENT HELP."
        );
    }

    #[test]
    fn hello_reply_bytes_match_redis() {
        let mut out = BytesMut::new();
        hello_reply(&mut out, Proto::Resp3, 7, "7.0.15");
        assert_eq!(
            &out[..],
            &b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:7\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"[..]
        );
    }
}

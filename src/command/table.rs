//! The command table, built from the upstream's own `COMMAND` reply.
//!
//! keyward does not carry a list of Redis commands (DESIGN.md 2.2): arity,
//! flags and key positions come from the server it fronts, so a newer Redis or
//! a module's commands are understood without a keyward release. The table is
//! read on the data path for every request, so lookups avoid allocation: the
//! name is lowercased into a stack buffer and hashed with ahash.

use std::collections::HashMap;

use redis_protocol::resp2::types::OwnedFrame;

use super::family::Family;

/// Command flag bits (a subset of what `COMMAND` reports).
pub mod flags {
    pub const READONLY: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const BLOCKING: u32 = 1 << 2;
    pub const MOVABLEKEYS: u32 = 1 << 3;
    pub const PUBSUB: u32 = 1 << 4;
    pub const NOSCRIPT: u32 = 1 << 5;
    pub const ADMIN: u32 = 1 << 6;
    pub const FAST: u32 = 1 << 7;
    pub const DENYOOM: u32 = 1 << 8;
    pub const LOADING: u32 = 1 << 9;
    pub const STALE: u32 = 1 << 10;
    pub const NO_MULTI: u32 = 1 << 11;
    /// May write (scripts, functions): treated as a write by the near cache.
    pub const MAY_REPLICATE: u32 = 1 << 12;

    pub fn from_name(name: &[u8]) -> u32 {
        match name {
            b"readonly" => READONLY,
            b"write" => WRITE,
            b"blocking" => BLOCKING,
            b"movablekeys" => MOVABLEKEYS,
            b"pubsub" => PUBSUB,
            b"noscript" => NOSCRIPT,
            b"admin" => ADMIN,
            b"fast" => FAST,
            b"denyoom" => DENYOOM,
            b"loading" => LOADING,
            b"stale" => STALE,
            b"no_multi" => NO_MULTI,
            b"may_replicate" => MAY_REPLICATE,
            _ => 0,
        }
    }
}

/// Longest command name looked up; longer names cannot be Redis commands.
const MAX_NAME: usize = 64;

/// What the server says about one command or subcommand.
#[derive(Debug, Clone, Default)]
pub struct CommandInfo {
    pub name: String,
    /// Redis arity: positive is exact, negative is a minimum.
    pub arity: i64,
    pub flags: u32,
    /// Legacy key positions (first, last, step); last < 0 counts from the end.
    pub first_key: i64,
    pub last_key: i64,
    pub key_step: i64,
    /// Redis 7 key specifications, in the order reported (empty before 7).
    pub key_specs: Vec<KeySpec>,
    /// Changes the keys it names: a key specification says RW, OW or RM
    /// (EVAL's keys, PFCOUNT's), or, without specifications, the command
    /// is flagged `write` or `may_replicate`.
    pub writes: bool,
    /// The metrics family, from the command's ACL categories.
    pub family: Family,
    /// Subcommands by lowercase name (`CLIENT` -> `id`, `setname`, ...).
    pub subcommands: HashMap<Vec<u8>, CommandInfo, ahash::RandomState>,
}

impl CommandInfo {
    #[inline]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// The subcommand named `sub` (case-insensitive) of a container command
    /// (`CLIENT ID`, `OBJECT ENCODING`); the command itself otherwise.
    pub fn sub(&self, sub: Option<&[u8]>) -> &CommandInfo {
        if self.subcommands.is_empty() {
            return self;
        }
        let mut buf = [0u8; MAX_NAME];
        sub.and_then(|s| lowercase(s, &mut buf))
            .and_then(|s| self.subcommands.get(s))
            .unwrap_or(self)
    }

    /// Does `argc` (including the name) satisfy the arity?
    pub fn arity_ok(&self, argc: usize) -> bool {
        let a = self.arity;
        (a >= 0 && argc as i64 == a) || (a < 0 && argc as i64 >= -a)
    }
}

/// Where a key specification's keys begin (Redis 7 `begin_search`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// At this argument.
    Index(i64),
    /// Right after this keyword (lowercase), searched from `startfrom`
    /// (from the end, backwards, when negative).
    Keyword { keyword: Vec<u8>, startfrom: i64 },
    /// Somewhere only the command knows (SORT's STORE).
    Unknown,
}

/// Which arguments from the beginning are keys (Redis 7 `find_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Find {
    /// Up to `lastkey` after the beginning (counted from the end when
    /// negative; with `limit`, that fraction of what remains) every `step`.
    Range {
        lastkey: i64,
        step: i64,
        limit: i64,
    },
    /// The argument `keynumidx` after the beginning counts the keys, which
    /// start `firstkey` after the beginning, every `step`.
    Keynum {
        keynumidx: i64,
        firstkey: i64,
        step: i64,
    },
    Unknown,
}

/// One of a command's key specifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// Its keys are changed (RW, OW or RM), not only read.
    pub write: bool,
    pub begin: Begin,
    pub find: Find,
}

/// All commands of one upstream.
#[derive(Debug, Clone, Default)]
pub struct CommandTable {
    commands: HashMap<Vec<u8>, CommandInfo, ahash::RandomState>,
}

impl CommandTable {
    /// Build from the raw bytes of a `COMMAND` reply (RESP2).
    pub fn from_reply(reply: &[u8]) -> Result<Self, String> {
        let (frame, _) = redis_protocol::resp2::decode::decode(reply)
            .map_err(|e| format!("COMMAND reply does not decode: {e}"))?
            .ok_or("COMMAND reply is incomplete")?;
        let OwnedFrame::Array(entries) = frame else {
            return Err(match frame {
                OwnedFrame::Error(e) => format!("COMMAND failed: {e}"),
                _ => "COMMAND reply is not an array".into(),
            });
        };
        let mut commands =
            HashMap::with_capacity_and_hasher(entries.len(), ahash::RandomState::new());
        for entry in &entries {
            let info = parse_entry(entry)?;
            commands.insert(info.name.as_bytes().to_vec(), info);
        }
        Ok(CommandTable { commands })
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Case-insensitive lookup without allocating.
    #[inline]
    pub fn get(&self, name: &[u8]) -> Option<&CommandInfo> {
        let mut buf = [0u8; MAX_NAME];
        let lower = lowercase(name, &mut buf)?;
        self.commands.get(lower)
    }

    /// Look up a command, descending into its subcommand when it has them.
    #[inline]
    pub fn get_with_sub(&self, name: &[u8], sub: Option<&[u8]>) -> Option<&CommandInfo> {
        Some(self.get(name)?.sub(sub))
    }
}

/// ASCII-lowercase `name` into `buf`; `None` if it is too long to be a command.
#[inline]
pub fn lowercase<'a>(name: &[u8], buf: &'a mut [u8; MAX_NAME]) -> Option<&'a [u8]> {
    if name.len() > MAX_NAME {
        return None;
    }
    let out = &mut buf[..name.len()];
    for (o, c) in out.iter_mut().zip(name) {
        *o = c.to_ascii_lowercase();
    }
    Some(out)
}

fn text(f: &OwnedFrame) -> Option<&[u8]> {
    match f {
        OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => Some(b),
        _ => None,
    }
}

fn int(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        _ => None,
    }
}

/// The value under `name` in a RESP2-flattened map (`[k1, v1, k2, v2]`).
fn field<'a>(map: &'a OwnedFrame, name: &str) -> Option<&'a OwnedFrame> {
    let OwnedFrame::Array(items) = map else {
        return None;
    };
    items
        .chunks_exact(2)
        .find(|kv| text(&kv[0]).is_some_and(|k| k.eq_ignore_ascii_case(name.as_bytes())))
        .map(|kv| &kv[1])
}

fn int_field(map: &OwnedFrame, name: &str) -> Option<i64> {
    field(map, name).and_then(int)
}

/// One key specification of a `COMMAND` entry; `None` if it is malformed
/// (the command then falls back to its legacy key positions).
fn parse_key_spec(spec: &OwnedFrame) -> Option<KeySpec> {
    let write = match field(spec, "flags")? {
        OwnedFrame::Array(fl) => fl.iter().filter_map(text).any(|f| {
            f.eq_ignore_ascii_case(b"RW")
                || f.eq_ignore_ascii_case(b"OW")
                || f.eq_ignore_ascii_case(b"RM")
        }),
        _ => return None,
    };
    let bs = field(spec, "begin_search")?;
    let bs_spec = field(bs, "spec");
    let begin = match text(field(bs, "type")?)? {
        b"index" => Begin::Index(int_field(bs_spec?, "index")?),
        b"keyword" => Begin::Keyword {
            keyword: text(field(bs_spec?, "keyword")?)?.to_ascii_lowercase(),
            startfrom: int_field(bs_spec?, "startfrom")?,
        },
        _ => Begin::Unknown,
    };
    let fk = field(spec, "find_keys")?;
    let fk_spec = field(fk, "spec");
    let find = match text(field(fk, "type")?)? {
        b"range" => Find::Range {
            lastkey: int_field(fk_spec?, "lastkey")?,
            step: int_field(fk_spec?, "keystep")?,
            limit: int_field(fk_spec?, "limit")?,
        },
        b"keynum" => Find::Keynum {
            keynumidx: int_field(fk_spec?, "keynumidx")?,
            firstkey: int_field(fk_spec?, "firstkey")?,
            step: int_field(fk_spec?, "keystep")?,
        },
        _ => Find::Unknown,
    };
    Some(KeySpec { write, begin, find })
}

fn parse_entry(entry: &OwnedFrame) -> Result<CommandInfo, String> {
    let OwnedFrame::Array(parts) = entry else {
        return Err("COMMAND entry is not an array".into());
    };
    if parts.len() < 6 {
        return Err("COMMAND entry has fewer than 6 fields".into());
    }
    let name = text(&parts[0]).ok_or("COMMAND entry name is not a string")?;
    // Subcommands are reported as `container|sub`; keep the part after `|`.
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let name = name.rsplit('|').next().unwrap_or(&name).to_string();
    let mut info = CommandInfo {
        name,
        arity: int(&parts[1]).ok_or("COMMAND arity is not an integer")?,
        first_key: int(&parts[3]).unwrap_or(0),
        last_key: int(&parts[4]).unwrap_or(0),
        key_step: int(&parts[5]).unwrap_or(0),
        ..Default::default()
    };
    if let OwnedFrame::Array(fl) = &parts[2] {
        for f in fl {
            if let Some(t) = text(f) {
                info.flags |= flags::from_name(t);
            }
        }
    }
    if let Some(OwnedFrame::Array(cats)) = parts.get(6) {
        info.family = Family::from_categories(cats.iter().filter_map(text));
    }
    if let Some(OwnedFrame::Array(specs)) = parts.get(8) {
        match specs.iter().map(parse_key_spec).collect::<Option<Vec<_>>>() {
            Some(specs) => info.key_specs = specs,
            None => tracing::warn!(
                command = %info.name,
                "COMMAND key specifications not understood; using the legacy key positions"
            ),
        }
    }
    info.writes = if info.key_specs.is_empty() {
        info.has(flags::WRITE) || info.has(flags::MAY_REPLICATE)
    } else {
        info.key_specs.iter().any(|s| s.write)
    };
    if let Some(OwnedFrame::Array(subs)) = parts.get(9) {
        for sub in subs {
            let s = parse_entry(sub)?;
            info.subcommands.insert(s.name.as_bytes().to_vec(), s);
        }
        // A container (CLIENT, CONFIG) reports no categories of its own.
        if info.family == Family::Other {
            if let Some(f) = info
                .subcommands
                .values()
                .map(|s| s.family)
                .find(|f| *f != Family::Other)
            {
                info.family = f;
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &[u8] = b"*2\r\n\
*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
*10\r\n$6\r\nclient\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n\
*1\r\n*10\r\n$9\r\nclient|id\r\n:2\r\n*1\r\n+noscript\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n*0\r\n";

    #[test]
    fn builds_from_command_reply() {
        let t = CommandTable::from_reply(REPLY).unwrap();
        assert_eq!(t.len(), 2);
        let get = t.get(b"GeT").unwrap();
        assert!(get.has(flags::READONLY) && !get.has(flags::WRITE));
        assert_eq!((get.first_key, get.last_key, get.key_step), (1, 1, 1));
        assert!(get.arity_ok(2) && !get.arity_ok(3));
        let id = t.get_with_sub(b"CLIENT", Some(b"ID")).unwrap();
        assert_eq!(id.name, "id");
        assert!(id.has(flags::NOSCRIPT));
        assert!(t.get(b"nope").is_none());
        assert!(t.get(&[b'a'; 100]).is_none());
    }

    /// LMPOP's entry as Redis 7.0 sends it (`COMMAND INFO lmpop`).
    const LMPOP: &[u8] = b"*1\r\n*10\r\n$5\r\nlmpop\r\n:-4\r\n*2\r\n+write\r\n+movablekeys\r\n\
:0\r\n:0\r\n:0\r\n*3\r\n+@write\r\n+@list\r\n+@slow\r\n*0\r\n*1\r\n*6\r\n$5\r\nflags\r\n\
*3\r\n+RW\r\n+access\r\n+delete\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n\
$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$6\r\nkeynum\r\n\
$4\r\nspec\r\n*6\r\n$9\r\nkeynumidx\r\n:0\r\n$8\r\nfirstkey\r\n:1\r\n$7\r\nkeystep\r\n:1\r\n*0\r\n";

    #[test]
    fn key_specifications_are_read() {
        let t = CommandTable::from_reply(LMPOP).unwrap();
        let lmpop = t.get(b"lmpop").unwrap();
        assert!(lmpop.writes);
        assert_eq!(
            lmpop.key_specs,
            vec![KeySpec {
                write: true,
                begin: Begin::Index(1),
                find: Find::Keynum {
                    keynumidx: 0,
                    firstkey: 1,
                    step: 1
                },
            }]
        );
        // Without key specifications (Redis 6), `write` decides.
        let t = CommandTable::from_reply(REPLY).unwrap();
        assert!(!t.get(b"get").unwrap().writes && t.get(b"get").unwrap().key_specs.is_empty());
    }

    #[test]
    fn error_reply_is_reported() {
        let err = CommandTable::from_reply(b"-NOPERM no\r\n").unwrap_err();
        assert!(err.contains("NOPERM"));
    }
}

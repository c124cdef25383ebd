//! Key extraction from a request. With Redis 7's key specifications the
//! keys are found as Redis's own `getKeysUsingKeySpecs` finds them (LMPOP's
//! counted keys, GEORADIUS's STORE target, EVAL's declared keys); before 7,
//! from the legacy positions (first, last, step) plus the script family
//! whose keys follow a `numkeys` argument.

use super::table::{Begin, CommandInfo, Find, KeySpec};
use crate::resp::scan::parse_int;

/// Call `f` with each key of the request. `arg(i)` returns argument `i`
/// (0 is the command name); `argc` counts them all.
#[inline]
pub fn for_each_key<'a>(
    info: &CommandInfo,
    argc: usize,
    arg: impl Fn(usize) -> &'a [u8],
    mut f: impl FnMut(&'a [u8]),
) {
    if info.key_specs.is_empty() {
        return legacy_keys(info, argc, &arg, f);
    }
    for spec in &info.key_specs {
        spec_keys(spec, argc, &arg, &mut f);
    }
}

/// Call `f` with each key the request may change (see
/// `CommandInfo::writes`). Where a changing key specification cannot be
/// located (SORT's STORE target), every argument is taken for a key: the
/// near cache drops a few replies too many rather than keep a stale one.
pub fn for_each_written_key<'a>(
    info: &CommandInfo,
    argc: usize,
    arg: impl Fn(usize) -> &'a [u8],
    mut f: impl FnMut(&'a [u8]),
) {
    if !info.writes {
        return;
    }
    if info.key_specs.is_empty() {
        return legacy_keys(info, argc, &arg, f);
    }
    for spec in info.key_specs.iter().filter(|s| s.write) {
        if !spec_keys(spec, argc, &arg, &mut f) {
            (1..argc).for_each(|i| f(arg(i)));
            return;
        }
    }
}

/// The keys of one specification; false if it cannot be located in this
/// request (an unknown search, or a count or range the request lacks).
fn spec_keys<'a>(
    spec: &KeySpec,
    argc: usize,
    arg: &impl Fn(usize) -> &'a [u8],
    f: &mut impl FnMut(&'a [u8]),
) -> bool {
    let argc = argc as i64;
    let mut first = match &spec.begin {
        Begin::Index(i) => *i,
        Begin::Keyword { keyword, startfrom } => {
            let found = if *startfrom > 0 {
                (*startfrom..argc).find(|&i| arg(i as usize).eq_ignore_ascii_case(keyword))
            } else {
                (2..=argc + startfrom)
                    .rev()
                    .find(|&i| arg(i as usize).eq_ignore_ascii_case(keyword))
            };
            match found {
                Some(i) => i + 1,
                // No keyword, no keys (SORT without STORE): located all the same.
                None => return true,
            }
        }
        Begin::Unknown => return false,
    };
    let (last, step) = match &spec.find {
        Find::Range {
            lastkey,
            step,
            limit,
        } => {
            let last = if *lastkey >= 0 {
                first + lastkey
            } else if *limit <= 1 {
                argc + lastkey
            } else {
                first + ((argc - first) / limit + lastkey)
            };
            (last, *step)
        }
        Find::Keynum {
            keynumidx,
            firstkey,
            step,
        } => {
            let at = first + keynumidx;
            if at < 1 || at >= argc {
                return false;
            }
            let Some(n) = parse_int(arg(at as usize)).filter(|n| *n >= 0) else {
                return false;
            };
            first += firstkey;
            (first + n.saturating_sub(1).saturating_mul(*step), *step)
        }
        Find::Unknown => return false,
    };
    if step <= 0 || first < 1 || first >= argc || last >= argc || last < first {
        // Redis answers such a request with an error and touches no key.
        return true;
    }
    let mut i = first;
    while i <= last {
        f(arg(i as usize));
        i += step;
    }
    true
}

/// Keys from the legacy (first, last, step) positions.
fn legacy_keys<'a>(
    info: &CommandInfo,
    argc: usize,
    arg: &impl Fn(usize) -> &'a [u8],
    mut f: impl FnMut(&'a [u8]),
) {
    if matches!(
        info.name.as_str(),
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
    ) {
        // EVAL script numkeys key [key ...] arg [arg ...]
        if argc < 3 {
            return;
        }
        let n = std::str::from_utf8(arg(2))
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        for i in 3..(3 + n).min(argc) {
            f(arg(i));
        }
        return;
    }
    if info.first_key <= 0 || info.key_step <= 0 {
        return;
    }
    let first = info.first_key as usize;
    let last = if info.last_key < 0 {
        argc as i64 + info.last_key
    } else {
        info.last_key
    };
    if last < first as i64 {
        return;
    }
    let last = (last as usize).min(argc.saturating_sub(1));
    let mut i = first;
    while i <= last {
        f(arg(i));
        i += info.key_step as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, first: i64, last: i64, step: i64) -> CommandInfo {
        CommandInfo {
            name: name.into(),
            first_key: first,
            last_key: last,
            key_step: step,
            ..Default::default()
        }
    }

    fn keys(info: &CommandInfo, args: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_key(info, args.len(), |i| args[i], |k| out.push(k.to_vec()));
        out
    }

    #[test]
    fn positions() {
        assert_eq!(
            keys(&info("get", 1, 1, 1), &[b"GET", b"k"]),
            vec![b"k".to_vec()]
        );
        assert_eq!(
            keys(&info("mset", 1, -1, 2), &[b"MSET", b"a", b"1", b"b", b"2"]),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(
            keys(&info("del", 1, -1, 1), &[b"DEL", b"a", b"b", b"c"]).len(),
            3
        );
        assert_eq!(
            keys(&info("blpop", 1, -2, 1), &[b"BLPOP", b"a", b"b", b"0"]),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert!(keys(&info("ping", 0, 0, 0), &[b"PING"]).is_empty());
        assert_eq!(
            keys(
                &info("eval", 0, 0, 0),
                &[b"EVAL", b"s", b"2", b"k1", b"k2", b"x"]
            ),
            vec![b"k1".to_vec(), b"k2".to_vec()]
        );
        // A malformed request (too few args) yields no out-of-range access.
        assert!(keys(&info("get", 1, 1, 1), &[b"GET"]).is_empty());
    }

    fn spec(write: bool, begin: Begin, find: Find) -> KeySpec {
        KeySpec { write, begin, find }
    }

    fn with_specs(specs: Vec<KeySpec>) -> CommandInfo {
        CommandInfo {
            writes: specs.iter().any(|s| s.write),
            key_specs: specs,
            ..Default::default()
        }
    }

    fn written(info: &CommandInfo, args: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_written_key(info, args.len(), |i| args[i], |k| out.push(k.to_vec()));
        out
    }

    fn v(keys: &[&[u8]]) -> Vec<Vec<u8>> {
        keys.iter().map(|k| k.to_vec()).collect()
    }

    const ONE: Find = Find::Range {
        lastkey: 0,
        step: 1,
        limit: 0,
    };

    /// Key specifications as Redis 7.0's COMMAND reports them.
    #[test]
    fn key_specifications() {
        // LMPOP numkeys key [key ...] LEFT|RIGHT
        let lmpop = with_specs(vec![spec(
            true,
            Begin::Index(1),
            Find::Keynum {
                keynumidx: 0,
                firstkey: 1,
                step: 1,
            },
        )]);
        let args: &[&[u8]] = &[b"LMPOP", b"2", b"a", b"b", b"LEFT"];
        assert_eq!(written(&lmpop, args), v(&[b"a", b"b"]));
        assert_eq!(keys(&lmpop, args), v(&[b"a", b"b"]));
        // A count the request does not hold: no key (Redis refuses it).
        assert!(keys(&lmpop, &[b"LMPOP", b"5", b"a", b"LEFT"]).is_empty());
        assert!(keys(&lmpop, &[b"LMPOP", b"x", b"a", b"LEFT"]).is_empty());

        // GEORADIUS key ... [STORE key] [STOREDIST key]
        let georadius = with_specs(vec![
            spec(false, Begin::Index(1), ONE),
            spec(
                true,
                Begin::Keyword {
                    keyword: b"store".to_vec(),
                    startfrom: 6,
                },
                ONE,
            ),
            spec(
                true,
                Begin::Keyword {
                    keyword: b"storedist".to_vec(),
                    startfrom: 6,
                },
                ONE,
            ),
        ]);
        let args: &[&[u8]] = &[
            b"GEORADIUS",
            b"src",
            b"15",
            b"37",
            b"200",
            b"km",
            b"STORE",
            b"dst",
        ];
        assert_eq!(written(&georadius, args), v(&[b"dst"]));
        assert_eq!(keys(&georadius, args), v(&[b"src", b"dst"]));
        assert!(written(&georadius, &args[..6]).is_empty());

        // SORT key ... [STORE key]: the STORE target's place is unknown, so
        // every argument counts as written.
        let sort = with_specs(vec![
            spec(false, Begin::Index(1), ONE),
            spec(true, Begin::Unknown, Find::Unknown),
        ]);
        let args: &[&[u8]] = &[b"SORT", b"src", b"ALPHA", b"STORE", b"dst"];
        assert_eq!(
            written(&sort, args),
            v(&[b"src", b"ALPHA", b"STORE", b"dst"])
        );
        assert_eq!(keys(&sort, args), v(&[b"src"]));

        // MSET key value [key value ...]
        let mset = with_specs(vec![spec(
            true,
            Begin::Index(1),
            Find::Range {
                lastkey: -1,
                step: 2,
                limit: 0,
            },
        )]);
        assert_eq!(
            written(&mset, &[b"MSET", b"a", b"1", b"b", b"2"]),
            v(&[b"a", b"b"])
        );

        // A keyword searched from the end (MIGRATE ... KEYS key [key ...]).
        let migrate = with_specs(vec![spec(
            true,
            Begin::Keyword {
                keyword: b"keys".to_vec(),
                startfrom: -2,
            },
            Find::Range {
                lastkey: -1,
                step: 1,
                limit: 0,
            },
        )]);
        let args: &[&[u8]] = &[
            b"MIGRATE", b"h", b"6379", b"", b"0", b"5000", b"KEYS", b"a", b"b",
        ];
        assert_eq!(written(&migrate, args), v(&[b"a", b"b"]));

        // GET's read-only key is not written.
        let get = with_specs(vec![spec(false, Begin::Index(1), ONE)]);
        assert!(written(&get, &[b"GET", b"k"]).is_empty());
        assert_eq!(keys(&get, &[b"GET", b"k"]), v(&[b"k"]));
    }
}

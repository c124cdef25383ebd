//! Key extraction from a request, using the command table's key positions
//! (first, last, step) as the upstream reports them, plus the script
//! family whose keys follow a `numkeys` argument.

use super::table::CommandInfo;

/// Call `f` with each key of the request. `arg(i)` returns argument `i`
/// (0 is the command name); `argc` counts them all.
#[inline]
pub fn for_each_key<'a>(
    info: &CommandInfo,
    argc: usize,
    arg: impl Fn(usize) -> &'a [u8],
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
}

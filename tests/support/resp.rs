//! Minimal RESP helpers: encode a command or a bulk string, and find where
//! one complete reply frame ends so raw readers can return exactly one
//! reply, no more, no less.
//!
//! Deliberately independent of keyward's own codec: a test oracle that shares
//! the code under test would share its bugs.

/// Encode `args` as a RESP array of bulk strings, the form clients send
/// commands in: `cmd(&[b"GET", b"k"])` is `*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`.
pub fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A RESP bulk string: `bulk(b"v1")` is `$2\r\nv1\r\n`.
pub fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

/// Bytes rendered with Rust-style escapes (`\r`, `\n`, `\x00`…) so protocol
/// mismatches are readable in assertion messages.
pub fn esc(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// `bytes` escaped (see `esc`), with the value of every HELLO `id` field
/// replaced by N (keyward's connection ids are not Redis's).
pub fn ids_masked(bytes: &[u8]) -> String {
    let text = esc(bytes);
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("id\\r\\n:") {
        let at = at + "id\\r\\n:".len();
        out.push_str(&rest[..at]);
        out.push('N');
        rest = &rest[at..];
        rest = &rest[rest.find("\\r\\n").unwrap_or(0)..];
    }
    out.push_str(rest);
    out
}

/// Length of the first complete RESP frame at the start of `buf`.
///
/// `Ok(None)`: the frame is not complete yet (read more). `Err`: the bytes
/// are not valid RESP. Understands RESP2 (`+ - : $ *`, including null bulk
/// and null array) and RESP3 (`_ , # ( ! = % ~ > |`). An attribute (`|`) is
/// not a reply by itself, so its length includes the frame it annotates.
/// Streamed RESP3 aggregates (`$?`, `*?`) are reported as errors: Redis never
/// sends them and keyward must not either.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    scan(buf, 0)
}

/// Split `buf` into complete frames; a trailing incomplete frame is an error,
/// since callers use this on data they believe complete.
pub fn split_frames(buf: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        match scan(buf, pos)? {
            Some(end) => {
                out.push(buf[pos..end].to_vec());
                pos = end;
            }
            None => {
                return Err(format!(
                    "incomplete frame at offset {pos}: {}",
                    esc(&buf[pos..])
                ))
            }
        }
    }
    Ok(out)
}

/// Index of the `\r` of the first `\r\n` at or after `from`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

fn parse_len(header: &[u8], at: usize) -> Result<i64, String> {
    std::str::from_utf8(header)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("bad length {:?} in frame at offset {at}", esc(header)))
}

/// End offset (exclusive) of the frame starting at `pos`.
fn scan(buf: &[u8], pos: usize) -> Result<Option<usize>, String> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(cr) = find_crlf(buf, pos + 1) else {
        return Ok(None);
    };
    let header = &buf[pos + 1..cr];
    let after = cr + 2;
    match kind {
        // Single-line types: the header is the whole frame.
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Some(after)),
        // Length-prefixed blobs: bulk string, blob error, verbatim string.
        b'$' | b'!' | b'=' => {
            let n = parse_len(header, pos)?;
            if n < 0 {
                return Ok(Some(after)); // RESP2 null bulk `$-1`
            }
            let end = after + n as usize + 2;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(format!(
                    "blob at offset {pos} is not terminated by CRLF after {n} bytes"
                ));
            }
            Ok(Some(end))
        }
        // Aggregates of n frames: array, set, push.
        b'*' | b'~' | b'>' => {
            let n = parse_len(header, pos)?;
            if n < 0 {
                return Ok(Some(after)); // RESP2 null array `*-1`
            }
            scan_n(buf, after, n as usize)
        }
        // Aggregates of n key/value pairs: map.
        b'%' => {
            let n = parse_len(header, pos)?;
            scan_n(buf, after, 2 * n.max(0) as usize)
        }
        // Attribute: n pairs, then the frame it decorates.
        b'|' => {
            let n = parse_len(header, pos)?;
            match scan_n(buf, after, 2 * n.max(0) as usize)? {
                Some(end) => scan(buf, end),
                None => Ok(None),
            }
        }
        other => Err(format!(
            "unknown RESP type byte {:?} at offset {pos}: {}",
            other as char,
            esc(&buf[pos..buf.len().min(pos + 64)])
        )),
    }
}

fn scan_n(buf: &[u8], mut pos: usize, n: usize) -> Result<Option<usize>, String> {
    for _ in 0..n {
        match scan(buf, pos)? {
            Some(end) => pos = end,
            None => return Ok(None),
        }
    }
    Ok(Some(pos))
}

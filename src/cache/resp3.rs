//! RESP3 to RESP2 conversion of cached replies.
//!
//! Fills arrive over one RESP3 connection; RESP2 clients get the reply as
//! Redis would have sent it in RESP2: maps and sets become flat arrays,
//! null becomes `$-1`, doubles and big numbers become bulk strings, booleans
//! integers. An array nested in an array is not converted (Redis shapes
//! those differently per protocol, e.g. ZRANGE WITHSCORES), so such a reply
//! is simply not served from the cache to RESP2 clients.

use bytes::{BufMut, Bytes, BytesMut};

use crate::resp::scan::{line_end, parse_int};

/// The RESP2 form of a complete RESP3 reply, if it has a faithful one.
pub fn to_resp2(frame: &[u8]) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(frame.len());
    let end = convert(frame, 0, 0, &mut out)?;
    (end == frame.len()).then(|| out.freeze())
}

fn convert(f: &[u8], pos: usize, depth: usize, out: &mut BytesMut) -> Option<usize> {
    let kind = *f.get(pos)?;
    let nl = line_end(f, pos + 1)?;
    let line = &f[pos + 1..nl - 1];
    let next = nl + 1;
    match kind {
        b'+' | b'-' | b':' => {
            out.put_slice(&f[pos..next]);
            Some(next)
        }
        b'$' => {
            let n = parse_int(line)?;
            if n < 0 {
                out.put_slice(b"$-1\r\n");
                return Some(next);
            }
            let end = next + n as usize + 2;
            out.put_slice(f.get(pos..end)?);
            Some(end)
        }
        b'_' => {
            out.put_slice(b"$-1\r\n");
            Some(next)
        }
        b',' | b'(' => {
            bulk(out, line);
            Some(next)
        }
        b'#' => {
            out.put_slice(if line == b"t" { b":1\r\n" } else { b":0\r\n" });
            Some(next)
        }
        b'*' | b'~' | b'%' => {
            let n = parse_int(line)?;
            if n < 0 {
                out.put_slice(b"*-1\r\n");
                return Some(next);
            }
            if depth > 0 {
                return None;
            }
            let items = if kind == b'%' {
                n as usize * 2
            } else {
                n as usize
            };
            out.put_u8(b'*');
            out.put_slice(itoa::Buffer::new().format(items).as_bytes());
            out.put_slice(b"\r\n");
            let mut p = next;
            for _ in 0..items {
                p = convert(f, p, depth + 1, out)?;
            }
            Some(p)
        }
        _ => None,
    }
}

fn bulk(out: &mut BytesMut, v: &[u8]) {
    out.put_u8(b'$');
    out.put_slice(itoa::Buffer::new().format(v.len()).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(v);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"$3\r\nabc\r\n", Some(b"$3\r\nabc\r\n")),
            (b"_\r\n", Some(b"$-1\r\n")),
            (b":5\r\n", Some(b":5\r\n")),
            (b",1.5\r\n", Some(b"$3\r\n1.5\r\n")),
            (
                b"%1\r\n$1\r\na\r\n$1\r\nb\r\n",
                Some(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
            ),
            (
                b"~2\r\n$1\r\na\r\n$1\r\nb\r\n",
                Some(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
            ),
            (b"*2\r\n,1\r\n_\r\n", Some(b"*2\r\n$1\r\n1\r\n$-1\r\n")),
            (b"*1\r\n*2\r\n$1\r\nm\r\n,1\r\n", None),
            (b"+OK\r\n", Some(b"+OK\r\n")),
        ];
        for (r3, r2) in cases {
            assert_eq!(to_resp2(r3).as_deref(), *r2, "{}", r3.escape_ascii());
        }
    }
}

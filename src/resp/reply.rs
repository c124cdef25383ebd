//! Reply builders for the few replies keyward writes itself (HELLO, AUTH,
//! QUIT, RESET, errors). Everything else is forwarded from Redis untouched.

use bytes::{BufMut, BytesMut};

/// RESP protocol version spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    #[default]
    Resp2,
    Resp3,
}

impl Proto {
    pub fn number(self) -> i64 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
}

pub fn simple(out: &mut BytesMut, s: &str) {
    out.put_u8(b'+');
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

/// An error reply. `text` starts with its code (`ERR`, `WRONGPASS`, ...).
pub fn error(out: &mut BytesMut, text: impl AsRef<[u8]>) {
    out.put_u8(b'-');
    // A reply line must not contain CR or LF; Redis replaces them too.
    for &b in text.as_ref() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

pub fn int(out: &mut BytesMut, v: i64) {
    out.put_u8(b':');
    out.put_slice(itoa::Buffer::new().format(v).as_bytes());
    out.put_slice(b"\r\n");
}

pub fn bulk(out: &mut BytesMut, v: &[u8]) {
    header(out, b'$', v.len());
    out.put_slice(v);
    out.put_slice(b"\r\n");
}

pub fn array(out: &mut BytesMut, n: usize) {
    header(out, b'*', n);
}

/// A map header: `%n` in RESP3, an array of 2n in RESP2 (as Redis does).
pub fn map(out: &mut BytesMut, proto: Proto, pairs: usize) {
    match proto {
        Proto::Resp3 => header(out, b'%', pairs),
        Proto::Resp2 => header(out, b'*', pairs * 2),
    }
}

pub fn header(out: &mut BytesMut, kind: u8, n: usize) {
    out.put_u8(kind);
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
    out.put_slice(b"\r\n");
}

/// Encode a command as a multibulk array, for requests keyward sends itself.
pub fn command(out: &mut BytesMut, args: &[&[u8]]) {
    array(out, args.len());
    for a in args {
        bulk(out, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut out = BytesMut::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR bad\r\nthing");
        int(&mut out, -3);
        bulk(&mut out, b"");
        map(&mut out, Proto::Resp2, 2);
        map(&mut out, Proto::Resp3, 2);
        command(&mut out, &[b"GET", b"k"]);
        assert_eq!(
            &out[..],
            b"+OK\r\n-ERR bad  thing\r\n:-3\r\n$0\r\n\r\n*4\r\n%2\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
    }
}

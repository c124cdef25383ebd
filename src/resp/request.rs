//! Request framing: finds one client command in the read buffer, with the
//! offsets of its arguments, without copying it.
//!
//! Clients send either a multibulk array of bulk strings (every client
//! library) or an inline line (redis-cli in some modes, telnet). Multibulk
//! requests are forwarded as the exact bytes the client sent; inline requests
//! are the one case re-encoded, because Redis may not accept the inline form on
//! a pipelined connection shared with other clients. The parser is resumable
//! per argument, so a request with a million arguments or a 512 MiB value is
//! scanned once, however many reads it arrives in. Error texts are Redis's.

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

use super::scan::{line_end, parse_int, ProtocolError};
use crate::metrics::Limit;

/// Longest inline request or length line, as Redis's PROTO_INLINE_MAX_SIZE.
pub const INLINE_MAX: usize = 64 * 1024;

/// Byte range of one argument inside the request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    pub start: u32,
    pub end: u32,
}

pub type Args = SmallVec<[Arg; 6]>;

/// Size limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single argument (Redis's proto-max-bulk-len).
    pub max_bulk: usize,
    /// Largest whole request (Redis's client-query-buffer-limit).
    pub max_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 512 * 1024 * 1024,
            max_request: 1024 * 1024 * 1024,
        }
    }
}

/// One complete command.
#[derive(Debug)]
pub struct Request {
    /// Bytes of the read buffer this request used.
    pub consumed: usize,
    /// For inline requests, the multibulk encoding to send instead of the
    /// client's bytes; `args` then index into it.
    pub inline: Option<Bytes>,
    pub args: Args,
}

impl Request {
    /// Argument `i`, given the frame bytes (`buf[..consumed]` or `inline`).
    #[inline]
    pub fn arg<'a>(&self, frame: &'a [u8], i: usize) -> &'a [u8] {
        let a = self.args[i];
        &frame[a.start as usize..a.end as usize]
    }
}

/// What the parser found at the front of the buffer.
#[derive(Debug)]
pub enum Parsed {
    Request(Request),
    /// An empty command (`*0`, `*-1`, a blank inline line) to drop.
    Skip(usize),
}

/// Resumable request parser for one client connection.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// Offset of the next header to read (0 when no request is in progress).
    pos: usize,
    /// Arguments still expected; `None` before the `*N` line is read.
    remaining: Option<u64>,
    args: Args,
    /// Buffer length needed before parsing can progress.
    need: usize,
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffer length the pending request needs; readers reserve this much so
    /// a large value lands in one allocation.
    pub fn need(&self) -> usize {
        self.need
    }

    /// Parse the request at the front of `buf`, if it is complete.
    pub fn parse(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<Parsed>, ProtocolError> {
        if buf.is_empty() || buf.len() < self.need {
            return Ok(None);
        }
        if self.pos == 0 && buf[0] != b'*' {
            return parse_inline(buf, limits);
        }
        let r = self.parse_multibulk(buf, limits);
        if !matches!(r, Ok(None)) {
            self.pos = 0;
            self.remaining = None;
            self.need = 0;
        }
        r
    }

    fn parse_multibulk(
        &mut self,
        buf: &[u8],
        limits: &Limits,
    ) -> Result<Option<Parsed>, ProtocolError> {
        if self.remaining.is_none() {
            let cr = match header_line(buf, 0) {
                Line::At(cr) => cr,
                Line::TooLong => return Err(ProtocolError::new("too big mbulk count string")),
                Line::Need(n) => {
                    self.need = n;
                    return Ok(None);
                }
            };
            let n = parse_int(&buf[1..cr])
                .filter(|n| *n <= i32::MAX as i64)
                .ok_or_else(|| ProtocolError::new("invalid multibulk length"))?;
            if n <= 0 {
                return Ok(Some(Parsed::Skip(cr + 2)));
            }
            self.remaining = Some(n as u64);
            self.args = SmallVec::with_capacity((n as usize).min(1024));
            self.pos = cr + 2;
        }
        while let Some(left) = self.remaining.filter(|n| *n > 0) {
            let pos = self.pos;
            let cr = match header_line(buf, pos) {
                Line::At(cr) => cr,
                Line::TooLong => return Err(ProtocolError::new("too big bulk count string")),
                Line::Need(n) => {
                    self.need = n;
                    return Ok(None);
                }
            };
            if buf[pos] != b'$' {
                // As Redis: the byte itself, CR and LF turned into spaces
                // (an error is one line); beyond ASCII, escaped.
                let got = match buf[pos] {
                    b'\r' | b'\n' => " ".to_string(),
                    b if b.is_ascii() => char::from(b).to_string(),
                    b => char::from(b).escape_default().to_string(),
                };
                return Err(ProtocolError::new(format!("expected '$', got '{got}'")));
            }
            // Redis words a length over proto-max-bulk-len like a malformed
            // one; only the metric tells them apart.
            let len = match parse_int(&buf[pos + 1..cr]) {
                Some(l) if l >= 0 && l as usize <= limits.max_bulk => l as usize,
                Some(l) if l >= 0 => {
                    return Err(ProtocolError::over(
                        Limit::MaxBulkBytes,
                        "invalid bulk length",
                    ))
                }
                _ => return Err(ProtocolError::new("invalid bulk length")),
            };
            let start = cr + 2;
            let end = start + len;
            if end + 2 > limits.max_request {
                return Err(too_large(limits));
            }
            if buf.len() < end + 2 {
                self.need = end + 2;
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::new("expected CRLF after bulk"));
            }
            self.args.push(Arg {
                start: start as u32,
                end: end as u32,
            });
            self.pos = end + 2;
            self.remaining = Some(left - 1);
        }
        Ok(Some(Parsed::Request(Request {
            consumed: self.pos,
            inline: None,
            args: std::mem::take(&mut self.args),
        })))
    }
}

/// Where a `*` or `$` header line that starts at `from` ends.
enum Line {
    /// Its `\r` is at this offset, and the byte after it has arrived.
    At(usize),
    /// Not complete: wait until the buffer holds this many bytes.
    Need(usize),
    /// No end within Redis's PROTO_INLINE_MAX_SIZE.
    TooLong,
}

/// Find a header line's end exactly as Redis does, since the bytes are
/// forwarded and Redis must frame them the same way: the first `\r` (found
/// with strchr, so a NUL before it hides it), with one more byte after it
/// that Redis skips without looking (a `\n` in a well-formed request).
/// A lone `\n` does not end a line.
fn header_line(buf: &[u8], from: usize) -> Line {
    match memchr::memchr2(b'\r', 0, &buf[from..]) {
        Some(i) if buf[from + i] == b'\r' => {
            let cr = from + i;
            if cr + 2 > buf.len() {
                Line::Need(cr + 2)
            } else {
                Line::At(cr)
            }
        }
        _ if buf.len() - from > INLINE_MAX => Line::TooLong,
        _ => Line::Need(buf.len() + 1),
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// An inline command: one line, split like Redis's `sdssplitargs`.
fn parse_inline(buf: &[u8], limits: &Limits) -> Result<Option<Parsed>, ProtocolError> {
    // Redis finds the end of an inline line with strchr, which stops at a
    // NUL byte: a line with a NUL before its newline never ends, and only the
    // 64 KiB limit answers it. Do exactly the same.
    let nl = line_end(buf, 0).filter(|&nl| !buf[..nl].contains(&0));
    // Redis applies the limit while no newline has arrived, reading 16 KiB
    // (PROTO_IOBUF_LEN) at a time, so a line that arrives whole is taken up
    // to about 80 KiB: the same here, whatever size the reads happen to be.
    let Some(nl) = nl.filter(|&nl| nl <= INLINE_MAX + 16 * 1024) else {
        if buf.len() > INLINE_MAX {
            return Err(ProtocolError::new("too big inline request"));
        }
        return Ok(None);
    };
    // keyward's own bounds hold for inline requests too (they are set
    // below Redis's when an operator lowers them).
    if nl + 1 > limits.max_request {
        return Err(too_large(limits));
    }
    let words = split_args(trim_cr(&buf[..nl]))
        .ok_or_else(|| ProtocolError::new("unbalanced quotes in request"))?;
    if words.is_empty() {
        return Ok(Some(Parsed::Skip(nl + 1)));
    }
    if words.iter().any(|w| w.len() > limits.max_bulk) {
        return Err(ProtocolError::over(
            Limit::MaxBulkBytes,
            "invalid bulk length",
        ));
    }
    let mut out = BytesMut::with_capacity(nl + 16 * words.len());
    let mut args = Args::new();
    put_header(&mut out, b'*', words.len());
    for w in &words {
        put_header(&mut out, b'$', w.len());
        let start = out.len() as u32;
        out.put_slice(w);
        args.push(Arg {
            start,
            end: out.len() as u32,
        });
        out.put_slice(b"\r\n");
    }
    Ok(Some(Parsed::Request(Request {
        consumed: nl + 1,
        inline: Some(out.freeze()),
        args,
    })))
}

/// A request over `server.max_request_bytes`.
fn too_large(limits: &Limits) -> ProtocolError {
    ProtocolError::over(
        Limit::MaxRequestBytes,
        format!(
            "request larger than the limit of {} bytes (max_request_bytes)",
            limits.max_request
        ),
    )
}

fn put_header(out: &mut BytesMut, kind: u8, n: usize) {
    out.put_u8(kind);
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
    out.put_slice(b"\r\n");
}

/// Split an inline line into words with Redis's quoting rules: `"..."` with
/// backslash escapes (`\n \r \t \b \a \\ \" \xHH`), `'...'` with `\'`, and a
/// closing quote that must be followed by a space. `None` means unbalanced.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut words = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Some(words);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && is_hex(line[i + 2])
                    && is_hex(line[i + 3])
                {
                    cur.push(hex(line[i + 2]) * 16 + hex(line[i + 3]));
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    in_dq = false;
                } else {
                    cur.push(c);
                }
            } else if in_sq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    in_sq = false;
                } else {
                    cur.push(c);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    b' ' | b'\n' | b'\r' | b'\t' => break,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        words.push(cur);
    }
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_hexdigit()
}

fn hex(c: u8) -> u8 {
    (c as char).to_digit(16).unwrap_or(0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut p = RequestParser::new();
        let mut off = 0;
        let mut out = Vec::new();
        let limits = Limits::default();
        while let Some(parsed) = p.parse(&input[off..], &limits)? {
            match parsed {
                Parsed::Skip(n) => off += n,
                Parsed::Request(r) => {
                    let frame = r
                        .inline
                        .clone()
                        .unwrap_or_else(|| Bytes::copy_from_slice(&input[off..off + r.consumed]));
                    out.push(
                        (0..r.args.len())
                            .map(|i| r.arg(&frame, i).to_vec())
                            .collect(),
                    );
                    off += r.consumed;
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline() {
        let got =
            parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nSET a \"b c\\x41\"\r\n*0\r\n\r\nPING\n")
                .unwrap();
        assert_eq!(
            got,
            vec![
                vec![b"GET".to_vec(), b"k".to_vec()],
                vec![b"SET".to_vec(), b"a".to_vec(), b"b cA".to_vec()],
                vec![b"PING".to_vec()],
            ]
        );
    }

    #[test]
    fn incomplete_is_none_at_every_cut() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n";
        for cut in 0..input.len() {
            let mut p = RequestParser::new();
            assert!(
                p.parse(&input[..cut], &Limits::default())
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
        // Resuming after partial parses gives the same request.
        let mut p = RequestParser::new();
        for cut in 1..input.len() {
            assert!(p
                .parse(&input[..cut], &Limits::default())
                .unwrap()
                .is_none());
        }
        match p.parse(input, &Limits::default()).unwrap() {
            Some(Parsed::Request(r)) => {
                assert_eq!(r.consumed, input.len());
                assert_eq!(r.arg(input, 2), b"value");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redis_error_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "Protocol error: invalid multibulk length"),
            (b"*1\r\nx\r\n", "Protocol error: expected '$', got 'x'"),
            (b"*1\r\n\r\n", "Protocol error: expected '$', got ' '"),
            (b"*1\r\n$-5\r\n", "Protocol error: invalid bulk length"),
            (
                b"*1\r\n$999999999999\r\n",
                "Protocol error: invalid bulk length",
            ),
            (
                b"*1\r\n$4\r\nPINGxx",
                "Protocol error: expected CRLF after bulk",
            ),
            (
                b"GET \"a\r\n",
                "Protocol error: unbalanced quotes in request",
            ),
            (
                b"\"abc\"x\r\n",
                "Protocol error: unbalanced quotes in request",
            ),
        ];
        for (input, text) in cases {
            let err = parse_all(input).unwrap_err();
            assert_eq!(err.to_string(), *text, "{}", input.escape_ascii());
        }
        // A NUL hides the newline, as in Redis; only the size limit ends it.
        let mut p = RequestParser::new();
        assert!(p
            .parse(b"PI\0NG\r\n", &Limits::default())
            .unwrap()
            .is_none());
        let mut nul = b"PI\0NG\r\n".to_vec();
        nul.resize(INLINE_MAX + 10, b'x');
        assert_eq!(
            parse_all(&nul).unwrap_err().to_string(),
            "Protocol error: too big inline request"
        );
        let long = vec![b'a'; INLINE_MAX + 1];
        assert_eq!(
            parse_all(&long).unwrap_err().to_string(),
            "Protocol error: too big inline request"
        );
    }

    #[test]
    fn request_size_limit() {
        let limits = Limits {
            max_bulk: 100,
            max_request: 50,
        };
        let mut p = RequestParser::new();
        let err = p.parse(b"*2\r\n$3\r\nSET\r\n$40\r\n", &limits).unwrap_err();
        assert!(err.to_string().contains("max_request_bytes"));
        // Inline requests too: the whole line, then each word.
        let long = format!("SET k {}\r\n", "v".repeat(60));
        let err = p.parse(long.as_bytes(), &limits).unwrap_err();
        assert!(err.to_string().contains("max_request_bytes"), "{err}");
        let limits = Limits {
            max_bulk: 10,
            max_request: 1000,
        };
        let err = p.parse(long.as_bytes(), &limits).unwrap_err();
        assert_eq!(err.to_string(), "Protocol error: invalid bulk length");
        assert!(p.parse(b"SET k 0123456789\r\n", &limits).unwrap().is_some());
    }
}

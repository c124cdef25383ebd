//! Reply frame scanning: finds where one RESP2/RESP3 frame ends without
//! decoding it.
//!
//! The proxy forwards reply bytes untouched (DESIGN.md 2.1), so all it needs
//! from a reply is its length. The scanner is resumable: it remembers the
//! element it stopped at and the aggregate counts above it, so a 64 MiB bulk
//! string that arrives over many reads is measured once from its header, never
//! rescanned from the start of the frame. Bulk payloads are skipped by length,
//! so the cost of a frame is the number of its headers, not of its bytes.

use smallvec::SmallVec;

/// The deepest aggregate nesting accepted in a reply. Commands nest a
/// handful of levels, but a Lua script can return tables nested until Lua's
/// stack runs out (about 8,000 levels in Redis 7, then "reached lua stack
/// limit"), and such a reply must pass like any other: refusing it would
/// fail the shared connection under every client. Anything deeper is a
/// broken peer; the bound keeps the scanner's stack under 80 KB.
pub const MAX_DEPTH: usize = 10_000;

/// A malformed frame. The text follows Redis's `Protocol error: ...` wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {text}")]
pub struct ProtocolError {
    text: String,
    /// The configured bound the frame went over, when that is the problem.
    limit: Option<crate::metrics::Limit>,
}

impl ProtocolError {
    pub fn new(text: impl Into<String>) -> Self {
        ProtocolError {
            text: text.into(),
            limit: None,
        }
    }

    /// A frame refused for going over the bound `limit`.
    pub fn over(limit: crate::metrics::Limit, text: impl Into<String>) -> Self {
        ProtocolError {
            text: text.into(),
            limit: Some(limit),
        }
    }

    /// The bound the frame went over, if that is why it was refused.
    pub fn limit(&self) -> Option<crate::metrics::Limit> {
        self.limit
    }
}

/// Resumable scanner over a growing buffer holding a stream of frames.
///
/// `next` returns the end offset of the next complete frame, measured from
/// the start of the buffer. After the caller removes bytes from the front of
/// the buffer it calls `consumed` so the scanner's offsets follow.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Offset of the next element header to read.
    pos: usize,
    /// Offset where the frame being scanned began.
    start: usize,
    /// Elements still expected by each open aggregate, innermost last.
    stack: SmallVec<[u64; 8]>,
    /// Buffer length required before scanning can make progress.
    need: usize,
}

impl Scanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Offset where the frame after the last complete one begins.
    pub fn frame_start(&self) -> usize {
        self.start
    }

    /// Minimum buffer length the current frame needs before it can advance;
    /// readers use it to grow the buffer once instead of by doubling.
    pub fn need(&self) -> usize {
        self.need
    }

    /// True when no part of a frame has been seen past `frame_start`.
    pub fn idle(&self) -> bool {
        self.pos == self.start && self.stack.is_empty()
    }

    /// The caller removed `n` bytes from the front of its buffer.
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.start);
        self.pos -= n;
        self.start -= n;
        self.need = self.need.saturating_sub(n);
    }

    /// Forget any partial frame (the buffer was cleared).
    pub fn reset(&mut self) {
        *self = Scanner::default();
    }

    /// One element ended at `self.pos`: close every aggregate it completed
    /// and return the frame's end if the outermost one closed.
    fn close_element(&mut self) -> Option<usize> {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.start = self.pos;
                    self.need = 0;
                    return Some(self.pos);
                }
                Some(left) => {
                    *left -= 1;
                    if *left != 0 {
                        return None;
                    }
                    self.stack.pop();
                }
            }
        }
    }

    /// Scan for the end of the next frame.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        if buf.len() < self.need {
            return Ok(None);
        }
        loop {
            match element(buf, self.pos)? {
                Element::Incomplete(need) => {
                    self.need = need;
                    return Ok(None);
                }
                Element::Scalar(end) => {
                    self.pos = end;
                    if let Some(end) = self.close_element() {
                        return Ok(Some(end));
                    }
                }
                Element::Aggregate(end, 0) => {
                    // An empty aggregate is complete as it stands.
                    self.pos = end;
                    if let Some(end) = self.close_element() {
                        return Ok(Some(end));
                    }
                }
                Element::Aggregate(end, count) => {
                    self.pos = end;
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(ProtocolError::new("reply nested too deeply"));
                    }
                    self.stack.push(count);
                }
            }
        }
    }
}

/// Convenience for a buffer holding (at least the start of) one frame.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    Scanner::new().next(buf)
}

/// The elements of a complete aggregate frame, as raw sub-frames, without
/// allocating (for the few frames keyward looks into: pushes, EXEC replies).
/// Anything else (a bulk string holding RESP-looking bytes, say) has none.
pub fn elements(frame: &[u8]) -> Elements<'_> {
    let aggregate = matches!(frame.first(), Some(b'*' | b'~' | b'>' | b'%' | b'|'));
    let header = line_end(frame, 1)
        .filter(|&nl| aggregate && nl >= 2)
        .and_then(|nl| Some((nl, parse_int(&frame[1..nl - 1])?)));
    match header {
        Some((nl, n)) => Elements {
            frame,
            pos: nl + 1,
            left: n.max(0) as u64,
        },
        None => Elements {
            frame,
            pos: 0,
            left: 0,
        },
    }
}

pub struct Elements<'a> {
    frame: &'a [u8],
    pos: usize,
    left: u64,
}

impl<'a> Iterator for Elements<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let len = frame_len(self.frame.get(self.pos..)?).ok()??;
        let e = &self.frame[self.pos..self.pos + len];
        self.pos += len;
        self.left -= 1;
        Some(e)
    }
}

/// The contents of a bulk or simple string frame.
pub fn string_of(frame: &[u8]) -> Option<&[u8]> {
    let nl = line_end(frame, 1)?;
    match frame.first()? {
        b'$' => {
            let n = parse_int(&frame[1..nl - 1])?;
            frame.get(nl + 1..nl + 1 + n.max(0) as usize)
        }
        b'+' => Some(&frame[1..nl - 1]),
        _ => None,
    }
}

enum Element {
    /// Not enough bytes; the buffer must reach this length first.
    Incomplete(usize),
    /// A leaf element ending at the offset.
    Scalar(usize),
    /// An aggregate header ending at the offset, followed by `count` elements.
    Aggregate(usize, u64),
}

/// Find the end of the `\r\n`-terminated line starting at `from`.
#[inline]
pub(crate) fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr(b'\n', buf.get(from..)?).map(|i| from + i)
}

/// Parse a decimal integer exactly as Redis's `string2ll` does (lengths,
/// SELECT's database, HELLO's version): "0", or an optional `-` and a
/// digit 1-9 followed by digits, within i64. No `+`, no leading zeros, no
/// "-0", no spaces. Anything Redis would reject must be rejected here too:
/// a request length keyward read one way and Redis another would desync
/// the shared connection for every client on it.
#[inline]
pub(crate) fn parse_int(s: &[u8]) -> Option<i64> {
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) || digits.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        0i64.checked_sub_unsigned(v)
    } else {
        i64::try_from(v).ok()
    }
}

#[inline]
fn element(buf: &[u8], pos: usize) -> Result<Element, ProtocolError> {
    if pos >= buf.len() {
        return Ok(Element::Incomplete(pos + 1));
    }
    let Some(nl) = line_end(buf, pos + 1) else {
        return Ok(Element::Incomplete(buf.len() + 1));
    };
    // The type byte itself is the CR of a bare CRLF.
    if nl < pos + 2 {
        return Err(ProtocolError::new("expected a type byte"));
    }
    if buf[nl - 1] != b'\r' {
        return Err(ProtocolError::new("expected CRLF at end of line"));
    }
    let line = &buf[pos + 1..nl - 1];
    let end = nl + 1;
    match buf[pos] {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Element::Scalar(end)),
        b'$' | b'!' | b'=' => {
            let len = parse_int(line).ok_or_else(|| ProtocolError::new("invalid bulk length"))?;
            if len < 0 {
                // `$-1` is RESP2's null bulk string.
                return Ok(Element::Scalar(end));
            }
            let total = end + len as usize + 2;
            if buf.len() < total {
                return Ok(Element::Incomplete(total));
            }
            if &buf[total - 2..total] != b"\r\n" {
                return Err(ProtocolError::new("expected CRLF after bulk"));
            }
            Ok(Element::Scalar(total))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n =
                parse_int(line).ok_or_else(|| ProtocolError::new("invalid multibulk length"))?;
            if n < 0 {
                // `*-1` is RESP2's null array.
                return Ok(Element::Scalar(end));
            }
            let n = n as u64;
            let count = match buf[pos] {
                b'%' => n.saturating_mul(2),
                // An attribute map is followed by the value it annotates.
                b'|' => n.saturating_mul(2).saturating_add(1),
                _ => n,
            };
            Ok(Element::Aggregate(end, count))
        }
        other => Err(ProtocolError::new(format!(
            "unexpected reply type byte '{}'",
            other.escape_ascii()
        ))),
    }
}

#[cfg(test)]
mod tests {
    /// Upstream bytes are not trusted: no input makes the scanner or the
    /// element walk panic (a reply starting with CRLF, `$7\r\n\r\nhello`,
    /// once killed a dedicated connection's relay). Every string of up to 6
    /// bytes over the protocol's own characters, alone and as a value.
    #[test]
    fn no_input_panics() {
        use super::{elements, frame_len};
        let alphabet = b"*$>+\r\n1-0:";
        let mut input = Vec::new();
        for len in 0..=6u32 {
            for mut n in 0..(alphabet.len() as u64).pow(len) {
                input.clear();
                for _ in 0..len {
                    input.push(alphabet[(n % alphabet.len() as u64) as usize]);
                    n /= alphabet.len() as u64;
                }
                let _ = frame_len(&input);
                let _ = elements(&input).count();
                let bulk = [format!("${}\r\n", input.len()).as_bytes(), &input, b"\r\n"].concat();
                assert_eq!(elements(&bulk).count(), 0);
                let arr = [b"*1\r\n", &bulk[..]].concat();
                assert_eq!(elements(&arr).count(), 1);
                let _ = elements(&[b"*2\r\n", &input[..]].concat()).count();
            }
        }
    }

    #[test]
    fn parse_int_is_string2ll() {
        use super::parse_int;
        for (s, want) in [
            ("0", Some(0)),
            ("1", Some(1)),
            ("-1", Some(-1)),
            ("4096", Some(4096)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("00", None),
            ("01", None),
            ("-0", None),
            ("-00", None),
            ("-01", None),
            ("+3", None),
            ("", None),
            ("-", None),
            (" 1", None),
            ("1 ", None),
            ("1\n", None),
            ("12a", None),
        ] {
            assert_eq!(parse_int(s.as_bytes()), want, "{s:?}");
        }
    }

    use super::*;

    #[test]
    fn table_of_complete_frames() {
        let cases: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":12\r\n",
            b"$3\r\nfoo\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n",
            b"*2\r\n*0\r\n*1\r\n+x\r\n",
            b"%1\r\n+a\r\n:1\r\n",
            b"~2\r\n+a\r\n+b\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            b"_\r\n",
            b",1.5\r\n",
            b"#t\r\n",
            b"(123\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"|1\r\n+k\r\n+v\r\n:5\r\n",
            b"*3\r\n%0\r\n~0\r\n*1\r\n*1\r\n$0\r\n\r\n",
        ];
        for frame in cases {
            assert_eq!(
                frame_len(frame),
                Ok(Some(frame.len())),
                "{}",
                frame.escape_ascii()
            );
            // Every strict prefix is incomplete, never an error.
            for cut in 0..frame.len() {
                assert_eq!(
                    frame_len(&frame[..cut]),
                    Ok(None),
                    "prefix {cut} of {}",
                    frame.escape_ascii()
                );
            }
        }
    }

    #[test]
    fn resumes_without_rescanning_big_bulk() {
        let mut s = Scanner::new();
        let mut buf = b"*2\r\n$10\r\n01234".to_vec();
        assert_eq!(s.next(&buf), Ok(None));
        assert_eq!(s.need(), 4 + 5 + 12);
        buf.extend_from_slice(b"56789\r\n:7\r\n+next\r\n");
        assert_eq!(s.next(&buf), Ok(Some(4 + 5 + 12 + 4)));
        assert_eq!(s.next(&buf), Ok(Some(buf.len())));
        assert!(s.idle());
    }

    #[test]
    fn consumed_rebases_offsets() {
        let mut s = Scanner::new();
        let mut buf = b"+a\r\n*2\r\n+b\r\n".to_vec();
        assert_eq!(s.next(&buf), Ok(Some(4)));
        assert_eq!(s.next(&buf), Ok(None));
        buf.drain(..4);
        s.consumed(4);
        buf.extend_from_slice(b"+c\r\n");
        assert_eq!(s.next(&buf), Ok(Some(buf.len())));
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(frame_len(b"?x\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());
        assert!(frame_len(b"$1\r\nab\r\n").is_err());
        assert!(frame_len(b"+OK\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(frame_len(deep.as_bytes()).is_err());
    }
}

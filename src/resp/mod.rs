//! The RESP wire format: request framing, reply boundary scanning and the
//! reply builders for the replies keyward writes itself.

pub mod reply;
pub mod request;
pub mod scan;

pub use reply::Proto;
pub use request::{Limits, Parsed, Request, RequestParser};
pub use scan::{ProtocolError, Scanner};

use bytes::BytesMut;

/// A declared length is believed up to this much at once; beyond it the
/// buffer grows by doubling as the bytes actually arrive.
pub const TRUSTED_LENGTH: usize = 16 << 20;

/// A read buffer whose capacity is above this is replaced once empty.
pub const LARGE_BUFFER: usize = 1 << 20;

/// Make room in a read buffer for a frame that needs `need` bytes in all
/// (`Scanner::need`, `RequestParser::need`), and at least `min` free. A
/// large value lands in a few allocations, while a length a peer merely
/// declares (`$1000000000000`) allocates nothing it has not sent.
pub fn make_room(buf: &mut BytesMut, need: usize, min: usize) {
    let missing = need.saturating_sub(buf.len());
    let want = missing.min(buf.len().max(TRUSTED_LENGTH)).max(min);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}

/// Give back a read buffer's memory once a large frame has left it empty
/// (frames handed on keep their own part alive until they are dropped).
pub fn release_if_large(buf: &mut BytesMut, keep: usize) {
    if buf.is_empty() && buf.capacity() > LARGE_BUFFER {
        *buf = BytesMut::with_capacity(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_length_is_believed_as_it_arrives() {
        let mut buf = BytesMut::new();
        // A terabyte declared: 16 MiB reserved, not a terabyte.
        make_room(&mut buf, 1 << 40, 4096);
        assert!(buf.capacity() >= TRUSTED_LENGTH && buf.capacity() < 2 * TRUSTED_LENGTH + 4096);
        // Once 20 MiB arrived, the buffer may double, no more.
        buf.resize(20 << 20, 0);
        make_room(&mut buf, 1 << 40, 4096);
        assert!(buf.capacity() >= 40 << 20 && buf.capacity() <= 80 << 20);
        // A small frame gets what it lacks, at least `min`.
        let mut small = BytesMut::new();
        make_room(&mut small, 10, 4096);
        assert!(small.capacity() >= 4096);
        make_room(&mut small, 100_000, 4096);
        assert!(small.capacity() >= 100_000);
    }

    #[test]
    fn large_empty_buffers_are_released() {
        let mut buf = BytesMut::with_capacity(4 * LARGE_BUFFER);
        buf.extend_from_slice(b"x");
        release_if_large(&mut buf, 4096);
        assert!(buf.capacity() >= 4 * LARGE_BUFFER, "not empty: kept");
        buf.clear();
        release_if_large(&mut buf, 4096);
        assert!(buf.capacity() < LARGE_BUFFER);
    }
}

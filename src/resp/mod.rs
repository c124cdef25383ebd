//! The RESP wire format: request framing, reply boundary scanning and the
//! reply builders for the replies keyward writes itself.

pub mod reply;
pub mod request;
pub mod scan;

pub use reply::Proto;
pub use request::{Limits, Parsed, Request, RequestParser};
pub use scan::{ProtocolError, Scanner};

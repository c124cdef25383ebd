//! keyward's error type: what went wrong, on which side, and whether a retry
//! could help. The one place that turns an error into the RESP error line a
//! client sees, so the wording stays consistent.

use std::fmt;

/// Who is responsible for the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// No connection to the upstream could be made or none is up.
    Unavailable,
    /// The upstream did not answer in time.
    Timeout,
    /// The connection died with the request sent and no reply read.
    OutcomeUnknown,
    /// The connection died before the request was written.
    NotSent,
    /// The upstream's reply did not parse.
    Protocol,
    /// The upstream refused our handshake (AUTH, HELLO).
    Handshake,
    /// A configured bound was reached.
    Limit,
    /// No verified master within the hold time.
    MasterDown,
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub side: Side,
    pub retryable: bool,
    pub detail: String,
}

impl Error {
    pub fn new(kind: Kind, side: Side, detail: impl Into<String>) -> Self {
        let retryable = matches!(kind, Kind::Unavailable | Kind::NotSent | Kind::Timeout);
        Error {
            kind,
            side,
            retryable,
            detail: detail.into(),
        }
    }

    pub fn upstream(kind: Kind, detail: impl Into<String>) -> Self {
        Error::new(kind, Side::Upstream, detail)
    }

    /// The error line (without `-` and CRLF) a client receives.
    pub fn resp_text(&self) -> String {
        match self.kind {
            Kind::Unavailable => format!("ERR upstream unavailable: {}", self.detail),
            Kind::Timeout => format!("ERR upstream timed out: {}", self.detail),
            Kind::OutcomeUnknown => format!(
                "ERR upstream connection lost before the reply; the outcome of this command is unknown and it was not retried ({})",
                self.detail
            ),
            Kind::NotSent => format!("ERR upstream connection lost; the command was not sent ({})", self.detail),
            Kind::Protocol => format!("ERR upstream protocol error: {}", self.detail),
            Kind::Handshake => format!("ERR upstream refused the connection: {}", self.detail),
            Kind::Limit => format!("ERR {}", self.detail),
            Kind::MasterDown => format!("MASTERDOWN {}", self.detail),
            Kind::Io => format!("ERR upstream I/O error: {}", self.detail),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({:?}): {}", self.kind, self.side, self.detail)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_single_line_errors() {
        for kind in [
            Kind::Unavailable,
            Kind::Timeout,
            Kind::OutcomeUnknown,
            Kind::NotSent,
            Kind::Limit,
        ] {
            let t = Error::upstream(kind, "127.0.0.1:1: refused").resp_text();
            assert!(t.starts_with("ERR "), "{t}");
            assert!(!t.contains('\n'));
        }
        assert!(Error::upstream(Kind::NotSent, "x").retryable);
        assert!(!Error::upstream(Kind::OutcomeUnknown, "x").retryable);
    }
}

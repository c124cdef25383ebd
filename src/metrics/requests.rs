//! Process-wide request counters: requests and latency by command family,
//! the error replies keyward made itself, client and byte counts.
//!
//! Plain atomics, written by the client tasks and read by scrapes. The
//! writer task records a batch of requests at once: one latency (the batch's
//! replies leave together) and one add per family present in the batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use super::histogram::{Histogram, Snapshot};
use crate::command::{Family, FAMILIES};
use crate::error::Kind;

/// Counters of one command family.
#[derive(Debug, Default)]
pub struct FamilyStats {
    pub ok: AtomicU64,
    /// Error replies, from Redis or from keyward.
    pub error: AtomicU64,
    /// Requests answered through a pinned connection's relay (transactions,
    /// subscriptions, blocking commands): counted, their replies not
    /// inspected, no latency (a BLPOP's wait is not the proxy's).
    pub relayed: AtomicU64,
    pub latency: Histogram,
}

/// Why keyward itself answered with an error: the label of
/// `keyward_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorKind {
    Unavailable,
    Timeout,
    OutcomeUnknown,
    NotSent,
    UpstreamProtocol,
    Handshake,
    Limit,
    MasterDown,
    Io,
    /// The client sent something that is not RESP.
    ClientProtocol,
    /// A command keyward refuses or answers with an error itself (SYNC,
    /// bad KEYWARD arguments, AUTH against no users).
    Refused,
}

pub const ERROR_KINDS: usize = 11;

impl ErrorKind {
    pub const ALL: [ErrorKind; ERROR_KINDS] = [
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::OutcomeUnknown,
        ErrorKind::NotSent,
        ErrorKind::UpstreamProtocol,
        ErrorKind::Handshake,
        ErrorKind::Limit,
        ErrorKind::MasterDown,
        ErrorKind::Io,
        ErrorKind::ClientProtocol,
        ErrorKind::Refused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::NotSent => "not_sent",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
            ErrorKind::Handshake => "handshake",
            ErrorKind::Limit => "limit",
            ErrorKind::MasterDown => "master_down",
            ErrorKind::Io => "io",
            ErrorKind::ClientProtocol => "client_protocol",
            ErrorKind::Refused => "refused",
        }
    }
}

impl From<&Kind> for ErrorKind {
    fn from(k: &Kind) -> Self {
        match k {
            Kind::Unavailable => ErrorKind::Unavailable,
            Kind::Timeout => ErrorKind::Timeout,
            Kind::OutcomeUnknown => ErrorKind::OutcomeUnknown,
            Kind::NotSent => ErrorKind::NotSent,
            Kind::Protocol => ErrorKind::UpstreamProtocol,
            Kind::Handshake => ErrorKind::Handshake,
            Kind::Limit => ErrorKind::Limit,
            Kind::MasterDown => ErrorKind::MasterDown,
            Kind::Io => ErrorKind::Io,
        }
    }
}

/// The families of a batch's requests, in order, as runs. The first run is
/// inline (a batch is almost always of one family); more allocate.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    first: (Family, u32),
    /// Runs after the first; empty (unallocated) for one-family batches.
    rest: Vec<(Family, u32)>,
}

impl Tally {
    #[inline]
    pub fn push(&mut self, f: Family) {
        if !self.rest.is_empty() {
            match self.rest.last_mut() {
                Some((last, n)) if *last == f => *n += 1,
                _ => self.rest.push((f, 1)),
            }
        } else if self.first.1 == 0 || self.first.0 == f {
            self.first = (f, self.first.1 + 1);
        } else {
            self.rest.push((f, 1));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.first.1 == 0
    }

    pub fn clear(&mut self) {
        *self = Tally::default();
    }

    /// The runs in order.
    pub fn runs(&self) -> impl Iterator<Item = (Family, u32)> + '_ {
        std::iter::once(self.first)
            .filter(|r| r.1 > 0)
            .chain(self.rest.iter().copied())
    }

    /// The number of requests counted.
    pub fn len(&self) -> u32 {
        self.runs().map(|r| r.1).sum()
    }
}

/// Everything counted across clients.
#[derive(Debug)]
pub struct RequestStats {
    pub started: Instant,
    families: [FamilyStats; FAMILIES],
    errors: [AtomicU64; ERROR_KINDS],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
}

impl Default for RequestStats {
    fn default() -> Self {
        RequestStats {
            started: Instant::now(),
            families: Default::default(),
            errors: Default::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }
}

impl RequestStats {
    pub fn family(&self, f: Family) -> &FamilyStats {
        &self.families[f as usize]
    }

    /// A batch of requests answered together after `us` microseconds;
    /// `errors` holds the (sorted) indexes of those answered with an error.
    pub fn finish(&self, tally: &Tally, errors: &[u32], us: u64) {
        let mut start = 0u32;
        let mut e = 0usize;
        for (f, n) in tally.runs() {
            let end = start + n;
            let mut errs = 0u32;
            while e < errors.len() && errors[e] < end {
                if errors[e] >= start {
                    errs += 1;
                }
                e += 1;
            }
            let fs = &self.families[f as usize];
            if errs < n {
                fs.ok.fetch_add((n - errs) as u64, Relaxed);
            }
            if errs > 0 {
                fs.error.fetch_add(errs as u64, Relaxed);
            }
            fs.latency.record(us, n as u64);
            start = end;
        }
    }

    /// A request sent through a pinned connection's relay.
    #[inline]
    pub fn relayed(&self, f: Family) {
        self.families[f as usize].relayed.fetch_add(1, Relaxed);
    }

    /// keyward answered a request with an error of its own.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Relaxed)
    }

    /// Requests counted so far (answered or relayed) and error replies.
    pub fn totals(&self) -> (u64, u64) {
        self.families.iter().fold((0, 0), |(r, e), f| {
            let err = f.error.load(Relaxed);
            (
                r + f.ok.load(Relaxed) + err + f.relayed.load(Relaxed),
                e + err,
            )
        })
    }

    /// The latency of every family together.
    pub fn latency(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for f in &self.families {
            s.merge(&f.latency.snapshot());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_splits_errors_by_family() {
        let s = RequestStats::default();
        let mut t = Tally::default();
        for f in [Family::String, Family::String, Family::Hash, Family::String] {
            t.push(f);
        }
        assert_eq!(t.len(), 4);
        // Requests 1 (string) and 2 (hash) failed.
        s.finish(&t, &[1, 2], 120);
        let st = s.family(Family::String);
        assert_eq!(st.ok.load(Relaxed), 2);
        assert_eq!(st.error.load(Relaxed), 1);
        assert_eq!(st.latency.snapshot().count(), 3);
        let h = s.family(Family::Hash);
        assert_eq!((h.ok.load(Relaxed), h.error.load(Relaxed)), (0, 1));
        assert_eq!(s.totals(), (4, 2));
        assert_eq!(s.latency().count(), 4);
    }
}

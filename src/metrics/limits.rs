//! How often each configured bound was reached, as
//! `keyward_limit_reached_total{limit="<config key>"}`.
//!
//! Every queue, buffer, pool and wait keyward bounds has a config key; when
//! a bound is reached (a client refused or cut off, a request refused or
//! held back, a fill skipped, a cache entry evicted, a log line dropped) the
//! counter named by that key goes up, so an operator sees which setting to
//! look at, not just that "a limit" was hit. The label set is this fixed
//! list.
//!
//! Process-wide atomics, like the `metrics` facade's own registry: the
//! places that enforce bounds sit in layers (the upstream connection, the
//! cache store, the log limiter) that do not hold the server context.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A configured bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Limit {
    /// A connection refused: too many clients.
    MaxClients,
    /// A request refused: a bulk argument longer than allowed.
    MaxBulkBytes,
    /// A request refused: larger than allowed as a whole.
    MaxRequestBytes,
    /// A client's reading paused: too many of its requests await replies.
    MaxPendingRequests,
    /// A client cut off: too many reply bytes waiting for it to read.
    MaxReplyBytes,
    /// A client closed after being idle too long.
    IdleTimeout,
    /// A request refused: too many in flight on a shared connection.
    MaxInflight,
    /// A request refused: no dedicated connection left.
    MaxPinned,
    /// A held request answered MASTERDOWN: no master within the hold time.
    HoldMs,
    /// A request answered MASTERDOWN: too many requests held.
    HoldMaxRequests,
    /// A request answered MASTERDOWN: too many bytes held.
    HoldMaxBytes,
    /// A near-cache fill skipped: too many fills queued.
    CacheMaxFillsInFlight,
    /// A near-cache fill dropped: its reply is larger than cacheable.
    CacheMaxReplyBytes,
    /// A near-cache entry evicted to make room within the byte budget.
    CacheMaxMb,
    /// An error-reply log line dropped: the per-second budget was spent.
    LogMaxErrorLinesPerSec,
    /// An admin (HTTP) connection closed at once: too many open.
    AdminMaxConnections,
    /// An admin connection closed after being quiet too long.
    AdminIdleTimeout,
    /// A dedicated connection given back was closed: enough are kept.
    MaxIdlePinned,
    /// A client that closed its sending side closed: it took no reply for
    /// too long.
    DrainTimeout,
}

const LIMITS: usize = 19;

static REACHED: [AtomicU64; LIMITS] = [const { AtomicU64::new(0) }; LIMITS];

impl Limit {
    pub const ALL: [Limit; LIMITS] = [
        Limit::MaxClients,
        Limit::MaxBulkBytes,
        Limit::MaxRequestBytes,
        Limit::MaxPendingRequests,
        Limit::MaxReplyBytes,
        Limit::IdleTimeout,
        Limit::MaxInflight,
        Limit::MaxPinned,
        Limit::HoldMs,
        Limit::HoldMaxRequests,
        Limit::HoldMaxBytes,
        Limit::CacheMaxFillsInFlight,
        Limit::CacheMaxReplyBytes,
        Limit::CacheMaxMb,
        Limit::LogMaxErrorLinesPerSec,
        Limit::AdminMaxConnections,
        Limit::AdminIdleTimeout,
        Limit::MaxIdlePinned,
        Limit::DrainTimeout,
    ];

    /// The config key of the bound: the metric's label.
    pub fn key(self) -> &'static str {
        match self {
            Limit::MaxClients => "server.max_clients",
            Limit::MaxBulkBytes => "server.max_bulk_bytes",
            Limit::MaxRequestBytes => "server.max_request_bytes",
            Limit::MaxPendingRequests => "server.max_pending_requests",
            Limit::MaxReplyBytes => "server.max_reply_bytes",
            Limit::IdleTimeout => "server.idle_timeout_secs",
            Limit::MaxInflight => "upstream.max_inflight",
            Limit::MaxPinned => "upstream.max_pinned",
            Limit::HoldMs => "sentinel.hold_ms",
            Limit::HoldMaxRequests => "sentinel.hold_max_requests",
            Limit::HoldMaxBytes => "sentinel.hold_max_bytes",
            Limit::CacheMaxFillsInFlight => "cache.max_fills_in_flight",
            Limit::CacheMaxReplyBytes => "cache.max_reply_bytes",
            Limit::CacheMaxMb => "cache.max_mb",
            Limit::LogMaxErrorLinesPerSec => "log.max_error_lines_per_sec",
            Limit::AdminMaxConnections => "admin.max_connections",
            Limit::AdminIdleTimeout => "admin.idle_timeout_secs",
            Limit::MaxIdlePinned => "upstream.max_idle_pinned",
            Limit::DrainTimeout => "server.drain_timeout_ms",
        }
    }

    /// Count one more time this bound was reached.
    #[inline]
    pub fn reached(self) {
        REACHED[self as usize].fetch_add(1, Relaxed);
    }

    /// Times this bound was reached since start.
    pub fn count(self) -> u64 {
        REACHED[self as usize].load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_is_listed_once_under_a_config_key() {
        for (i, l) in Limit::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i, "{l:?} out of place in ALL");
        }
        let mut keys: Vec<&str> = Limit::ALL.iter().map(|l| l.key()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), LIMITS, "two limits share a key");
        let defaults = crate::config::Config::default().to_toml();
        for key in keys {
            let (section, name) = key.split_once('.').expect("section.key");
            let table: toml::Table = toml::from_str(&defaults).expect("defaults are TOML");
            assert!(
                table
                    .get(section)
                    .and_then(|s| s.as_table())
                    .is_some_and(|s| s.contains_key(name)),
                "{key} is not a config key"
            );
        }
    }

    #[test]
    fn reaching_a_limit_counts_it() {
        let before = Limit::HoldMaxBytes.count();
        Limit::HoldMaxBytes.reached();
        assert_eq!(Limit::HoldMaxBytes.count(), before + 1);
    }
}

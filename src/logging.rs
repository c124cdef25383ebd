//! Logging: JSON (default) or text lines on stderr through `tracing`, a
//! filter that `PUT /log-level` can change at runtime, and the rate-limited
//! log line for each error reply keyward makes itself.
//!
//! Every line about a client carries `conn` (the connection id, also the
//! `id` of `KEYWARD CLIENTS` and of HELLO's reply) and, when it concerns a
//! request, `req` (the request's number on that connection, from 1). At the
//! default level nothing is logged per request, so a request pays only the
//! disabled-callsite checks of the debug/trace macros (an atomic load each).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type Reload = reload::Handle<EnvFilter, Registry>;

static HANDLE: OnceLock<Reload> = OnceLock::new();
static LEVEL: Mutex<String> = Mutex::new(String::new());

/// Install the global subscriber on stderr. `RUST_LOG`, when set and
/// valid, wins over `level`. Safe to call once; later calls do nothing.
pub fn init(level: &str, format: &str) {
    init_with(level, format, std::io::stderr)
}

/// `init` with another destination (the logging bench writes to a sink).
pub fn init_with<W>(level: &str, format: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let level = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| level.to_string());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    let ok = if format == "json" {
        registry
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init()
            .is_ok()
    } else {
        registry.with(fmt).try_init().is_ok()
    };
    if ok {
        let _ = HANDLE.set(handle);
        *LEVEL.lock().unwrap_or_else(|e| e.into_inner()) = level;
    }
}

/// The filter in force.
pub fn level() -> String {
    LEVEL.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Change the filter (`info`, `debug`, `keyward=trace,info`...).
pub fn set_level(text: &str) -> Result<(), String> {
    let text = text.trim();
    let filter =
        EnvFilter::try_new(text).map_err(|e| format!("invalid log filter `{text}`: {e}"))?;
    let handle = HANDLE
        .get()
        .ok_or_else(|| "logging is not initialised".to_string())?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    *LEVEL.lock().unwrap_or_else(|e| e.into_inner()) = text.to_string();
    tracing::info!(filter = text, "log filter changed");
    Ok(())
}

/// Error replies keyward made itself: logged at most `per_sec` a second
/// (the rest counted and reported with the next line), and the last
/// `RECENT` kept for `/health` and the dashboard whatever the log level.
#[derive(Debug)]
pub struct ErrorLines {
    per_sec: u64,
    /// (second, lines logged in it) packed as second << 20 | count.
    window: AtomicU64,
    suppressed: AtomicU64,
    recent: Mutex<std::collections::VecDeque<RecentError>>,
}

/// Error replies kept for `/health`.
const RECENT: usize = 20;

/// One error reply keyward made, as `/health` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentError {
    /// Unix time in milliseconds.
    pub t_ms: u64,
    pub conn: u64,
    pub req: u64,
    pub kind: &'static str,
    pub error: String,
}

impl ErrorLines {
    pub fn new(per_sec: u32) -> Self {
        ErrorLines {
            per_sec: per_sec as u64,
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            recent: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// The last error replies, newest first.
    pub fn recent(&self) -> Vec<RecentError> {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().rev().cloned().collect()
    }

    /// Log one error reply sent to connection `conn` for its request `req`.
    pub fn log(&self, conn: u64, req: u64, kind: &'static str, text: &str) {
        let now_ms = crate::topology::now_ms();
        {
            let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() >= RECENT {
                r.pop_front();
            }
            r.push_back(RecentError {
                t_ms: now_ms,
                conn,
                req,
                kind,
                error: text.to_string(),
            });
        }
        if !tracing::enabled!(tracing::Level::WARN) {
            return;
        }
        let now = now_ms / 1000;
        let w = self.window.load(Ordering::Relaxed);
        let (sec, n) = (w >> 20, w & 0xF_FFFF);
        let n = if sec == now { n } else { 0 };
        if n >= self.per_sec {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::Limit::LogMaxErrorLinesPerSec.reached();
            return;
        }
        // A lost race only lets a line or two more through.
        self.window.store(now << 20 | (n + 1), Ordering::Relaxed);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(conn, req, kind, error = text, suppressed, "error reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_the_rest() {
        let l = ErrorLines::new(2);
        // No subscriber in unit tests: nothing is enabled, nothing counted.
        l.log(1, 1, "limit", "x");
        assert_eq!(l.suppressed.load(Ordering::Relaxed), 0);
        // Kept for /health all the same, newest first, bounded.
        for i in 0..30 {
            l.log(2, i, "unavailable", "ERR down");
        }
        let r = l.recent();
        assert_eq!(r.len(), RECENT);
        assert_eq!((r[0].conn, r[0].req, r[0].kind), (2, 29, "unavailable"));
    }

    #[test]
    fn bad_filter_is_refused() {
        assert!(set_level("=====").is_err());
    }
}

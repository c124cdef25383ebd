//! Configuration: defaults, the TOML file, command-line overrides and
//! validation that reports every problem at once.
//!
//! The file is read as a plain TOML table and walked key by key (rather than
//! deserialised with `deny_unknown_fields`) so one start reports every unknown
//! key and every bad value together, instead of the first one only.
//! `config/keyward.toml` documents every key; keep the two in step.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub sentinel: SentinelConfig,
    pub hotkeys: HotkeysConfig,
    pub cache: CacheConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerConfig {
    /// Address clients connect to.
    pub listen: String,
    /// Worker threads: 1 runs a single event loop (like Redis); more use a
    /// work-stealing runtime.
    pub threads: usize,
    /// Connected clients at most; one more gets `-ERR max number of clients reached`.
    pub max_clients: usize,
    /// Largest single argument in a request (Redis's proto-max-bulk-len).
    pub max_bulk_bytes: usize,
    /// Largest whole request (Redis's client-query-buffer-limit).
    pub max_request_bytes: usize,
    /// Requests a client may have waiting for replies; past it keyward stops
    /// reading that client until replies drain. Well below
    /// `upstream.max_inflight`, so one client pipelining as fast as it can
    /// (`redis-cli --pipe`) cannot fill a shared connection for the others.
    pub max_pending_requests: usize,
    /// Reply bytes waiting for a client that does not read; past it the client
    /// is disconnected (Redis's client-output-buffer-limit).
    pub max_reply_bytes: usize,
    /// Close clients idle this long; 0 never (Redis's `timeout`).
    pub idle_timeout_secs: u64,
    /// On SIGTERM, how long in-flight replies may take before connections close.
    pub shutdown_grace_ms: u64,
    /// A client that has closed its sending side still gets the replies it
    /// is owed, unless a write to it makes no progress for this long: then
    /// it is closed (until then it counts against `max_clients`).
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UpstreamConfig {
    /// The Redis server to forward to (`host:port`).
    pub address: String,
    /// ACL user for upstream connections; empty means `default`.
    pub username: String,
    /// Password sent with HELLO/AUTH on every upstream connection; empty for none.
    #[serde(serialize_with = "redact")]
    pub password: String,
    /// Shared pipelined connections per RESP version and database. One by default: Redis
    /// runs commands one at a time, and one connection carries the biggest
    /// batches (fewest syscalls and wake-ups on both sides).
    pub pool_size: usize,
    /// Requests in flight on one shared connection at most.
    pub max_inflight: usize,
    /// Dedicated connections for MULTI, blocking commands, subscribers, ... at most.
    pub max_pinned: usize,
    /// Dedicated connections kept, reset, for reuse once given back; 0
    /// closes them (see `upstream::parked`).
    pub max_idle_pinned: usize,
    pub connect_timeout_ms: u64,
    /// A shared connection whose oldest request waits longer than this is
    /// closed and its requests failed.
    pub command_timeout_ms: u64,
    /// Reconnect backoff bounds (jittered, doubling).
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// A shared pool of a database other than 0 unused this long is
    /// closed (it is opened again on the next use); 0 keeps them open.
    pub db_pool_idle_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SentinelConfig {
    /// Sentinels to follow (`host:port`); empty means a static upstream.
    pub addresses: Vec<String>,
    /// The master name the Sentinels monitor.
    pub master_name: String,
    /// ACL user and password for the Sentinels themselves.
    pub username: String,
    #[serde(serialize_with = "redact")]
    pub password: String,
    /// Sentinel poll interval while healthy (pub/sub can lose messages).
    pub poll_ms: u64,
    /// Poll interval while a failure is suspected or a failover runs.
    pub suspect_poll_ms: u64,
    /// keyward's own ROLE checks on the master.
    pub ping_ms: u64,
    /// Consecutive failed checks before the master is suspect.
    pub ping_failures: u32,
    /// How long requests are held while no verified master takes writes;
    /// past it they fail with -MASTERDOWN.
    pub hold_ms: u64,
    /// Requests and bytes held at most; beyond either, -MASTERDOWN at once.
    pub hold_max_requests: usize,
    pub hold_max_bytes: usize,
    /// Time allowed for each Sentinel query and ROLE check.
    pub timeout_ms: u64,
    /// "master", or "replica": read-only commands go to ROLE-verified
    /// replicas (stale reads allowed), falling back to the master.
    pub read_from: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HotkeysConfig {
    /// Sample keys and detect hot ones.
    pub enabled: bool,
    /// One request in `sample_rate` is sampled (1 samples every request).
    pub sample_rate: u32,
    /// Window length; rates are per window.
    pub window_ms: u64,
    /// A key is hot at or above this many ops/s...
    pub threshold: u64,
    /// ...for this many consecutive windows,
    pub enter_windows: u32,
    /// and stops being hot after this many windows below half the threshold.
    pub leave_windows: u32,
    /// Keys tracked per window.
    pub top_k: usize,
    /// Publish this instance's summary to Redis for the fleet view.
    pub fleet: bool,
    /// The pub/sub channel the instances' summaries go out on.
    pub fleet_channel: String,
}

impl Default for HotkeysConfig {
    fn default() -> Self {
        HotkeysConfig {
            enabled: true,
            sample_rate: 8,
            window_ms: 1_000,
            threshold: 1_000,
            enter_windows: 2,
            leave_windows: 5,
            top_k: 100,
            fleet: true,
            fleet_channel: "keyward:hotkeys".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheConfig {
    /// Byte budget of the near cache in MiB; 0 disables it.
    pub max_mb: usize,
    /// Longest an entry lives, whatever its PTTL (bounds a lost invalidation).
    pub max_ttl_ms: u64,
    /// Larger replies are not cached.
    pub max_reply_bytes: usize,
    /// The tracking link is pinged this often; a missed pong flushes the cache.
    pub ping_ms: u64,
    /// Fills queued or in flight at most; a miss beyond it starts no fill.
    pub max_fills_in_flight: usize,
    /// Folder for the warm-up list (cached requests, never values); empty: none.
    pub state_dir: String,
    /// Warm-up fills per second at most.
    pub warmup_rate: u64,
    /// /ready waits for warm-up at most this long.
    pub warmup_ready_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_mb: 64,
            max_ttl_ms: 2_000,
            max_reply_bytes: 64 * 1024,
            ping_ms: 250,
            max_fills_in_flight: 1_024,
            state_dir: String::new(),
            warmup_rate: 1_000,
            warmup_ready_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AdminConfig {
    /// HTTP listener for /live, /ready, /metrics, /ui...; empty disables it.
    pub listen: String,
    /// KEYWARD SLOWLOG keeps requests at least this slow (microseconds,
    /// read to reply written); negative disables it, 0 logs everything.
    pub slowlog_slower_than_us: i64,
    /// Entries KEYWARD SLOWLOG keeps (newest first).
    pub slowlog_max_len: usize,
    /// Admin (HTTP) connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// An admin connection quiet this long (no byte either way) is closed.
    pub idle_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "keyward=debug".
    pub level: String,
    /// "text" or "json".
    pub format: String,
    /// Error replies keyward makes itself are logged (with connection and
    /// request ids) at most this many times a second; the rest are counted
    /// in keyward_errors_total and summed up in the next line logged.
    pub max_error_lines_per_sec: u32,
}

fn redact<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() { "" } else { "(set)" })
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig {
                listen: "127.0.0.1:6380".into(),
                threads: 1,
                max_clients: 10_000,
                max_bulk_bytes: 512 * 1024 * 1024,
                max_request_bytes: 1024 * 1024 * 1024,
                max_pending_requests: 10_000,
                max_reply_bytes: 1024 * 1024 * 1024,
                idle_timeout_secs: 0,
                shutdown_grace_ms: 5_000,
                drain_timeout_ms: 30_000,
            },
            upstream: UpstreamConfig {
                address: "127.0.0.1:6379".into(),
                username: String::new(),
                password: String::new(),
                pool_size: 1,
                max_inflight: 100_000,
                max_pinned: 1_000,
                max_idle_pinned: 8,
                connect_timeout_ms: 1_000,
                command_timeout_ms: 5_000,
                backoff_min_ms: 50,
                backoff_max_ms: 2_000,
                db_pool_idle_ms: 60_000,
            },
            sentinel: SentinelConfig {
                addresses: Vec::new(),
                master_name: "mymaster".into(),
                username: String::new(),
                password: String::new(),
                poll_ms: 1_000,
                suspect_poll_ms: 100,
                ping_ms: 250,
                ping_failures: 2,
                hold_ms: 5_000,
                hold_max_requests: 100_000,
                hold_max_bytes: 256 * 1024 * 1024,
                timeout_ms: 500,
                read_from: "master".into(),
            },
            hotkeys: HotkeysConfig::default(),
            cache: CacheConfig::default(),
            admin: AdminConfig {
                listen: "127.0.0.1:9380".into(),
                slowlog_slower_than_us: 10_000,
                slowlog_max_len: 128,
                max_connections: 64,
                idle_timeout_secs: 30,
            },
            log: LogConfig {
                level: "info".into(),
                format: "json".into(),
                max_error_lines_per_sec: 20,
            },
        }
    }
}

/// Every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Defaults overlaid with the TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(vec![format!("not valid TOML: {}", e.message())])
        })?;
        let mut problems = Vec::new();
        cfg.apply(&table, &mut problems);
        problems.extend(cfg.problems());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError(problems))
        }
    }

    /// Check cross-field rules; `Ok` or every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self.problems();
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(p))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "server.listen: `{}` is not an address like 127.0.0.1:6380",
                self.server.listen
            ));
        }
        if !self.admin.listen.is_empty() && self.admin.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "admin.listen: `{}` is not an address like 127.0.0.1:9380",
                self.admin.listen
            ));
        }
        if !valid_host_port(&self.upstream.address) {
            p.push(format!(
                "upstream.address: `{}` is not host:port",
                self.upstream.address
            ));
        }
        if self.server.threads == 0 || self.server.threads > 256 {
            p.push("server.threads: must be between 1 and 256".into());
        }
        let positive: [(&str, u64); 12] = [
            ("server.drain_timeout_ms", self.server.drain_timeout_ms),
            ("server.max_clients", self.server.max_clients as u64),
            ("server.max_bulk_bytes", self.server.max_bulk_bytes as u64),
            (
                "server.max_request_bytes",
                self.server.max_request_bytes as u64,
            ),
            (
                "server.max_pending_requests",
                self.server.max_pending_requests as u64,
            ),
            ("server.max_reply_bytes", self.server.max_reply_bytes as u64),
            ("upstream.pool_size", self.upstream.pool_size as u64),
            ("upstream.max_inflight", self.upstream.max_inflight as u64),
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.command_timeout_ms",
                self.upstream.command_timeout_ms,
            ),
            ("admin.max_connections", self.admin.max_connections as u64),
            ("admin.idle_timeout_secs", self.admin.idle_timeout_secs),
        ];
        for (name, v) in positive {
            if v == 0 {
                p.push(format!("{name}: must be greater than 0"));
            }
        }
        // Durations past a year are surely mistakes, and near u64::MAX they
        // overflow the clock.
        const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
        let durations_ms: [(&str, u64); 18] = [
            (
                "server.idle_timeout_secs",
                self.server.idle_timeout_secs.saturating_mul(1000),
            ),
            ("server.shutdown_grace_ms", self.server.shutdown_grace_ms),
            ("server.drain_timeout_ms", self.server.drain_timeout_ms),
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.command_timeout_ms",
                self.upstream.command_timeout_ms,
            ),
            ("upstream.backoff_min_ms", self.upstream.backoff_min_ms),
            ("upstream.backoff_max_ms", self.upstream.backoff_max_ms),
            ("upstream.db_pool_idle_ms", self.upstream.db_pool_idle_ms),
            ("sentinel.poll_ms", self.sentinel.poll_ms),
            ("sentinel.suspect_poll_ms", self.sentinel.suspect_poll_ms),
            ("sentinel.ping_ms", self.sentinel.ping_ms),
            ("sentinel.hold_ms", self.sentinel.hold_ms),
            ("sentinel.timeout_ms", self.sentinel.timeout_ms),
            ("hotkeys.window_ms", self.hotkeys.window_ms),
            ("cache.max_ttl_ms", self.cache.max_ttl_ms),
            ("cache.ping_ms", self.cache.ping_ms),
            ("cache.warmup_ready_ms", self.cache.warmup_ready_ms),
            (
                "admin.idle_timeout_secs",
                self.admin.idle_timeout_secs.saturating_mul(1000),
            ),
        ];
        for (name, ms) in durations_ms {
            if ms > YEAR_MS {
                p.push(format!("{name}: at most a year"));
            }
        }
        if self.upstream.pool_size > 64 {
            p.push("upstream.pool_size: at most 64".into());
        }
        if self.server.max_request_bytes > u32::MAX as usize {
            p.push(format!("server.max_request_bytes: at most {}", u32::MAX));
        }
        if self.upstream.backoff_min_ms == 0
            || self.upstream.backoff_min_ms > self.upstream.backoff_max_ms
        {
            p.push("upstream.backoff_min_ms: must be > 0 and <= upstream.backoff_max_ms".into());
        }
        for a in &self.sentinel.addresses {
            if !valid_host_port(a) {
                p.push(format!("sentinel.addresses: `{a}` is not host:port"));
            }
        }
        if !self.sentinel.addresses.is_empty() && self.sentinel.master_name.is_empty() {
            p.push("sentinel.master_name: required when sentinel.addresses is set".into());
        }
        if !matches!(self.sentinel.read_from.as_str(), "master" | "replica") {
            p.push(format!(
                "sentinel.read_from: `{}` is not \"master\" or \"replica\"",
                self.sentinel.read_from
            ));
        }
        for (name, v) in [
            ("sentinel.poll_ms", self.sentinel.poll_ms),
            ("sentinel.suspect_poll_ms", self.sentinel.suspect_poll_ms),
            ("sentinel.ping_ms", self.sentinel.ping_ms),
            ("sentinel.ping_failures", self.sentinel.ping_failures as u64),
            ("sentinel.timeout_ms", self.sentinel.timeout_ms),
        ] {
            if v == 0 {
                p.push(format!("{name}: must be greater than 0"));
            }
        }
        for (name, v) in [
            ("hotkeys.sample_rate", self.hotkeys.sample_rate as u64),
            ("hotkeys.window_ms", self.hotkeys.window_ms),
            ("hotkeys.threshold", self.hotkeys.threshold),
            ("hotkeys.enter_windows", self.hotkeys.enter_windows as u64),
            ("hotkeys.leave_windows", self.hotkeys.leave_windows as u64),
            ("hotkeys.top_k", self.hotkeys.top_k as u64),
        ] {
            if v == 0 {
                p.push(format!("{name}: must be greater than 0"));
            }
        }
        for (name, v) in [
            ("cache.max_ttl_ms", self.cache.max_ttl_ms),
            ("cache.max_reply_bytes", self.cache.max_reply_bytes as u64),
            ("cache.ping_ms", self.cache.ping_ms),
            (
                "cache.max_fills_in_flight",
                self.cache.max_fills_in_flight as u64,
            ),
        ] {
            if v == 0 {
                p.push(format!("{name}: must be greater than 0"));
            }
        }
        if self.hotkeys.top_k > 10_000 {
            p.push("hotkeys.top_k: at most 10000".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            p.push(format!(
                "log.format: `{}` is not \"text\" or \"json\"",
                self.log.format
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(format!(
                "log.level: `{}` is not a valid filter",
                self.log.level
            ));
        }
        p
    }

    fn apply(&mut self, table: &toml::Table, problems: &mut Vec<String>) {
        for (section, value) in table {
            let Some(t) = value.as_table() else {
                problems.push(format!("`{section}`: unknown key (settings live in [server], [upstream], [admin], [log])"));
                continue;
            };
            for (key, v) in t {
                let name = format!("{section}.{key}");
                let s = &mut *self;
                let known = match (section.as_str(), key.as_str()) {
                    ("server", "listen") => set_str(&mut s.server.listen, &name, v, problems),
                    ("server", "threads") => set_num(&mut s.server.threads, &name, v, problems),
                    ("server", "max_clients") => {
                        set_num(&mut s.server.max_clients, &name, v, problems)
                    }
                    ("server", "max_bulk_bytes") => {
                        set_num(&mut s.server.max_bulk_bytes, &name, v, problems)
                    }
                    ("server", "max_request_bytes") => {
                        set_num(&mut s.server.max_request_bytes, &name, v, problems)
                    }
                    ("server", "max_pending_requests") => {
                        set_num(&mut s.server.max_pending_requests, &name, v, problems)
                    }
                    ("server", "max_reply_bytes") => {
                        set_num(&mut s.server.max_reply_bytes, &name, v, problems)
                    }
                    ("server", "idle_timeout_secs") => {
                        set_num(&mut s.server.idle_timeout_secs, &name, v, problems)
                    }
                    ("server", "shutdown_grace_ms") => {
                        set_num(&mut s.server.shutdown_grace_ms, &name, v, problems)
                    }
                    ("server", "drain_timeout_ms") => {
                        set_num(&mut s.server.drain_timeout_ms, &name, v, problems)
                    }
                    ("upstream", "address") => set_str(&mut s.upstream.address, &name, v, problems),
                    ("upstream", "username") => {
                        set_str(&mut s.upstream.username, &name, v, problems)
                    }
                    ("upstream", "password") => {
                        set_str(&mut s.upstream.password, &name, v, problems)
                    }
                    ("upstream", "pool_size") => {
                        set_num(&mut s.upstream.pool_size, &name, v, problems)
                    }
                    ("upstream", "max_inflight") => {
                        set_num(&mut s.upstream.max_inflight, &name, v, problems)
                    }
                    ("upstream", "max_pinned") => {
                        set_num(&mut s.upstream.max_pinned, &name, v, problems)
                    }
                    ("upstream", "max_idle_pinned") => {
                        set_num(&mut s.upstream.max_idle_pinned, &name, v, problems)
                    }
                    ("upstream", "connect_timeout_ms") => {
                        set_num(&mut s.upstream.connect_timeout_ms, &name, v, problems)
                    }
                    ("upstream", "command_timeout_ms") => {
                        set_num(&mut s.upstream.command_timeout_ms, &name, v, problems)
                    }
                    ("upstream", "backoff_min_ms") => {
                        set_num(&mut s.upstream.backoff_min_ms, &name, v, problems)
                    }
                    ("upstream", "backoff_max_ms") => {
                        set_num(&mut s.upstream.backoff_max_ms, &name, v, problems)
                    }
                    ("upstream", "db_pool_idle_ms") => {
                        set_num(&mut s.upstream.db_pool_idle_ms, &name, v, problems)
                    }
                    ("sentinel", "addresses") => {
                        set_list(&mut s.sentinel.addresses, &name, v, problems)
                    }
                    ("sentinel", "master_name") => {
                        set_str(&mut s.sentinel.master_name, &name, v, problems)
                    }
                    ("sentinel", "username") => {
                        set_str(&mut s.sentinel.username, &name, v, problems)
                    }
                    ("sentinel", "password") => {
                        set_str(&mut s.sentinel.password, &name, v, problems)
                    }
                    ("sentinel", "poll_ms") => set_num(&mut s.sentinel.poll_ms, &name, v, problems),
                    ("sentinel", "suspect_poll_ms") => {
                        set_num(&mut s.sentinel.suspect_poll_ms, &name, v, problems)
                    }
                    ("sentinel", "ping_ms") => set_num(&mut s.sentinel.ping_ms, &name, v, problems),
                    ("sentinel", "ping_failures") => {
                        set_num(&mut s.sentinel.ping_failures, &name, v, problems)
                    }
                    ("sentinel", "hold_ms") => set_num(&mut s.sentinel.hold_ms, &name, v, problems),
                    ("sentinel", "hold_max_requests") => {
                        set_num(&mut s.sentinel.hold_max_requests, &name, v, problems)
                    }
                    ("sentinel", "hold_max_bytes") => {
                        set_num(&mut s.sentinel.hold_max_bytes, &name, v, problems)
                    }
                    ("sentinel", "read_from") => {
                        set_str(&mut s.sentinel.read_from, &name, v, problems)
                    }
                    ("sentinel", "timeout_ms") => {
                        set_num(&mut s.sentinel.timeout_ms, &name, v, problems)
                    }
                    ("hotkeys", "enabled") => set_bool(&mut s.hotkeys.enabled, &name, v, problems),
                    ("hotkeys", "sample_rate") => {
                        set_num(&mut s.hotkeys.sample_rate, &name, v, problems)
                    }
                    ("hotkeys", "window_ms") => {
                        set_num(&mut s.hotkeys.window_ms, &name, v, problems)
                    }
                    ("hotkeys", "threshold") => {
                        set_num(&mut s.hotkeys.threshold, &name, v, problems)
                    }
                    ("hotkeys", "enter_windows") => {
                        set_num(&mut s.hotkeys.enter_windows, &name, v, problems)
                    }
                    ("hotkeys", "leave_windows") => {
                        set_num(&mut s.hotkeys.leave_windows, &name, v, problems)
                    }
                    ("hotkeys", "top_k") => set_num(&mut s.hotkeys.top_k, &name, v, problems),
                    ("hotkeys", "fleet") => set_bool(&mut s.hotkeys.fleet, &name, v, problems),
                    ("hotkeys", "fleet_channel") => {
                        set_str(&mut s.hotkeys.fleet_channel, &name, v, problems)
                    }
                    ("cache", "max_mb") => set_num(&mut s.cache.max_mb, &name, v, problems),
                    ("cache", "max_ttl_ms") => set_num(&mut s.cache.max_ttl_ms, &name, v, problems),
                    ("cache", "max_reply_bytes") => {
                        set_num(&mut s.cache.max_reply_bytes, &name, v, problems)
                    }
                    ("cache", "ping_ms") => set_num(&mut s.cache.ping_ms, &name, v, problems),
                    ("cache", "max_fills_in_flight") => {
                        set_num(&mut s.cache.max_fills_in_flight, &name, v, problems)
                    }
                    ("cache", "state_dir") => set_str(&mut s.cache.state_dir, &name, v, problems),
                    ("cache", "warmup_rate") => {
                        set_num(&mut s.cache.warmup_rate, &name, v, problems)
                    }
                    ("cache", "warmup_ready_ms") => {
                        set_num(&mut s.cache.warmup_ready_ms, &name, v, problems)
                    }
                    ("admin", "listen") => set_str(&mut s.admin.listen, &name, v, problems),
                    ("log", "level") => set_str(&mut s.log.level, &name, v, problems),
                    ("log", "format") => set_str(&mut s.log.format, &name, v, problems),
                    ("log", "max_error_lines_per_sec") => {
                        set_num(&mut s.log.max_error_lines_per_sec, &name, v, problems)
                    }
                    ("admin", "slowlog_slower_than_us") => {
                        set_num(&mut s.admin.slowlog_slower_than_us, &name, v, problems)
                    }
                    ("admin", "slowlog_max_len") => {
                        set_num(&mut s.admin.slowlog_max_len, &name, v, problems)
                    }
                    ("admin", "max_connections") => {
                        set_num(&mut s.admin.max_connections, &name, v, problems)
                    }
                    ("admin", "idle_timeout_secs") => {
                        set_num(&mut s.admin.idle_timeout_secs, &name, v, problems)
                    }
                    _ => false,
                };
                if !known {
                    problems.push(format!("`{name}`: unknown key"));
                }
            }
        }
    }

    /// The effective configuration as TOML (passwords redacted).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| {
            let mut s = String::new();
            let _ = write!(s, "# cannot render configuration: {e}");
            s
        })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream.connect_timeout_ms)
    }

    /// Following Sentinel rather than a static upstream?
    pub fn uses_sentinel(&self) -> bool {
        !self.sentinel.addresses.is_empty()
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream.command_timeout_ms)
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && port.parse::<u16>().map(|p| p > 0).unwrap_or(false)
        }
        None => false,
    }
}

/// Returns true when the key is known (even if its value was bad).
fn set_str(slot: &mut String, name: &str, v: &toml::Value, problems: &mut Vec<String>) -> bool {
    match v.as_str() {
        Some(s) => *slot = s.to_string(),
        None => problems.push(format!("{name}: expected a string, got {}", v.type_str())),
    }
    true
}

fn set_bool(slot: &mut bool, name: &str, v: &toml::Value, problems: &mut Vec<String>) -> bool {
    match v.as_bool() {
        Some(b) => *slot = b,
        None => problems.push(format!(
            "{name}: expected true or false, got {}",
            v.type_str()
        )),
    }
    true
}

fn set_list(
    slot: &mut Vec<String>,
    name: &str,
    v: &toml::Value,
    problems: &mut Vec<String>,
) -> bool {
    match v.as_array() {
        Some(items) if items.iter().all(|i| i.is_str()) => {
            *slot = items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect();
        }
        _ => problems.push(format!("{name}: expected a list of strings")),
    }
    true
}

fn set_num<T: TryFrom<i64>>(
    slot: &mut T,
    name: &str,
    v: &toml::Value,
    problems: &mut Vec<String>,
) -> bool {
    match v.as_integer().map(T::try_from) {
        Some(Ok(n)) => *slot = n,
        Some(Err(_)) => problems.push(format!("{name}: {} is out of range", v)),
        None => problems.push(format!("{name}: expected an integer, got {}", v.type_str())),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn every_problem_is_reported() {
        let err = Config::from_toml(
            "[server]\nlisten = 5\nmax_clients = -1\nbogus = 1\n[upstream]\npool_size = 0\n[nope]\nx = 1\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "server.listen",
            "server.max_clients",
            "`server.bogus`: unknown key",
            "upstream.pool_size",
            "`nope.x`",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        let err = Config::from_toml(
            "[admin]\nidle_timeout_secs = 9223372036854775807\n[cache]\nmax_ttl_ms = 31536000001\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("admin.idle_timeout_secs: at most a year"),
            "{err}"
        );
        assert!(err.contains("cache.max_ttl_ms: at most a year"), "{err}");
        Config::from_toml("[cache]\nmax_ttl_ms = 31536000000\n").unwrap();
    }

    #[test]
    fn shipped_config_file_is_the_defaults() {
        let text = include_str!("../config/keyward.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }
}

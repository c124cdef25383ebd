//! The shared connection pool for one upstream node and RESP version.
//!
//! A fixed number of slots, each kept filled by a maintainer task: connect,
//! handshake, serve until the connection dies, then reconnect with jittered
//! exponential backoff. The maintainers double as the circuit breaker: while
//! no slot holds a live connection the pool is open and `send` fails at once
//! with the last connect error (no client waits on a dead upstream), and each
//! reconnect attempt is the half-open probe that closes it again. A
//! maintainer also watches its connection for stalls (requests pending with
//! no reply for the command timeout) and closes it, failing its requests.
//!
//! A pool in a database other than 0 whose SELECT Redis refuses (a master
//! with fewer `databases` after a failover, an ACL) fails its requests at
//! once with Redis's error while that lasts, rather than holding them as if
//! the upstream were down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::conn::{BatchResult, Conn};
use super::connector::{self, Settings};
use super::meter::Meter;
use crate::command::CommandTable;
use crate::error::{Error, Kind};
use crate::resp::Proto;

/// Facts learned from the upstream on the first connection.
#[derive(Debug, Clone, Default)]
pub struct ServerFacts {
    pub version: String,
    /// The `databases` setting (SELECT takes 0 to databases - 1), if
    /// `CONFIG GET` is allowed.
    pub databases: Option<i64>,
}

/// What keyward learns from the upstream, kept across master changes.
#[derive(Default)]
pub struct Learned {
    /// Loaded from `COMMAND`.
    pub table: ArcSwapOption<CommandTable>,
    pub facts: ArcSwap<ServerFacts>,
}

/// State shared by every pool of one upstream node.
pub struct Node {
    pub settings: Settings,
    pub max_inflight: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub learned: Arc<Learned>,
    /// Set when this node may no longer receive writes (it failed over or is
    /// about to): shared connections stop writing at once.
    pub fenced: Arc<AtomicBool>,
    /// Failed connects and lost or stalled connections (all pools of the
    /// node): `keyward_upstream_errors_total`.
    pub errors: AtomicU64,
}

pub struct Pool {
    pub proto: Proto,
    /// The database every connection of the pool is in (SELECT after the
    /// handshake when not 0).
    pub db: i64,
    node: Arc<Node>,
    slots: Vec<ArcSwapOption<Conn>>,
    ever_connected: AtomicBool,
    /// The last attempt connected but Redis refused the SELECT: requests
    /// fail at once with `last_error` (see the module notes).
    refused: AtomicBool,
    /// Woken when a connection comes up or a SELECT is refused.
    up: Notify,
    last_error: Mutex<Option<Error>>,
    /// Cancelled to close the pool alone (an idle database's pool); a child
    /// of the generation's token.
    close: CancellationToken,
    /// When the pool was last handed to a sender (`touch`), in ms since
    /// `born`: idle pools of databases other than 0 are closed.
    last_used: AtomicU64,
    born: std::time::Instant,
}

impl Pool {
    /// Create the pool and start one maintainer per slot.
    pub fn start(
        node: Arc<Node>,
        proto: Proto,
        db: i64,
        size: usize,
        shutdown: CancellationToken,
    ) -> Arc<Pool> {
        let close = shutdown.child_token();
        let pool = Arc::new(Pool {
            proto,
            db,
            node,
            slots: (0..size).map(|_| ArcSwapOption::empty()).collect(),
            ever_connected: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            up: Notify::new(),
            last_error: Mutex::new(None),
            close: close.clone(),
            last_used: AtomicU64::new(0),
            born: std::time::Instant::now(),
        });
        for i in 0..size {
            tokio::spawn(maintain(pool.clone(), i, close.clone()));
        }
        pool
    }

    /// Note that a sender is about to use the pool.
    pub fn touch(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.last_used.store(now, Ordering::Relaxed);
    }

    /// Unused for at least `idle`, with nothing in flight and no sender
    /// holding it (`holders` other than the pool's own maintainers).
    pub fn idle_for(self: &Arc<Self>, idle: Duration, holders: usize) -> bool {
        let now = self.born.elapsed().as_millis() as u64;
        let used = self.last_used.load(Ordering::Relaxed);
        now.saturating_sub(used) >= idle.as_millis() as u64
            && self.pending() == 0
            && Arc::strong_count(self) <= holders + self.slots.len()
    }

    /// Close every connection of the pool and stop reconnecting.
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Requests in flight on all connections.
    pub fn pending(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.load().as_ref().map(|c| c.pending()))
            .sum()
    }

    /// Connections up now.
    pub fn live(&self) -> usize {
        // Counted from the slots rather than kept in a counter, so a
        // connection that just failed (and whose maintainer has not run
        // yet) is never counted: callers that wait for a live connection
        // and retry must not spin on a dead one.
        self.slots
            .iter()
            .filter(|s| s.load().as_ref().is_some_and(|c| !c.is_closed()))
            .count()
    }

    /// Send a batch on the connection chosen by `sticky` (a client keeps one
    /// connection so its own requests stay in order across batches).
    pub fn send(
        &self,
        sticky: usize,
        bytes: &[u8],
        count: u32,
        meter: Option<Arc<Meter>>,
    ) -> Result<oneshot::Receiver<BatchResult>, Error> {
        let n = self.slots.len();
        for i in 0..n {
            let slot = &self.slots[(sticky + i) % n];
            if let Some(conn) = &*slot.load() {
                if !conn.is_closed() {
                    return conn.send(bytes, count, meter);
                }
            }
        }
        Err(self.unavailable())
    }

    /// The error for a pool with no live connection: Redis's refusal of the
    /// SELECT while that stands, else `Unavailable` with the last cause.
    fn unavailable(&self) -> Error {
        if self.refused.load(Ordering::Acquire) {
            if let Some(e) = self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return e;
            }
        }
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match last {
            Some(e) => Error::upstream(Kind::Unavailable, e.detail),
            None => Error::upstream(
                Kind::Unavailable,
                format!("{}: not connected yet", self.node.settings.address),
            ),
        }
    }

    /// Wait until a connection is up, for a pool that has never had one
    /// (right after start); false on timeout or if it had been up before.
    /// True too once Redis refused its SELECT: sending again then fails
    /// with that refusal.
    pub async fn wait_first(&self, timeout: Duration) -> bool {
        if self.ever_connected.load(Ordering::Acquire) {
            return self.answered();
        }
        self.wait_live(tokio::time::Instant::now() + timeout).await
    }

    /// Wait until a connection is up or Redis refused the SELECT (or
    /// `deadline` passes); true unless the deadline passed.
    pub async fn wait_live(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.up.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.answered() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.answered();
            }
        }
    }

    /// A connection is up, or Redis refused the SELECT.
    fn answered(&self) -> bool {
        self.live() > 0 || self.refused.load(Ordering::Acquire)
    }

    fn set_error(&self, e: Error) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// Load the command table and server facts over a fresh connection.
async fn learn(node: &Node, stream: &mut tokio::net::TcpStream) -> Result<(), Error> {
    let timeout = node.settings.command_timeout;
    let reply = tokio::time::timeout(timeout, connector::call(stream, &[b"COMMAND"]))
        .await
        .map_err(|_| Error::upstream(Kind::Timeout, "COMMAND timed out"))??;
    if reply.first() == Some(&b'-') && node.learned.table.load().is_some() {
        // Refused (-BUSY while a script runs, and it may run until someone
        // sends SCRIPT KILL): what was learned stands, and the connection
        // serves, as Redis serves other clients meanwhile (with -BUSY).
        tracing::debug!(upstream = %node.settings.address, reply = %String::from_utf8_lossy(reply.trim_ascii_end()), "COMMAND refused; keeping the command table");
        return Ok(());
    }
    let table = CommandTable::from_reply(&reply).map_err(|e| Error::upstream(Kind::Protocol, e))?;
    let info = tokio::time::timeout(timeout, connector::call(stream, &[b"INFO", b"server"]))
        .await
        .map_err(|_| Error::upstream(Kind::Timeout, "INFO timed out"))??;
    let text = String::from_utf8_lossy(&info);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("7.0.0")
        .trim()
        .to_string();
    // Managed Redis may refuse CONFIG: then SELECT's range stays unknown.
    let databases = tokio::time::timeout(
        timeout,
        connector::call(stream, &[b"CONFIG", b"GET", b"databases"]),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .and_then(|r| config_value(&r, b"databases"))
    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
    tracing::debug!(commands = table.len(), %version, ?databases, upstream = %node.settings.address, "learned upstream command table");
    node.learned.table.store(Some(Arc::new(table)));
    node.learned
        .facts
        .store(Arc::new(ServerFacts { version, databases }));
    Ok(())
}

/// The value of `name` in a `CONFIG GET` reply (a RESP2 array or a RESP3
/// map of bulk strings).
fn config_value(reply: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut lines = reply
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    if !matches!(lines.next()?.first(), Some(b'*' | b'%')) {
        return None;
    }
    while let Some(line) = lines.next() {
        if line.eq_ignore_ascii_case(name) {
            lines.next()?; // the value's $<len>
            return lines.next().map(<[u8]>::to_vec);
        }
    }
    None
}

async fn maintain(pool: Arc<Pool>, slot: usize, shutdown: CancellationToken) {
    let node = pool.node.clone();
    let mut backoff = node.backoff_min;
    let mut was_down_logged = false;
    loop {
        // Err carries whether Redis refused the SELECT (see `Pool::refused`).
        let attempt = async {
            let mut stream = connector::connect(&node.settings, pool.proto)
                .await
                .map_err(|e| (e, false))?;
            // Learn the command table when it is missing, and again on every
            // reconnect of the first slot: a restarted upstream may be a new
            // version or have loaded modules.
            if pool.proto == Proto::Resp2
                && pool.db == 0
                && (slot == 0 || node.learned.table.load().is_none())
            {
                learn(&node, &mut stream).await.map_err(|e| (e, false))?;
            }
            if pool.db != 0 {
                if let Err(e) = connector::select(&mut stream, &node.settings, pool.db).await {
                    // An error reply (not a lost connection): Redis refuses
                    // this database.
                    let refused = e.kind == Kind::Handshake;
                    return Err((e, refused));
                }
            }
            Ok(stream)
        };
        let res = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match res {
            Ok(stream) => {
                let conn = Conn::start(
                    stream,
                    node.settings.address.clone(),
                    node.max_inflight,
                    node.fenced.clone(),
                );
                pool.slots[slot].store(Some(conn.clone()));
                pool.refused.store(false, Ordering::Release);
                pool.ever_connected.store(true, Ordering::Release);
                pool.up.notify_waiters();
                if was_down_logged {
                    tracing::info!(upstream = %node.settings.address, slot, proto = ?pool.proto, "upstream connection restored");
                    was_down_logged = false;
                }
                backoff = node.backoff_min;
                let tick = (node.settings.command_timeout / 4)
                    .clamp(Duration::from_millis(10), Duration::from_millis(250));
                let mut interval = tokio::time::interval(tick);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            // Retired: the master is failing over, was
                            // replaced, or keyward is stopping (clients have
                            // drained by then; a planned switchover waits for
                            // replies before it retires anything). A reply
                            // still owed could only come from a master that
                            // no longer counts, and a late +OK from a
                            // resumed zombie would acknowledge a lost write:
                            // fail what is left now.
                            conn.fail(Error::upstream(
                                Kind::OutcomeUnknown,
                                format!("{}: connection retired (master replaced or keyward stopping)", node.settings.address),
                            ));
                            return;
                        }
                        _ = conn.closed() => break,
                        _ = interval.tick() => {
                            if conn.stalled_for() > node.settings.command_timeout {
                                let e = Error::upstream(Kind::Timeout, format!(
                                    "{}: no reply for {} ms (upstream.command_timeout_ms)",
                                    node.settings.address,
                                    node.settings.command_timeout.as_millis()
                                ));
                                tracing::warn!(upstream = %node.settings.address, slot, "upstream connection stalled; closing it");
                                conn.fail(e);
                            }
                        }
                    }
                }
                pool.slots[slot].store(None);
                node.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(upstream = %node.settings.address, slot, proto = ?pool.proto, "upstream connection lost; reconnecting");
                // Reconnect at once the first time; back off if that fails.
                pool.set_error(Error::upstream(
                    Kind::Unavailable,
                    format!("{}: connection lost", node.settings.address),
                ));
                continue;
            }
            Err((e, refused)) => {
                node.errors.fetch_add(1, Ordering::Relaxed);
                if !was_down_logged {
                    tracing::warn!(upstream = %node.settings.address, slot, proto = ?pool.proto, db = pool.db, error = %e.detail, "cannot connect to upstream; retrying with backoff");
                    was_down_logged = true;
                }
                pool.set_error(e);
                pool.refused.store(refused, Ordering::Release);
                if refused {
                    pool.up.notify_waiters();
                }
            }
        }
        // Full jitter keeps many proxies from reconnecting in lockstep.
        let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(node.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::config_value;

    #[test]
    fn config_get_replies_in_both_protocols() {
        let resp2 = b"*2\r\n$9\r\ndatabases\r\n$2\r\n16\r\n";
        let resp3 = b"%1\r\n$9\r\ndatabases\r\n$3\r\n100\r\n";
        assert_eq!(
            config_value(resp2, b"databases").as_deref(),
            Some(&b"16"[..])
        );
        assert_eq!(
            config_value(resp3, b"databases").as_deref(),
            Some(&b"100"[..])
        );
        assert_eq!(config_value(b"*0\r\n", b"databases"), None);
        assert_eq!(
            config_value(b"-ERR unknown command 'CONFIG'\r\n", b"databases"),
            None
        );
    }
}

//! The client side: the listener, one session per connection, and the
//! replies keyward gives itself.

pub mod client;
pub mod listener;
pub mod local;
pub mod registry;
pub mod slowlog;
pub mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Kind};
use crate::metrics::Limit;
use crate::resp::{Limits, Proto};
use crate::topology::{self, State};
use crate::upstream::{BatchResult, Learned, Meter, Upstream};

/// Everything sessions share, built once at start.
pub struct Ctx {
    pub config: Config,
    pub limits: Limits,
    /// Command table and server facts, kept across master changes.
    pub learned: Arc<Learned>,
    /// The current generation of upstream connections; `None` while no
    /// verified master may take traffic.
    pub upstream: ArcSwapOption<Upstream>,
    /// Connections to ROLE-verified replicas, with `sentinel.read_from =
    /// "replica"` (empty otherwise).
    pub read_replicas: ArcSwap<Vec<Arc<Upstream>>>,
    /// `sentinel.read_from = "replica"`.
    pub read_from_replica: bool,
    pub topology: topology::Shared,
    generation: AtomicU64,
    /// Set during a planned switchover: every new request is held.
    hold_all: AtomicBool,
    /// Requests and bytes held right now (bounded by sentinel.hold_max_*).
    held_requests: AtomicUsize,
    held_bytes: AtomicUsize,
    /// Requests sent on dedicated connections that would be carried to a
    /// new master (a database, subscriptions), not answered yet; a planned
    /// switchover waits for them as for the shared pool's (blocking calls
    /// are not counted: they may wait for ever).
    pub carried_in_flight: Arc<AtomicUsize>,
    /// The hot-key detector, when `hotkeys.enabled`.
    pub hotkeys: Option<Arc<crate::hotkey::Detector>>,
    /// The fleet view's state, when `hotkeys.fleet` too.
    pub fleet: Option<Arc<crate::hotkey::fleet::Fleet>>,
    /// The near cache, when `cache.max_mb > 0` and hot keys are detected.
    pub cache: Option<Arc<crate::cache::NearCache>>,
    /// Its fill queue, taken by the tracking task at start.
    pub cache_fills:
        std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::cache::tracking::Fill>>>,
    /// Asks the tracker to check the master now (a shared connection lost it).
    pub check_master: Notify,
    /// Permits for pinned connections (upstream.max_pinned).
    pub pinned: Arc<Semaphore>,
    pub next_client_id: AtomicU64,
    pub clients: AtomicUsize,
    /// Request counters and latency by family, bytes, errors (metrics).
    pub stats: crate::metrics::RequestStats,
    /// The clients connected now (KEYWARD CLIENTS, /clients).
    pub registry: registry::Registry,
    pub slowlog: slowlog::SlowLog,
    /// Rate limit of the error-reply log lines.
    pub error_lines: crate::logging::ErrorLines,
    /// Cancelled on SIGTERM/SIGINT: sessions stop reading new requests.
    pub shutdown: CancellationToken,
}

impl Ctx {
    pub fn new(config: Config, topology: topology::Topology, shutdown: CancellationToken) -> Ctx {
        let (cache, cache_fills) = if config.cache.max_mb > 0 && config.hotkeys.enabled {
            let (c, rx) = crate::cache::NearCache::new(config.cache.clone());
            (Some(c), Some(rx))
        } else {
            (None, None)
        };
        Ctx {
            cache,
            cache_fills: std::sync::Mutex::new(cache_fills),
            limits: Limits {
                max_bulk: config.server.max_bulk_bytes,
                max_request: config.server.max_request_bytes,
            },
            learned: Arc::new(Learned::default()),
            upstream: ArcSwapOption::empty(),
            read_replicas: ArcSwap::from_pointee(Vec::new()),
            read_from_replica: config.uses_sentinel() && config.sentinel.read_from == "replica",
            topology: topology::Shared::new(topology),
            generation: AtomicU64::new(0),
            hold_all: AtomicBool::new(false),
            held_requests: AtomicUsize::new(0),
            carried_in_flight: Default::default(),
            held_bytes: AtomicUsize::new(0),
            hotkeys: config
                .hotkeys
                .enabled
                .then(|| crate::hotkey::Detector::new(config.hotkeys.clone())),
            fleet: (config.hotkeys.enabled && config.hotkeys.fleet).then(|| {
                Arc::new(crate::hotkey::fleet::Fleet::new(
                    config.hotkeys.fleet_channel.clone(),
                    crate::hotkey::fleet::instance_id(&config.server.listen),
                ))
            }),
            check_master: Notify::new(),
            pinned: Arc::new(Semaphore::new(config.upstream.max_pinned)),
            next_client_id: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
            stats: Default::default(),
            registry: Default::default(),
            slowlog: slowlog::SlowLog::new(
                config.admin.slowlog_slower_than_us,
                config.admin.slowlog_max_len,
            ),
            error_lines: crate::logging::ErrorLines::new(config.log.max_error_lines_per_sec),
            shutdown,
            config,
        }
    }

    /// The upstream to send to now, without waiting.
    #[inline]
    pub fn current(&self) -> Option<Arc<Upstream>> {
        if self.holding() {
            return None;
        }
        self.upstream.load_full()
    }

    /// New requests are held now (a failover suspected or under way, or a
    /// planned switchover).
    #[inline]
    pub fn holding(&self) -> bool {
        self.topology.state() != State::Healthy || self.hold_all.load(Ordering::Acquire)
    }

    /// The upstream to send `requests` requests of `bytes` bytes to, holding
    /// the caller while a failover is suspected or under way, up to
    /// `sentinel.hold_ms`, and while the held total stays within
    /// `sentinel.hold_max_requests` and `sentinel.hold_max_bytes`.
    pub async fn upstream(&self, requests: usize, bytes: usize) -> Result<Arc<Upstream>, Error> {
        if let Some(u) = self.current() {
            return Ok(u);
        }
        let c = &self.config.sentinel;
        let held_requests = self.held_requests.fetch_add(requests, Ordering::AcqRel) + requests;
        let held_bytes = self.held_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let _release = Held(self, requests, bytes);
        if held_requests > c.hold_max_requests || held_bytes > c.hold_max_bytes {
            if held_requests > c.hold_max_requests {
                Limit::HoldMaxRequests.reached();
            }
            if held_bytes > c.hold_max_bytes {
                Limit::HoldMaxBytes.reached();
            }
            return Err(self.master_down(&format!(
                "and the hold queue is full (sentinel.hold_max_requests = {}, sentinel.hold_max_bytes = {})",
                c.hold_max_requests, c.hold_max_bytes
            )));
        }
        let hold = Duration::from_millis(c.hold_ms);
        let deadline = tokio::time::Instant::now() + hold;
        let mut changed = self.topology.subscribe();
        loop {
            if let Some(u) = self.current() {
                return Ok(u);
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                Limit::HoldMs.reached();
                return Err(
                    self.master_down(&format!("after {} ms (sentinel.hold_ms)", hold.as_millis()))
                );
            }
        }
    }

    /// `-MASTERDOWN no verified master for '<name>' (state: ...) <why>`.
    fn master_down(&self, why: &str) -> Error {
        let t = self.topology.snapshot();
        Error::upstream(
            Kind::MasterDown,
            format!(
                "no verified master for '{}' (state: {}) {why}",
                t.master_name.as_deref().unwrap_or("upstream"),
                t.state.name()
            ),
        )
    }

    /// Send a batch to the current master's shared pool for `proto` in
    /// database `db`.
    ///
    /// `generation` is the upstream generation the caller's previous batch
    /// went to (0: any). If the master has changed since, nothing is sent
    /// and `Sent::Moved` tells the caller to wait for its earlier replies
    /// first, so a batch can never overtake one still on the old master.
    ///
    /// Held while a failover is suspected or under way (see `upstream`).
    /// Following Sentinel, a pool with no live connection is not an error
    /// at once either: the master may be failing over, so the tracker is
    /// asked to check it now and the batch waits, within `sentinel.hold_ms`,
    /// for a connection or a new master.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        proto: Proto,
        db: i64,
        sticky: usize,
        bytes: &[u8],
        count: u32,
        meter: Option<&Arc<Meter>>,
        generation: u64,
    ) -> Result<Sent, Error> {
        let hold = Duration::from_millis(self.config.sentinel.hold_ms);
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            let up = self.upstream(count as usize, bytes.len()).await?;
            if generation != 0 && up.generation != generation {
                return Ok(Sent::Moved(up.generation));
            }
            let pool = up.pool_in(proto, db);
            match pool.send(sticky, bytes, count, meter.cloned()) {
                Ok(rx) => return Ok(Sent::Queued(up.generation, rx)),
                Err(e) if e.kind == Kind::Unavailable => {
                    if pool.wait_first(self.config.connect_timeout()).await {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    if !self.config.uses_sentinel() {
                        return Err(e);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        Limit::HoldMs.reached();
                        return Err(e);
                    }
                    self.check_master.notify_one();
                    let mut changed = self.topology.subscribe();
                    tokio::select! {
                        _ = pool.wait_live(deadline) => {}
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Hold (or release) every new request, for a planned switchover.
    pub fn set_hold_all(&self, hold: bool) {
        self.hold_all.store(hold, Ordering::Release);
        self.topology.poke();
    }

    /// Requests held right now.
    pub fn held(&self) -> usize {
        self.held_requests.load(Ordering::Acquire)
    }

    /// Start a new generation of connections to `address` and retire the
    /// old one (the tracker only).
    pub fn install(&self, address: &str) -> Arc<Upstream> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let up = Upstream::start(&self.config, address, generation, self.learned.clone());
        // Nothing cached from the previous master may be served after this.
        self.flush_cache();
        if let Some(old) = self.upstream.swap(Some(up.clone())) {
            old.retire();
        }
        up
    }

    fn flush_cache(&self) {
        if let Some(c) = &self.cache {
            c.store.flush(crate::cache::store::FlushReason::Topology);
        }
    }

    /// Keep replica connections for exactly `addrs` (the tracker only):
    /// unchanged addresses keep their connections, others are retired.
    pub fn set_read_replicas(&self, addrs: &[String]) {
        let old = self.read_replicas.load_full();
        if old.len() == addrs.len() && old.iter().zip(addrs).all(|(u, a)| u.address() == a) {
            return;
        }
        let mut next = Vec::with_capacity(addrs.len());
        for a in addrs {
            match old.iter().find(|u| u.address() == a) {
                Some(u) => next.push(u.clone()),
                None => {
                    let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                    // What a replica reports (its `databases` may differ)
                    // must not stand for the master's: clients' SELECTs
                    // are checked against the master's.
                    next.push(Upstream::start(
                        &self.config,
                        a,
                        generation,
                        Arc::new(Learned::default()),
                    ));
                }
            }
        }
        for u in old.iter() {
            if !addrs.iter().any(|a| a == u.address()) {
                u.retire();
            }
        }
        tracing::info!(replicas = ?addrs, "read replicas");
        self.read_replicas.store(Arc::new(next));
    }

    /// Send a read-only batch to a replica; `None` if there is none or it
    /// refused (the caller sends to the master instead).
    pub fn send_replica(
        &self,
        proto: Proto,
        db: i64,
        sticky: usize,
        bytes: &[u8],
        count: u32,
        meter: Option<Arc<Meter>>,
    ) -> Option<oneshot::Receiver<BatchResult>> {
        let replicas = self.read_replicas.load();
        if replicas.is_empty() {
            return None;
        }
        let up = &replicas[sticky % replicas.len()];
        up.pool_in(proto, db).send(sticky, bytes, count, meter).ok()
    }

    /// Retire the current generation: nothing more is sent to it.
    pub fn fence(&self) {
        self.flush_cache();
        if let Some(old) = self.upstream.swap(None) {
            old.retire();
        }
    }
}

/// The outcome of `Ctx::send`.
pub enum Sent {
    /// Queued on the given generation; the receiver gets the replies.
    Queued(u64, oneshot::Receiver<BatchResult>),
    /// Not sent: the master changed to this generation.
    Moved(u64),
}

/// Gives back a held request's share of the hold bounds when it leaves.
struct Held<'a>(&'a Ctx, usize, usize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held_requests.fetch_sub(self.1, Ordering::AcqRel);
        self.0.held_bytes.fetch_sub(self.2, Ordering::AcqRel);
    }
}

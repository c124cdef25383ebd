//! The client side: the listener, one session per connection, and the
//! replies keyward gives itself.

pub mod client;
pub mod listener;
pub mod local;
pub mod state;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Kind};
use crate::resp::Limits;
use crate::topology::{self, State};
use crate::upstream::{Learned, Upstream};

/// Everything sessions share, built once at start.
pub struct Ctx {
    pub config: Config,
    pub limits: Limits,
    /// Command table and server facts, kept across master changes.
    pub learned: Arc<Learned>,
    /// The current generation of upstream connections; `None` while no
    /// verified master may take traffic.
    pub upstream: ArcSwapOption<Upstream>,
    pub topology: topology::Shared,
    generation: AtomicU64,
    /// Permits for pinned connections (upstream.max_pinned).
    pub pinned: Arc<Semaphore>,
    pub next_client_id: AtomicU64,
    pub clients: AtomicUsize,
    /// Cancelled on SIGTERM/SIGINT: sessions stop reading new requests.
    pub shutdown: CancellationToken,
}

impl Ctx {
    pub fn new(config: Config, topology: topology::Topology, shutdown: CancellationToken) -> Ctx {
        Ctx {
            limits: Limits {
                max_bulk: config.server.max_bulk_bytes,
                max_request: config.server.max_request_bytes,
            },
            learned: Arc::new(Learned::default()),
            upstream: ArcSwapOption::empty(),
            topology: topology::Shared::new(topology),
            generation: AtomicU64::new(0),
            pinned: Arc::new(Semaphore::new(config.upstream.max_pinned)),
            next_client_id: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
            shutdown,
            config,
        }
    }

    /// The upstream to send to now, without waiting.
    #[inline]
    pub fn current(&self) -> Option<Arc<Upstream>> {
        if self.topology.state() != State::Healthy {
            return None;
        }
        self.upstream.load_full()
    }

    /// The upstream to send to, holding the caller while a failover is
    /// suspected or under way, up to `sentinel.hold_ms`.
    pub async fn upstream(&self) -> Result<Arc<Upstream>, Error> {
        if let Some(u) = self.current() {
            return Ok(u);
        }
        let hold = Duration::from_millis(self.config.sentinel.hold_ms);
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
                let t = self.topology.snapshot();
                return Err(Error::upstream(
                    Kind::MasterDown,
                    format!(
                        "no verified master for '{}' (state: {}) after {} ms (sentinel.hold_ms)",
                        t.master_name.as_deref().unwrap_or("upstream"),
                        t.state.name(),
                        hold.as_millis()
                    ),
                ));
            }
        }
    }

    /// Start a new generation of connections to `address` and retire the
    /// old one (the tracker only).
    pub fn install(&self, address: &str) -> Arc<Upstream> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let up = Upstream::start(&self.config, address, generation, self.learned.clone());
        if let Some(old) = self.upstream.swap(Some(up.clone())) {
            old.retire();
        }
        up
    }

    /// Retire the current generation: nothing more is sent to it.
    pub fn fence(&self) {
        if let Some(old) = self.upstream.swap(None) {
            old.retire();
        }
    }
}

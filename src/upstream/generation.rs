//! One generation of upstream connections: the shared pools (RESP2 and
//! RESP3) to one master, and the token that retires them.
//!
//! When the master changes, or is fenced because a failover is under way, the
//! whole generation is retired at once: its shared connections stop writing
//! (the fence flag is checked before every write) and close, and pinned
//! connections opened in it are shut down. A new generation is built for the
//! next verified master. Clients load the current generation per batch
//! (DESIGN.md decision 4), so no request is sent to a retired one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::connector::Settings;
use super::parked::Parked;
use super::pool::{Learned, Node, Pool};
use crate::config::Config;
use crate::resp::Proto;

pub struct Upstream {
    /// Increases by one with every master change or fence.
    pub generation: u64,
    pub node: Arc<Node>,
    pub pool2: Arc<Pool>,
    pub pool3: Arc<Pool>,
    /// Cancelled when the generation is retired.
    pub retired: CancellationToken,
    /// Dedicated connections kept for reuse (dropped with the generation).
    pub parked: Arc<Parked>,
}

impl Upstream {
    /// Start pools to `address`.
    pub fn start(
        config: &Config,
        address: &str,
        generation: u64,
        learned: Arc<Learned>,
    ) -> Arc<Upstream> {
        let u = &config.upstream;
        let node = Arc::new(Node {
            settings: Settings {
                address: address.to_string(),
                username: u.username.clone(),
                password: u.password.clone(),
                connect_timeout: config.connect_timeout(),
                command_timeout: config.command_timeout(),
            },
            max_inflight: u.max_inflight,
            backoff_min: Duration::from_millis(u.backoff_min_ms),
            backoff_max: Duration::from_millis(u.backoff_max_ms),
            learned,
            fenced: Arc::new(AtomicBool::new(false)),
            errors: Default::default(),
        });
        let retired = CancellationToken::new();
        let pool2 = Pool::start(node.clone(), Proto::Resp2, u.pool_size, retired.clone());
        let pool3 = Pool::start(node.clone(), Proto::Resp3, u.pool_size, retired.clone());
        Arc::new(Upstream {
            generation,
            node,
            pool2,
            pool3,
            retired,
            parked: Arc::new(Parked::new(u.max_idle_pinned)),
        })
    }

    #[inline]
    pub fn pool(&self, proto: Proto) -> &Arc<Pool> {
        match proto {
            Proto::Resp2 => &self.pool2,
            Proto::Resp3 => &self.pool3,
        }
    }

    pub fn address(&self) -> &str {
        &self.node.settings.address
    }

    /// Fence and close everything of this generation. Idempotent.
    pub fn retire(&self) {
        self.node.fenced.store(true, Ordering::Release);
        self.retired.cancel();
        self.parked.clear();
    }
}

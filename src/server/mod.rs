//! The client side: the listener, one session per connection, and the
//! replies keyward gives itself.

pub mod client;
pub mod listener;
pub mod local;
pub mod state;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::resp::{Limits, Proto};
use crate::upstream::{Node, Pool};

/// Everything sessions share, built once at start.
pub struct Ctx {
    pub config: Config,
    pub limits: Limits,
    pub node: Arc<Node>,
    pub pool2: Arc<Pool>,
    pub pool3: Arc<Pool>,
    /// Permits for pinned connections (upstream.max_pinned).
    pub pinned: Arc<Semaphore>,
    pub next_client_id: AtomicU64,
    pub clients: AtomicUsize,
    /// Cancelled on SIGTERM/SIGINT: sessions stop reading new requests.
    pub shutdown: CancellationToken,
}

impl Ctx {
    pub fn pool(&self, proto: Proto) -> &Arc<Pool> {
        match proto {
            Proto::Resp2 => &self.pool2,
            Proto::Resp3 => &self.pool3,
        }
    }
}

//! One generation of upstream connections: the shared pools to one master
//! (RESP2 and RESP3 for database 0 from the start; those of other databases
//! opened the first time a client uses one), and the token that retires them.
//!
//! When the master changes, or is fenced because a failover is under way, the
//! whole generation is retired at once: its shared connections stop writing
//! (the fence flag is checked before every write) and close, and pinned
//! connections opened in it are shut down. A new generation is built for the
//! next verified master. Clients load the current generation per batch
//! (DESIGN.md decision 4), so no request is sent to a retired one.
//!
//! The pool of a database other than 0 is closed once no client has used it
//! for `upstream.db_pool_idle_ms`, so connections follow the databases in
//! use rather than every database ever selected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::connector::Settings;
use super::parked::Parked;
use super::pool::{Learned, Node, Pool};
use crate::config::Config;
use crate::resp::Proto;

type DbPools = HashMap<(Proto, i64), Arc<Pool>>;

pub struct Upstream {
    /// Increases by one with every master change or fence.
    pub generation: u64,
    pub node: Arc<Node>,
    pub pool2: Arc<Pool>,
    pub pool3: Arc<Pool>,
    /// Shared pools of databases other than 0, by RESP version and database
    /// (DESIGN.md decision 3: the database is part of the pool key).
    dbs: Arc<Mutex<DbPools>>,
    pool_size: usize,
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
        let pool2 = Pool::start(node.clone(), Proto::Resp2, 0, u.pool_size, retired.clone());
        let pool3 = Pool::start(node.clone(), Proto::Resp3, 0, u.pool_size, retired.clone());
        let dbs = Arc::new(Mutex::new(HashMap::new()));
        if u.db_pool_idle_ms > 0 {
            let idle = Duration::from_millis(u.db_pool_idle_ms);
            tokio::spawn(close_idle(dbs.clone(), idle, retired.clone()));
        }
        Arc::new(Upstream {
            generation,
            node,
            pool2,
            pool3,
            dbs,
            pool_size: u.pool_size,
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

    /// The shared pool for `proto` in database `db`, started on first use.
    /// Callers pass only databases the upstream accepted (SELECT checked
    /// against its `databases`), so there are at most that many per version.
    pub fn pool_in(&self, proto: Proto, db: i64) -> Arc<Pool> {
        if db == 0 {
            return self.pool(proto).clone();
        }
        let mut dbs = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
        let pool = dbs
            .entry((proto, db))
            .or_insert_with(|| {
                Pool::start(
                    self.node.clone(),
                    proto,
                    db,
                    self.pool_size,
                    self.retired.clone(),
                )
            })
            .clone();
        // Under the map's lock, so the idle sweep never closes a pool a
        // sender has just been handed.
        pool.touch();
        pool
    }

    /// Every shared pool of this generation.
    fn pools(&self) -> Vec<Arc<Pool>> {
        let dbs = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = vec![self.pool2.clone(), self.pool3.clone()];
        all.extend(dbs.values().cloned());
        all
    }

    /// Requests in flight on every shared connection.
    pub fn pending(&self) -> usize {
        self.pools().iter().map(|p| p.pending()).sum()
    }

    /// Shared connections up now, in every database.
    pub fn live(&self) -> usize {
        self.pools().iter().map(|p| p.live()).sum()
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

/// Close the pools of databases other than 0 that no sender has used for
/// `idle` and that have nothing in flight, until the generation is retired.
async fn close_idle(dbs: Arc<Mutex<DbPools>>, idle: Duration, retired: CancellationToken) {
    let tick = (idle / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = retired.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let mut dbs = dbs.lock().unwrap_or_else(|e| e.into_inner());
        // Holders: the map's own reference only.
        dbs.retain(|&(proto, db), pool| {
            if !pool.idle_for(idle, 1) {
                return true;
            }
            tracing::debug!(
                ?proto,
                db,
                "closing the shared connections of an idle database"
            );
            pool.close();
            false
        });
    }
}

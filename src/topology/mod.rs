//! The upstream topology: which node is the master, in which epoch, and
//! whether it can be trusted right now.
//!
//! The tracker (static, or following Sentinel) is the only writer; it
//! publishes a new `Topology` snapshot through an `ArcSwap` and bumps a
//! `watch` counter so held requests wake up. The data path reads one atomic
//! (`state`) per batch; only when the state is not `Healthy` does it wait
//! (DESIGN.md decisions 4 and 5).

pub mod sentinel;
pub mod switchover;
pub mod timeline;

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

/// The tracker's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum State {
    /// No verified master yet.
    Discovering = 0,
    /// A ROLE-verified master takes traffic.
    Healthy = 1,
    /// The master may be failing (own pings fail, a Sentinel says +sdown):
    /// new requests are held.
    Suspect = 2,
    /// A failover is under way (+odown, +try-failover, ...): the old master
    /// gets no write again in this epoch; its connections are closed.
    Fenced = 3,
    /// A new master is named and being verified.
    Switching = 4,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Discovering,
        State::Healthy,
        State::Suspect,
        State::Fenced,
        State::Switching,
    ];

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Healthy,
            2 => State::Suspect,
            3 => State::Fenced,
            4 => State::Switching,
            _ => State::Discovering,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Discovering => "discovering",
            State::Healthy => "healthy",
            State::Suspect => "suspect",
            State::Fenced => "fenced",
            State::Switching => "switching",
        }
    }
}

/// One Sentinel as the tracker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentinelInfo {
    pub address: String,
    pub reachable: bool,
}

/// A snapshot of where traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// The verified master, if any.
    pub master: Option<String>,
    /// Sentinel config epoch of the master; 0 for a static upstream.
    pub epoch: u64,
    pub state: State,
    pub replicas: Vec<String>,
    pub sentinels: Vec<SentinelInfo>,
    /// The Sentinel master name, when following Sentinel.
    pub master_name: Option<String>,
    /// Unix time (ms) of the last state change.
    pub since_ms: u64,
}

/// The published topology.
pub struct Shared {
    snapshot: ArcSwap<Topology>,
    state: AtomicU8,
    changed: watch::Sender<u64>,
    timeline: std::sync::Mutex<timeline::Timeline>,
}

impl Shared {
    pub fn new(initial: Topology) -> Self {
        let state = initial.state as u8;
        Shared {
            snapshot: ArcSwap::from_pointee(initial),
            state: AtomicU8::new(state),
            changed: watch::channel(0).0,
            timeline: Default::default(),
        }
    }

    #[inline]
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn snapshot(&self) -> std::sync::Arc<Topology> {
        self.snapshot.load_full()
    }

    /// Publish a new snapshot (the tracker only).
    pub fn publish(&self, t: Topology) {
        self.publish_because(t, "")
    }

    /// Publish a new snapshot; `why` goes on the failover timeline.
    pub fn publish_because(&self, mut t: Topology, why: &str) {
        let old = self.snapshot.load();
        if old.state != t.state || old.master != t.master {
            t.since_ms = now_ms();
            self.timeline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .change(
                    t.since_ms,
                    (old.state, old.master.as_deref()),
                    (t.state, t.master.as_deref()),
                    why,
                );
        } else {
            t.since_ms = old.since_ms;
        }
        self.state.store(t.state as u8, Ordering::Release);
        self.snapshot.store(std::sync::Arc::new(t));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Wake everything waiting for a change without publishing one.
    pub fn poke(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// The failover under way, else the last one.
    pub fn last_failover(&self) -> Option<timeline::Failover> {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .latest()
            .cloned()
    }

    /// Failovers (episodes that ended on another master) since start.
    pub fn failovers(&self) -> u64 {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failovers
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

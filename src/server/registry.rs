//! The clients connected now, for `KEYWARD CLIENTS` and `/clients`.
//!
//! Each client publishes a small record that its reader updates once per
//! read (not per request): requests counted, last command name, when it was
//! last active, whether it holds a pinned connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use serde::Serialize;

/// Longest command name kept for display.
const MAX_CMD: usize = 32;

#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub since: Instant,
    /// Milliseconds after `since` of the last read with a request.
    active_ms: AtomicU64,
    requests: AtomicU64,
    pinned: AtomicBool,
    proto: AtomicU8,
    cmd: Mutex<String>,
}

impl ClientInfo {
    /// A read at `at` brought `n` requests.
    #[inline]
    pub fn active(&self, n: u64, at: Instant) {
        self.requests.fetch_add(n, Relaxed);
        self.active_ms.store(
            at.saturating_duration_since(self.since).as_millis() as u64,
            Relaxed,
        );
    }

    /// The client's last command is now `cmd` (called when it changes).
    pub fn set_cmd(&self, cmd: &[u8]) {
        let name = &cmd[..cmd.len().min(MAX_CMD)];
        let mut c = self.cmd.lock().unwrap_or_else(|e| e.into_inner());
        c.clear();
        c.extend(name.iter().map(|b| b.to_ascii_lowercase() as char));
    }

    pub fn set_pinned(&self, pinned: bool) {
        self.pinned.store(pinned, Relaxed);
    }

    pub fn set_proto(&self, v: u8) {
        self.proto.store(v, Relaxed);
    }

    pub fn view(&self) -> ClientView {
        let age = self.since.elapsed();
        let active = std::time::Duration::from_millis(self.active_ms.load(Relaxed));
        ClientView {
            id: self.id,
            addr: self.addr.to_string(),
            age_s: age.as_secs_f64(),
            idle_s: age.saturating_sub(active).as_secs_f64(),
            pinned: self.pinned.load(Relaxed),
            cmd: self.cmd.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            requests: self.requests.load(Relaxed),
            proto: self.proto.load(Relaxed),
        }
    }
}

/// One client as `/clients` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub id: u64,
    pub addr: String,
    pub age_s: f64,
    pub idle_s: f64,
    pub pinned: bool,
    /// The last command the client sent (lowercase), empty before any.
    pub cmd: String,
    pub requests: u64,
    pub proto: u8,
}

#[derive(Debug, Default)]
pub struct Registry {
    clients: DashMap<u64, Arc<ClientInfo>, ahash::RandomState>,
}

impl Registry {
    pub fn add(&self, id: u64, addr: SocketAddr) -> Arc<ClientInfo> {
        let info = Arc::new(ClientInfo {
            id,
            addr,
            since: Instant::now(),
            active_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            pinned: AtomicBool::new(false),
            proto: AtomicU8::new(2),
            cmd: Mutex::new(String::new()),
        });
        self.clients.insert(id, info.clone());
        info
    }

    pub fn remove(&self, id: u64) {
        self.clients.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Up to `max` clients, oldest connection first. Only those `max` are
    /// viewed and sorted: this runs on the data path's thread.
    pub fn list(&self, max: usize) -> Vec<ClientView> {
        let mut all: Vec<Arc<ClientInfo>> =
            self.clients.iter().map(|c| c.value().clone()).collect();
        if max < all.len() {
            all.select_nth_unstable_by_key(max, |c| c.id);
            all.truncate(max);
        }
        all.sort_unstable_by_key(|c| c.id);
        all.iter().map(|c| c.view()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_removes() {
        let r = Registry::default();
        let a = r.add(2, "127.0.0.1:1000".parse().unwrap());
        r.add(1, "127.0.0.1:1001".parse().unwrap());
        a.active(3, Instant::now());
        a.set_cmd(b"GET");
        a.set_pinned(true);
        let l = r.list(10);
        assert_eq!(l.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            (l[1].cmd.as_str(), l[1].requests, l[1].pinned),
            ("get", 3, true)
        );
        let first: Vec<u64> = r.list(1).iter().map(|c| c.id).collect();
        assert_eq!(first, vec![1], "the oldest connection first");
        r.remove(2);
        assert_eq!(r.len(), 1);
        assert_eq!(r.list(0).len(), 0);
    }
}

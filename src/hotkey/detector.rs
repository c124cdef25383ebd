//! The hot-key detector: sampling on the data path, windows, the hot rule.
//!
//! The data path pays a countdown per request (in the client session) and,
//! for one request in `sample_rate`, a hash and a few counter increments in
//! the structure of the thread it runs on. Each thread has its own
//! `HeavyHitters` behind a mutex that only that thread takes between window
//! rotations, so there is no shared atomic or contended lock on the hot path.
//!
//! Every window (1 s) a background task swaps every thread's structure for
//! an empty one, merges them, turns counts into rates (ops/s, scaled by the
//! sampling rate), applies the hot rule with hysteresis and publishes a
//! snapshot through an `ArcSwap`, plus the hot set through a `watch` for
//! subscribers (the near cache).
//!
//! Hot rule: a key becomes hot when its rate is at or above the threshold
//! for `enter_windows` consecutive windows, and stops being hot after
//! `leave_windows` consecutive windows below half the threshold.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::sketch::HeavyHitters;
use crate::config::HotkeysConfig;

/// One key in the published snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HotEntry {
    #[serde(serialize_with = "key_text")]
    pub key: Box<[u8]>,
    /// Estimated operations per second in the last window.
    pub rate: u64,
    /// Additive error bound of `rate` (ops/s).
    pub error: u64,
    pub hot: bool,
}

fn key_text<S: serde::Serializer>(k: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(k))
}

/// What the detector publishes each window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Keys by estimated rate, largest first (the top-K plus any still hot).
    pub keys: Vec<HotEntry>,
    pub window_ms: u64,
    pub sample_rate: u32,
    /// Windows rotated since start.
    pub windows: u64,
}

/// Per-key state for the hysteresis.
#[derive(Debug, Default)]
struct KeyState {
    above: u32,
    below: u32,
    hot: bool,
    /// The reported rate (ops/s): the window's rate, or half the previous
    /// report if that is more. A spike shows at once; a key that stops
    /// fades over a few windows instead of vanishing (the hot rule itself
    /// uses each window's own rate).
    rate: f64,
}

/// How much of the reported rate is left after a window without traffic.
const DECAY: f64 = 0.5;

type Local = Arc<Mutex<HeavyHitters>>;

/// The hot keys (ahash: looked up on the data path for every cacheable read).
pub type HotSet = HashSet<Box<[u8]>, ahash::RandomState>;

static NEXT_DETECTOR: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's structure, per detector (tests may run several).
    static LOCAL: RefCell<Vec<(u64, Local)>> = const { RefCell::new(Vec::new()) };
}

pub struct Detector {
    id: u64,
    pub config: HotkeysConfig,
    /// Every thread's structure, for the window task.
    locals: Mutex<Vec<Local>>,
    snapshot: ArcSwap<Snapshot>,
    hot: watch::Sender<Arc<HotSet>>,
    /// Samples taken (sum over closed windows) and hot keys now.
    pub samples: AtomicU64,
    pub hot_now: AtomicU64,
    pub rotations: AtomicU64,
    /// Keys declared hot at start (the near cache's warm-up), taken into
    /// the hot rule's state by the next rotation.
    seeds: Mutex<Vec<Box<[u8]>>>,
}

impl Detector {
    pub fn new(config: HotkeysConfig) -> Arc<Detector> {
        Arc::new(Detector {
            id: NEXT_DETECTOR.fetch_add(1, Ordering::Relaxed),
            snapshot: ArcSwap::from_pointee(Snapshot {
                window_ms: config.window_ms,
                sample_rate: config.sample_rate,
                ..Default::default()
            }),
            config,
            locals: Mutex::new(Vec::new()),
            hot: watch::channel(Arc::new(HotSet::default())).0,
            samples: AtomicU64::new(0),
            hot_now: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            seeds: Mutex::new(Vec::new()),
        })
    }

    /// Record one sampled key (weight 1) in this thread's structure.
    #[inline]
    pub fn record(&self, key: &[u8]) {
        LOCAL.with(|l| {
            // Fast path: this thread's structure exists; no Arc clone.
            if let Some((_, local)) = l.borrow().iter().find(|(id, _)| *id == self.id) {
                local.lock().unwrap_or_else(|e| e.into_inner()).add(key, 1);
                return;
            }
            let local = Arc::new(Mutex::new(HeavyHitters::new(self.config.top_k)));
            self.locals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(local.clone());
            local.lock().unwrap_or_else(|e| e.into_inner()).add(key, 1);
            l.borrow_mut().push((self.id, local));
        });
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Subscribe to the hot set (replaced as a whole when it changes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<HotSet>> {
        self.hot.subscribe()
    }

    /// Declare `keys` hot now (warm-up from a saved list). They stay hot
    /// until the hot rule sees them cold for `leave_windows` windows.
    pub fn seed_hot(&self, keys: Vec<Box<[u8]>>) {
        if keys.is_empty() {
            return;
        }
        let mut hot: HotSet = (**self.hot.borrow()).clone();
        hot.extend(keys.iter().cloned());
        self.hot_now.store(hot.len() as u64, Ordering::Relaxed);
        self.hot.send_replace(Arc::new(hot));
        self.seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keys);
    }

    /// Is `key` hot now?
    pub fn is_hot(&self, key: &[u8]) -> bool {
        self.hot.borrow().contains(key)
    }

    /// Rotate windows until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let window = Duration::from_millis(self.config.window_ms);
        let mut tick = tokio::time::interval(window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut states: HashMap<Box<[u8]>, KeyState> = HashMap::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.rotate(&mut states);
        }
    }

    /// Close one window: merge, rate, apply the hot rule, publish.
    pub fn rotate_now(&self) {
        // For tests and tools: a rotation outside the task uses fresh state.
        let mut states = HashMap::new();
        self.rotate(&mut states);
    }

    fn rotate(&self, states: &mut HashMap<Box<[u8]>, KeyState>) {
        let c = &self.config;
        let mut merged = HeavyHitters::new(c.top_k);
        let locals: Vec<Local> = self
            .locals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for local in locals {
            let taken = {
                let mut l = local.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::replace(&mut *l, HeavyHitters::new(c.top_k))
            };
            merged.merge(&taken);
        }
        for key in std::mem::take(&mut *self.seeds.lock().unwrap_or_else(|e| e.into_inner())) {
            let st = states.entry(key).or_default();
            st.hot = true;
        }
        let secs = c.window_ms as f64 / 1000.0;
        let scale = c.sample_rate as f64 / secs;
        let error = (merged.sketch.error_bound() as f64 * scale) as u64;
        self.samples
            .fetch_add(merged.sketch.total(), Ordering::Relaxed);
        let mut rates: HashMap<Box<[u8]>, u64> = HashMap::new();
        for e in merged.top.sorted() {
            rates.insert(e.key, (e.count as f64 * scale) as u64);
        }
        // The hot rule, over the keys seen now and the keys still tracked.
        let threshold = c.threshold;
        let mut changed = false;
        let keys: HashSet<Box<[u8]>> = rates
            .keys()
            .cloned()
            .chain(states.keys().cloned())
            .collect();
        for key in keys {
            let rate = rates.get(&key).copied().unwrap_or(0);
            let st = states.entry(key.clone()).or_default();
            st.rate = (rate as f64).max(st.rate * DECAY);
            if rate >= threshold {
                st.above += 1;
                st.below = 0;
            } else {
                st.above = 0;
                if rate * 2 < threshold {
                    st.below += 1;
                } else {
                    st.below = 0;
                }
            }
            if !st.hot && st.above >= c.enter_windows {
                st.hot = true;
                changed = true;
                tracing::info!(key = %show(&key), rate, threshold, "hot key: entered");
            } else if st.hot && st.below >= c.leave_windows {
                st.hot = false;
                changed = true;
                tracing::info!(key = %show(&key), rate, threshold, "hot key: left");
            }
        }
        // Forget keys that are neither hot, warming up, seen now, nor still
        // fading out (a few windows; the map stays bounded by the top-K).
        let forget_below = (threshold as f64 / 16.0).max(1.0);
        states.retain(|k, st| {
            st.hot || st.above > 0 || rates.contains_key(k) || st.rate >= forget_below
        });
        let mut entries: Vec<HotEntry> = states
            .iter()
            .map(|(k, st)| HotEntry {
                key: k.clone(),
                rate: st.rate as u64,
                error,
                hot: st.hot,
            })
            .collect();
        entries.sort_by(|a, b| b.rate.cmp(&a.rate).then_with(|| a.key.cmp(&b.key)));
        let hot: HotSet = entries
            .iter()
            .filter(|e| e.hot)
            .map(|e| e.key.clone())
            .collect();
        self.hot_now.store(hot.len() as u64, Ordering::Relaxed);
        if changed {
            self.hot.send_replace(Arc::new(hot));
        }
        let windows = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
        self.snapshot.store(Arc::new(Snapshot {
            keys: entries,
            window_ms: c.window_ms,
            sample_rate: c.sample_rate,
            windows,
        }));
    }
}

/// A key for a log line: printable, at most 128 bytes.
fn show(key: &[u8]) -> String {
    let cut = &key[..key.len().min(128)];
    let mut s = cut.escape_ascii().to_string();
    if key.len() > 128 {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HotkeysConfig {
        HotkeysConfig {
            threshold: 100,
            window_ms: 1000,
            sample_rate: 1,
            ..HotkeysConfig::default()
        }
    }

    fn rates(d: &Detector) -> Vec<(Vec<u8>, u64, bool)> {
        d.snapshot()
            .keys
            .iter()
            .map(|e| (e.key.to_vec(), e.rate, e.hot))
            .collect()
    }

    #[test]
    fn hot_rule_with_hysteresis() {
        let d = Detector::new(config());
        let mut states = HashMap::new();
        let window = |d: &Detector, states: &mut HashMap<Box<[u8]>, KeyState>, n: u32| {
            for _ in 0..n {
                d.record(b"hot");
            }
            d.record(b"cold");
            d.rotate(states);
        };
        // One window above the threshold is not enough; two are.
        window(&d, &mut states, 150);
        assert!(!d.is_hot(b"hot"));
        window(&d, &mut states, 150);
        assert!(d.is_hot(b"hot"));
        assert_eq!(rates(&d)[0], (b"hot".to_vec(), 150, true));
        // Between half the threshold and the threshold: stays hot. The
        // reported rate fades from 150 (half of it, 75, is more than 60)
        // and then follows the windows.
        window(&d, &mut states, 60);
        assert_eq!(rates(&d)[0].1, 75, "{:?}", rates(&d));
        for _ in 0..9 {
            window(&d, &mut states, 60);
            assert_eq!(rates(&d)[0].1, 60, "{:?}", rates(&d));
        }
        assert!(d.is_hot(b"hot"));
        // Below half for four windows: still hot; the fifth: leaves.
        for i in 0..4 {
            window(&d, &mut states, 10);
            assert!(
                d.is_hot(b"hot"),
                "left after {} windows below half: {:?}",
                i + 1,
                rates(&d)
            );
        }
        window(&d, &mut states, 10);
        assert!(!d.is_hot(b"hot"));
        assert!(!d.is_hot(b"cold"));
    }

    /// A key that stops is reported at half its rate each window, then
    /// forgotten; one that comes back is reported at its new rate at once.
    #[test]
    fn rates_decay_over_a_few_windows() {
        let d = Detector::new(HotkeysConfig {
            threshold: 1000,
            ..config()
        });
        let mut states = HashMap::new();
        for _ in 0..800 {
            d.record(b"burst");
        }
        d.rotate(&mut states);
        assert_eq!(rates(&d), vec![(b"burst".to_vec(), 800, false)]);
        let mut seen = Vec::new();
        for _ in 0..6 {
            d.rotate(&mut states);
            seen.push(rates(&d).first().map(|r| r.1));
        }
        assert_eq!(
            seen,
            vec![Some(400), Some(200), Some(100), None, None, None],
            "halves each quiet window, forgotten below threshold/16"
        );
        for _ in 0..300 {
            d.record(b"burst");
        }
        d.rotate(&mut states);
        assert_eq!(rates(&d)[0].1, 300, "back at its new rate at once");
    }

    #[test]
    fn threads_are_merged() {
        let d = Detector::new(config());
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..50 {
                        d.record(b"shared");
                    }
                });
            }
        });
        d.rotate_now();
        assert_eq!(rates(&d)[0], (b"shared".to_vec(), 150, false));
        assert_eq!(d.samples.load(Ordering::Relaxed), 150);
    }

    /// The top keys change: a newly hot key is reported within 2 windows,
    /// a cooled one leaves within 6, with the default rule and sampling.
    #[test]
    fn shifting_workload() {
        let d = Detector::new(HotkeysConfig {
            threshold: 1000,
            window_ms: 1000,
            ..HotkeysConfig::default()
        });
        let mut states = HashMap::new();
        // Sampled traffic of one window: the hot key at 4,000 ops/s, 200
        // background keys at 20 ops/s each (1 in 8 sampled).
        let window = |states: &mut HashMap<Box<[u8]>, KeyState>, hot: &[u8]| {
            for _ in 0..4000 / 8 {
                d.record(hot);
            }
            for i in 0..200 {
                for _ in 0..20 / 8 + 1 {
                    d.record(format!("bg:{i}").as_bytes());
                }
            }
            d.rotate(states);
        };
        for w in 1..=4 {
            window(&mut states, b"first");
            assert_eq!(d.is_hot(b"first"), w >= 2, "window {w}");
        }
        let mut first_left = None;
        let mut second_hot = None;
        for w in 1..=8 {
            window(&mut states, b"second");
            if second_hot.is_none() && d.is_hot(b"second") {
                second_hot = Some(w);
            }
            if first_left.is_none() && !d.is_hot(b"first") {
                first_left = Some(w);
            }
        }
        assert!(
            second_hot.is_some_and(|w| w <= 2),
            "second became hot after {second_hot:?} windows"
        );
        assert!(
            first_left.is_some_and(|w| w <= 6),
            "first left after {first_left:?} windows"
        );
        assert!((0..200).all(|i| !d.is_hot(format!("bg:{i}").as_bytes())));
    }
}

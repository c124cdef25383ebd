//! Making keys hot for near-cache tests: a config that finds hot keys
//! quickly, and a paced background load that keeps keys hot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

use super::raw::Raw;
use super::resp::{cmd, esc};
use super::DEADLINE;

/// A `[hotkeys]` section for fast detection: a key is hot after two 200 ms
/// windows above 100 ops/s; no fleet view (it would write to Redis).
pub const FAST_HOTKEYS: &str = "[hotkeys]\nwindow_ms = 200\nthreshold = 100\nfleet = false\n";

/// The background load that keeps keys hot: batches of [`HotLoad::BATCH`]
/// pipelined requests (cycling through `cmds`) every [`HotLoad::PACE`]
/// (2,500 requests/s, far above a 100 ops/s hot threshold) on one RESP2
/// connection through keyward, until stopped. An error reply fails the test
/// when the load is stopped.
///
/// [`HotLoad::pause`] holds the load between batches, so a test can send a
/// request while no other traffic moves keyward's counters; a pause of a
/// few hundred ms does not cool a key.
pub struct HotLoad {
    stop: Arc<AtomicBool>,
    gate: Arc<Mutex<()>>,
    task: Option<JoinHandle<u64>>,
}

impl HotLoad {
    /// Requests per batch.
    pub const BATCH: usize = 50;
    /// Time between batches.
    pub const PACE: Duration = Duration::from_millis(20);

    /// Start the load on 127.0.0.1:`port`; any error reply fails the test.
    pub async fn start(port: u16, cmds: &[&[&[u8]]]) -> HotLoad {
        HotLoad::launch(port, cmds, false).await
    }

    /// Like [`HotLoad::start`], but `-WRONGTYPE` (Redis's own answer to a
    /// GET of a hash) is an expected reply rather than a failure.
    pub async fn start_allowing_wrongtype(port: u16, cmds: &[&[&[u8]]]) -> HotLoad {
        HotLoad::launch(port, cmds, true).await
    }

    async fn launch(port: u16, cmds: &[&[&[u8]]], allow_wrongtype: bool) -> HotLoad {
        let batch: Vec<u8> = (0..Self::BATCH)
            .flat_map(|i| cmd(cmds[i % cmds.len()]))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Mutex::new(()));
        let mut raw = Raw::connect(port).await;
        let task = tokio::spawn({
            let (stop, gate) = (stop.clone(), gate.clone());
            async move {
                let mut pace = tokio::time::interval(Self::PACE);
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut sent = 0u64;
                while !stop.load(Ordering::Acquire) {
                    pace.tick().await;
                    let _held = gate.lock().await;
                    raw.send(&batch).await;
                    for reply in raw.read_replies(Self::BATCH).await {
                        assert!(
                            !reply.starts_with(b"-")
                                || (allow_wrongtype && reply.starts_with(b"-WRONGTYPE")),
                            "hot-key load got an error reply: {}",
                            esc(&reply)
                        );
                    }
                    sent += Self::BATCH as u64;
                }
                sent
            }
        });
        HotLoad {
            stop,
            gate,
            task: Some(task),
        }
    }

    /// Hold the load (after its current batch) until the guard is dropped.
    pub async fn pause(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// Stop the load and surface any failure it saw; returns requests sent.
    pub async fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let task = self.task.take().expect("load task");
        match tokio::time::timeout(DEADLINE, task).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("hot-key load did not stop within {DEADLINE:?}"),
        }
    }
}

impl Drop for HotLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

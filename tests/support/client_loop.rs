//! A background client through keyward that sends one request at a time,
//! as fast as replies come back, and records how each ended: the writer
//! (`SET <prefix>:<i> <i>`) and reader (`GET key`) of the failover tests,
//! and what those tests read out of a writer's record afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::conn::{Answer, Conn, REPLY_LIMIT};
use super::redis::redis_cmd;
use super::resp::{cmd, esc};
use super::runtime::within;
use super::sentinel::{parse_reply, Reply};
use super::POLL;

/// Error replies a write may get while no master takes writes: keyward's
/// own `-ERR ...` (e.g. outcome unknown), `-MASTERDOWN` once a hold runs
/// out, `-TRYAGAIN`. Notably not `-READONLY`, which would mean a write
/// reached a replica.
pub const OUTAGE_ERRORS: [&[u8]; 3] = [b"-ERR", b"-MASTERDOWN", b"-TRYAGAIN"];

/// One request a [`ClientLoop`] sent, and how it ended.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The request's number on its loop: 1, 2, 3, ...
    pub i: u64,
    pub sent: Instant,
    pub answered: Instant,
    pub answer: Answer,
}

impl Exchange {
    /// Answered `+OK` (for a write: acknowledged).
    pub fn ok(&self) -> bool {
        matches!(&self.answer, Answer::Reply(r) if r == b"+OK\r\n")
    }

    /// The error reply, if the answer was one.
    pub fn error(&self) -> Option<&[u8]> {
        match &self.answer {
            Answer::Reply(r) if r.starts_with(b"-") => Some(r),
            _ => None,
        }
    }
}

/// A background task sending requests through keyward one at a time, as
/// fast as replies come back, on one client connection (a new one only
/// after keyward dropped it or did not answer, since that connection's
/// state is unknown). Every outcome is recorded with when it was sent and
/// answered, so the test can check each one afterwards.
pub struct ClientLoop {
    name: &'static str,
    log: Arc<Mutex<Vec<Exchange>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl ClientLoop {
    /// A writer: `SET <prefix>:<i> <i>` for i = 1, 2, 3, ...
    pub fn writer(port: u16, prefix: &'static str) -> ClientLoop {
        ClientLoop::start(port, "writer", move |i| {
            let (key, val) = (format!("{prefix}:{i}"), i.to_string());
            cmd(&[b"SET", key.as_bytes(), val.as_bytes()])
        })
    }

    /// A reader: `GET key`, again and again.
    pub fn reader(port: u16, key: &'static [u8]) -> ClientLoop {
        let request = cmd(&[b"GET", key]);
        ClientLoop::start(port, "reader", move |_| request.clone())
    }

    /// Send `request(i)` for i = 1, 2, 3, ... until stopped.
    fn start(
        port: u16,
        name: &'static str,
        request: impl FnMut(u64) -> Vec<u8> + Send + 'static,
    ) -> ClientLoop {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(port, request, log.clone(), stop.clone()));
        ClientLoop {
            name,
            log,
            stop,
            task,
        }
    }

    /// The record so far (hold the guard briefly: the task waits on it).
    pub fn log(&self) -> MutexGuard<'_, Vec<Exchange>> {
        self.log.lock().unwrap()
    }

    /// Requests answered `+OK` so far.
    pub fn oks(&self) -> usize {
        self.log().iter().filter(|w| w.ok()).count()
    }

    /// The first request answered `+OK` that was sent at or after `t`.
    pub fn first_ok_sent_after(&self, t: Instant) -> Option<Exchange> {
        self.log().iter().find(|w| w.sent >= t && w.ok()).cloned()
    }

    /// Requests answered `+OK` that were sent at or after `t`.
    pub fn oks_sent_after(&self, t: Instant) -> usize {
        self.log().iter().filter(|w| w.sent >= t && w.ok()).count()
    }

    /// Stop after the request in flight and return the full record.
    pub async fn stop(self) -> Vec<Exchange> {
        self.stop.store(true, Ordering::SeqCst);
        let name = self.name;
        within(REPLY_LIMIT * 2, &format!("stopping the {name}"), self.task)
            .await
            .unwrap_or_else(|e| panic!("{name} task panicked: {e:?}"));
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

async fn run(
    port: u16,
    mut request: impl FnMut(u64) -> Vec<u8>,
    log: Arc<Mutex<Vec<Exchange>>>,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<Conn> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            conn = Conn::try_connect(port).await;
            if conn.is_none() {
                // keyward itself unreachable: not a request outcome; the
                // test notices through its own deadlines.
                tokio::time::sleep(POLL).await;
                continue;
            }
        }
        let c = conn.as_mut().expect("connected");
        i += 1;
        let request = request(i);
        let sent = Instant::now();
        let answer = c.request(&request).await;
        if !matches!(answer, Answer::Reply(_)) {
            conn = None; // the connection's state is unknown; start afresh
        }
        log.lock().unwrap().push(Exchange {
            i,
            sent,
            answered: Instant::now(),
            answer,
        });
    }
}

/// The writes among `writes` (made by [`ClientLoop::writer`] with `prefix`)
/// whose key `<prefix>:<i>` is missing on the node at `port` or holds
/// another value than `i`, with what was found.
pub fn missing_on(port: u16, prefix: &str, writes: &[&Exchange]) -> Vec<(u64, Option<String>)> {
    let mut bad = Vec::new();
    for batch in writes.chunks(500) {
        let keys: Vec<String> = batch.iter().map(|w| format!("{prefix}:{}", w.i)).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        let reply = redis_cmd(port, &args);
        let values = parse_reply(&reply)
            .ok()
            .and_then(Reply::array)
            .unwrap_or_else(|| panic!("MGET on 127.0.0.1:{port}: {}", esc(&reply)));
        assert_eq!(values.len(), batch.len(), "MGET reply length");
        for (w, v) in batch.iter().zip(values) {
            let got = v.text();
            if got.as_deref() != Some(w.i.to_string().as_str()) {
                bad.push((w.i, got));
            }
        }
    }
    bad
}

/// Error replies in `record` by kind (first 60 characters) with counts.
pub fn error_summary(record: &[Exchange]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for e in record.iter().filter_map(Exchange::error) {
        let text = String::from_utf8_lossy(e);
        let head: String = text.trim_end().chars().take(60).collect();
        match kinds.iter_mut().find(|(k, _)| *k == head) {
            Some((_, n)) => *n += 1,
            None => kinds.push((head, 1)),
        }
    }
    format!("{kinds:?}")
}

/// Longest time between two consecutive `+OK` answers: for a writer, the
/// write outage a client saw.
pub fn longest_ack_gap(record: &[Exchange]) -> Duration {
    let acks: Vec<Instant> = record
        .iter()
        .filter(|w| w.ok())
        .map(|w| w.answered)
        .collect();
    acks.windows(2)
        .map(|p| p[1].duration_since(p[0]))
        .max()
        .unwrap_or_default()
}

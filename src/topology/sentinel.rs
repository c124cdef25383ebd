//! The Sentinel tracker: finds the master through every Sentinel, watches
//! their events, checks the master itself, and moves traffic on failover.
//!
//! It subscribes to every Sentinel before it first queries them, so no event
//! falls between the two, and also polls them (about 1 s normally, 100 ms
//! while something is wrong) because pub/sub can lose messages. A master is
//! adopted only after `ROLE` on it says `master`, and never in a lower
//! config epoch than the current one.
//!
//! States (see `topology::State`): a failing own check or `+sdown` makes the
//! master Suspect and new requests are held; `+odown`, `+try-failover`,
//! `+elected-leader` or a demoted master Fence it: its connections are
//! retired and nothing more is written to it; `+switch-master`,
//! `+promoted-slave` or a poll showing another master in a higher epoch
//! start the Switch: ROLE is verified on the new master, a new generation of
//! connections is installed and held requests go on. Every change is logged
//! with its timing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{SentinelInfo, State, Topology};
use crate::error::{Error, Kind};
use crate::resp::{Proto, Scanner};
use crate::server::Ctx;
use crate::upstream::{connector, Settings};

/// How often the replica a failover selected is asked for its ROLE.
const CANDIDATE_POLL: Duration = Duration::from_millis(10);
/// How long it may take to become master before keyward stops watching.
const CANDIDATE_WAIT: Duration = Duration::from_secs(30);

/// One event from a Sentinel's pub/sub, e.g. `+switch-master`.
#[derive(Debug, Clone)]
struct Event {
    channel: String,
    payload: String,
}

/// What one Sentinel said in a poll.
#[derive(Debug, Default)]
struct Report {
    master: Option<(String, u64, String)>,
    /// Sentinels that must agree the master is down to fail it over.
    quorum: Option<usize>,
    replicas: Vec<String>,
    sentinels: Vec<String>,
}

struct Tracker {
    ctx: Arc<Ctx>,
    name: String,
    sentinel: Settings,
    upstream: Settings,
    /// Configured and learned Sentinels, with reachability.
    sentinels: BTreeMap<String, bool>,
    master: Option<String>,
    epoch: u64,
    state: State,
    replicas: Vec<String>,
    failed_checks: u32,
    /// A Sentinel reported +sdown for the master and no -sdown since.
    sdown: bool,
    /// Highest epoch announced by +new-epoch (a failover under way).
    pending_epoch: u64,
    /// The replica the failover leader selected, watched until it is master.
    candidate: Option<(String, Instant)>,
    /// Why the state is changing, for the failover timeline.
    reason: String,
    /// A ROLE check on the master is running; its result comes on `checks`.
    checking: bool,
    checks: mpsc::Sender<(String, Result<String, Error>)>,
    /// The connection the master's ROLE checks use, kept between them.
    check_conn: KeptConn,
    events: mpsc::Sender<Event>,
    subscribed: BTreeSet<String>,
    /// An event asked for a poll of the Sentinels (started by `run`).
    want_poll: bool,
}

/// What every Sentinel answered to one poll.
type PollResults = Vec<(String, Result<Report, Error>)>;

/// Run the tracker until shutdown.
pub async fn run(ctx: Arc<Ctx>) {
    let cfg = ctx.config.sentinel.clone();
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let (tx, mut rx) = mpsc::channel(1024);
    let (check_tx, mut check_rx) = mpsc::channel(4);
    let mut t = Tracker {
        name: cfg.master_name.clone(),
        sentinel: Settings {
            address: String::new(),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            connect_timeout: timeout,
            command_timeout: timeout,
        },
        upstream: Settings {
            address: String::new(),
            username: ctx.config.upstream.username.clone(),
            password: ctx.config.upstream.password.clone(),
            connect_timeout: timeout,
            command_timeout: timeout,
        },
        sentinels: cfg.addresses.iter().map(|a| (a.clone(), false)).collect(),
        master: None,
        epoch: 0,
        state: State::Discovering,
        replicas: Vec::new(),
        failed_checks: 0,
        sdown: false,
        pending_epoch: 0,
        candidate: None,
        reason: String::new(),
        checking: false,
        checks: check_tx,
        check_conn: KeptConn::default(),
        events: tx,
        subscribed: BTreeSet::new(),
        want_poll: false,
        ctx,
    };
    // Subscribe first, then query: no event can fall between the two.
    t.subscribe_all();
    t.poll().await;
    let mut check = tokio::time::interval(Duration::from_millis(cfg.ping_ms));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_poll = tokio::time::Instant::now() + t.poll_interval();
    let shutdown = t.ctx.shutdown.clone();
    // A poll runs in a task of its own: a Sentinel that does not answer
    // costs it up to 2 x sentinel.timeout_ms, and meanwhile events (a
    // +try-failover that must fence at once) and checks go on.
    let mut polling: Option<tokio::task::JoinHandle<PollResults>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(ev) = rx.recv() => {
                t.on_event(ev).await;
                next_poll = tokio::time::Instant::now() + t.poll_interval();
            }
            done = async { polling.as_mut().expect("guarded").await }, if polling.is_some() => {
                polling = None;
                if let Ok(results) = done {
                    t.apply_poll(results).await;
                }
                next_poll = tokio::time::Instant::now() + t.poll_interval();
            }
            _ = tokio::time::sleep_until(next_poll), if polling.is_none() => t.want_poll = true,
            _ = check.tick() => t.check_master(),
            Some((master, result)) = check_rx.recv() => t.on_check(master, result),
            _ = tokio::time::sleep(CANDIDATE_POLL), if t.candidate.is_some() => t.check_candidate().await,
            // A shared connection lost the master: check now, not at the tick.
            _ = t.ctx.check_master.notified() => t.check_master(),
        }
        if t.want_poll && polling.is_none() {
            t.want_poll = false;
            polling = Some(t.spawn_poll());
        }
    }
}

impl Tracker {
    fn poll_interval(&self) -> Duration {
        let c = &self.ctx.config.sentinel;
        Duration::from_millis(if self.state == State::Healthy {
            c.poll_ms
        } else {
            c.suspect_poll_ms
        })
    }

    fn subscribe_all(&mut self) {
        for addr in self.sentinels.keys().cloned().collect::<Vec<_>>() {
            if self.subscribed.insert(addr.clone()) {
                let mut settings = self.sentinel.clone();
                settings.address = addr;
                tokio::spawn(subscribe(
                    settings,
                    self.events.clone(),
                    self.ctx.shutdown.clone(),
                ));
            }
        }
    }

    /// Publish the snapshot for the admin side and the data path.
    fn publish(&mut self) {
        let why = std::mem::take(&mut self.reason);
        self.ctx.topology.publish_because(
            Topology {
                master: self.master.clone(),
                epoch: self.epoch,
                state: self.state,
                // Sentinels list the promoted replica among the replicas for a
                // moment after a failover: show the master once.
                replicas: self
                    .replicas
                    .iter()
                    .filter(|r| Some(*r) != self.master.as_ref())
                    .cloned()
                    .collect(),
                sentinels: self
                    .sentinels
                    .iter()
                    .map(|(a, r)| SentinelInfo {
                        address: a.clone(),
                        reachable: *r,
                    })
                    .collect(),
                master_name: Some(self.name.clone()),
                since_ms: 0,
            },
            &why,
        );
    }

    fn set_state(&mut self, state: State, why: &str) {
        if self.state != state {
            tracing::info!(
                from = self.state.name(),
                to = state.name(),
                master = self.master.as_deref().unwrap_or("-"),
                epoch = self.epoch,
                reason = why,
                "topology state change"
            );
            self.state = state;
            self.reason = why.to_string();
        }
        self.publish();
    }

    /// Ask every Sentinel, in parallel, what it knows, and act on it.
    async fn poll(&mut self) {
        if let Ok(results) = self.spawn_poll().await {
            self.apply_poll(results).await;
        }
    }

    /// Ask every Sentinel, in parallel, in a task of its own.
    fn spawn_poll(&self) -> tokio::task::JoinHandle<PollResults> {
        let mut set = JoinSet::new();
        for addr in self.sentinels.keys() {
            let mut s = self.sentinel.clone();
            s.address = addr.clone();
            let name = self.name.clone();
            set.spawn(async move {
                let r = query(&s, &name).await;
                (s.address, r)
            });
        }
        tokio::spawn(async move {
            let mut results = Vec::new();
            while let Some(Ok(r)) = set.join_next().await {
                results.push(r);
            }
            results
        })
    }

    /// Act on what the Sentinels said.
    async fn apply_poll(&mut self, results: PollResults) {
        let mut reports = Vec::new();
        for (addr, r) in results {
            match r {
                Ok(rep) => {
                    self.sentinels.insert(addr, true);
                    reports.push(rep);
                }
                Err(e) => {
                    if self.sentinels.get(&addr) == Some(&true) {
                        tracing::warn!(sentinel = %addr, error = %e.detail, "sentinel unreachable");
                    }
                    self.sentinels.insert(addr, false);
                }
            }
        }
        // Learn Sentinels the others know about.
        for rep in &reports {
            for s in &rep.sentinels {
                if !self.sentinels.contains_key(s) {
                    tracing::info!(sentinel = %s, "learned a new sentinel");
                    self.sentinels.insert(s.clone(), false);
                }
            }
        }
        self.subscribe_all();
        // The address with the highest epoch; ties go to the most votes.
        let mut votes: BTreeMap<(u64, String), usize> = BTreeMap::new();
        for rep in &reports {
            if let Some((addr, epoch, _)) = &rep.master {
                *votes.entry((*epoch, addr.clone())).or_default() += 1;
            }
        }
        if let Some(rep) = reports.iter().find(|r| r.master.is_some()) {
            if rep.replicas != self.replicas {
                self.replicas = rep.replicas.clone();
            }
        }
        self.refresh_read_replicas().await;
        let best = votes
            .iter()
            .max_by(|a, b| a.0 .0.cmp(&b.0 .0).then(a.1.cmp(b.1)))
            .map(|((e, a), _)| (a.clone(), *e));
        let Some((addr, epoch)) = best else {
            self.publish();
            return;
        };
        // Sentinels that name this master in this epoch and see it down or
        // failing over (reports about a replaced master do not count).
        let odown = flagged(
            &reports,
            &addr,
            Some(epoch),
            &["o_down", "failover_in_progress"],
        );
        if epoch < self.epoch {
            let agree = votes.get(&(epoch, addr.clone())).copied().unwrap_or(0);
            if self.state == State::Fenced && agree * 2 > self.sentinels.len() {
                // keyward's epoch came from a failover the Sentinels did
                // not complete (it adopted the replica they selected, which
                // turned master after they gave up), and what it follows
                // is fenced: a majority of them agree on this master, and
                // none knows a newer one. Follow them, ROLE verified.
                tracing::warn!(master = %addr, epoch, ours = self.epoch, agree, "a majority of sentinels name a master in a lower epoch; following them");
                self.epoch = epoch;
                self.switch(addr, epoch, "a majority of sentinels name this master")
                    .await;
                return;
            }
            // Never move to a lower epoch.
            self.publish();
            return;
        }
        if Some(&addr) == self.master.as_ref() {
            self.epoch = self.epoch.max(epoch);
            let down = flagged(&reports, &addr, None, &["s_down", "o_down"]);
            let quorum = reports.iter().filter_map(|r| r.quorum).max().unwrap_or(1);
            if self.state == State::Suspect
                && self.sdown
                && self.failed_checks == 0
                && down < quorum
            {
                // Some Sentinel saw the master down (+sdown), but fewer
                // than the quorum that a failover needs do, and it answers
                // keyward's ROLE checks: holding requests any longer would
                // be an outage of keyward's own making.
                self.sdown = false;
                self.set_state(
                    State::Healthy,
                    "fewer sentinels than the quorum see the master down",
                );
            }
            if odown > 0 {
                // The master is objectively down or failing over: fence it,
                // then wait for the new master.
                self.fence("sentinels report the master down or failing over");
            } else if matches!(
                self.state,
                State::Fenced | State::Switching | State::Discovering
            ) {
                // The failover did not happen (aborted, or the master came
                // back): verify it and resume.
                self.switch(addr, epoch, "sentinel poll").await;
            } else {
                self.publish();
            }
        } else if self.master.is_none() || epoch > self.epoch {
            // The first master, or a new one in a higher epoch.
            self.switch(addr, epoch, "sentinel poll").await;
        } else {
            // The Sentinels still report a master this tracker already
            // replaced (it followed the failover faster than they finished
            // it): never go back to it.
            self.publish();
        }
    }

    fn fence(&mut self, why: &str) {
        if self.state == State::Fenced || self.state == State::Switching {
            return;
        }
        self.ctx.fence();
        self.set_state(State::Fenced, why);
    }

    /// Verify `addr` and move traffic to it.
    async fn switch(&mut self, addr: String, epoch: u64, why: &str) {
        if self.master.as_deref() == Some(addr.as_str()) && self.state == State::Healthy {
            // Already there (several Sentinels announce the same switch).
            self.epoch = self.epoch.max(epoch);
            self.publish();
            return;
        }
        let started = Instant::now();
        let previous = self.state;
        if self.master.as_deref() != Some(addr.as_str()) && self.master.is_some() {
            self.ctx.fence();
            self.set_state(State::Switching, why);
        }
        match role(&self.upstream, &addr).await {
            Ok(r) if r == "master" => {
                let old = self.master.replace(addr.clone());
                self.epoch = self.epoch.max(epoch);
                self.failed_checks = 0;
                self.sdown = false;
                self.ctx.install(&addr);
                self.set_state(State::Healthy, why);
                tracing::info!(
                    old = old.as_deref().unwrap_or("-"),
                    new = %addr,
                    epoch = self.epoch,
                    verify_ms = started.elapsed().as_millis() as u64,
                    "master adopted (ROLE verified)"
                );
            }
            Ok(r) => {
                tracing::warn!(candidate = %addr, role = %r, "candidate master is not a master yet; waiting");
                if previous == State::Discovering {
                    self.publish();
                }
            }
            Err(e) => {
                tracing::warn!(candidate = %addr, error = %e.detail, "cannot verify candidate master");
                self.publish();
            }
        }
    }

    async fn on_event(&mut self, ev: Event) {
        let words: Vec<&str> = ev.payload.split_whitespace().collect();
        // "<type> <name> <ip> <port> ..." for instance events.
        // Instance events name the master they concern: "master <name> <ip>
        // <port> ..." or "slave <id> <ip> <port> @ <name> <ip> <port>".
        // Only events about the master keyward uses now count: late events
        // about a master already replaced must not fence the new one.
        let event_master = match words.as_slice() {
            ["master", name, ip, port, ..] if *name == self.name => Some(format!("{ip}:{port}")),
            ["slave", _, _, _, "@", name, ip, port, ..] if *name == self.name => {
                Some(format!("{ip}:{port}"))
            }
            _ => None,
        };
        let about_current = event_master.is_some() && event_master == self.master;
        let about_master = about_current && words[0] == "master";
        tracing::debug!(channel = %ev.channel, payload = %ev.payload, "sentinel event");
        match ev.channel.as_str() {
            "+new-epoch" => {
                if let Some(e) = words.first().and_then(|e| e.parse::<u64>().ok()) {
                    self.pending_epoch = self.pending_epoch.max(e);
                }
            }
            "+switch-master" if words.first() == Some(&self.name.as_str()) && words.len() >= 5 => {
                // "<name> <old ip> <old port> <new ip> <new port>"
                let old = format!("{}:{}", words[1], words[2]);
                let addr = format!("{}:{}", words[3], words[4]);
                if switch_applies(self.master.as_deref(), &old) {
                    // The Sentinels elected a leader and promoted a replica
                    // in a new epoch (announced by +new-epoch; the next
                    // poll confirms it).
                    let epoch = self.epoch.max(self.pending_epoch);
                    self.switch(addr, epoch, "+switch-master").await;
                } else {
                    // From a master keyward no longer follows: a Sentinel
                    // finishing an earlier failover late (its "new" master
                    // may since have been demoted). Only the epochs decide.
                    tracing::info!(old = %old, new = %addr, "late +switch-master ignored; asking the sentinels");
                }
                self.want_poll = true;
            }
            // "slave <ip:port> <ip> <port> @ <name> <master ip> <master port>"
            "+selected-slave" | "+promoted-slave"
                if words.len() >= 6 && words[0] == "slave" && about_current =>
            {
                let addr = format!("{}:{}", words[2], words[3]);
                if ev.channel == "+promoted-slave" {
                    let epoch = self.epoch.max(self.pending_epoch);
                    self.switch(addr, epoch, "+promoted-slave").await;
                } else {
                    // The leader is about to send it SLAVEOF NO ONE: watch
                    // its ROLE closely and adopt it the moment it is master,
                    // without waiting for Sentinel's own (1 s) INFO poll.
                    self.fence("+selected-slave");
                    self.candidate = Some((addr, Instant::now()));
                }
            }
            "+sdown" if about_master => {
                self.sdown = true;
                if self.state == State::Healthy {
                    self.set_state(State::Suspect, "+sdown");
                }
            }
            "-sdown" if about_master => {
                self.sdown = false;
                self.want_poll = true;
            }
            "+odown"
            | "+try-failover"
            | "+elected-leader"
            | "+failover-state-select-slave"
            | "+selected-slave"
            | "+failover-state-send-slaveof-noone"
            | "+failover-state-wait-promotion"
                if about_current =>
            {
                let why = ev.channel.clone();
                self.fence(&why);
            }
            "+promoted-slave" | "+failover-state-reconf-slaves" | "+failover-end" => {
                self.want_poll = true
            }
            c if c.starts_with("-failover-abort") => {
                // The replica it selected must not be adopted now, even if
                // it still turns master (a SLAVEOF NO ONE it runs late).
                if let Some((addr, _)) = self.candidate.take() {
                    tracing::info!(candidate = %addr, "failover aborted; no longer watching its replica");
                }
                self.want_poll = true
            }
            "-odown" => self.want_poll = true,
            _ => {}
        }
    }

    /// With `read_from = "replica"`: keep connections to the replicas that
    /// ROLE shows connected to the current master (verified every poll).
    async fn refresh_read_replicas(&mut self) {
        if self.ctx.config.sentinel.read_from != "replica" {
            return;
        }
        let Some(master) = self.master.clone() else {
            self.ctx.set_read_replicas(&[]);
            return;
        };
        let mut verified = Vec::new();
        for r in &self.replicas {
            if replica_of(&self.upstream, r, &master).await {
                verified.push(r.clone());
            }
        }
        self.ctx.set_read_replicas(&verified);
    }

    /// Is the selected replica master yet? Adopt it as soon as it is.
    async fn check_candidate(&mut self) {
        let Some((addr, since)) = self.candidate.clone() else {
            return;
        };
        if since.elapsed() > CANDIDATE_WAIT {
            tracing::warn!(candidate = %addr, "selected replica never became master; waiting for the sentinels");
            self.candidate = None;
            return;
        }
        if matches!(role(&self.upstream, &addr).await.as_deref(), Ok("master")) {
            self.candidate = None;
            let epoch = self.epoch.max(self.pending_epoch);
            self.switch(addr, epoch, "selected replica promoted (ROLE master)")
                .await;
        }
    }

    /// keyward's own check: ROLE on the master every `ping_ms`.
    /// Start keyward's own ROLE check on the master, in a task of its own:
    /// a frozen master accepts the connection and answers nothing, and the
    /// tracker must go on handling Sentinel events meanwhile.
    fn check_master(&mut self) {
        let Some(master) = self.master.clone() else {
            return;
        };
        if self.checking || self.state == State::Fenced || self.state == State::Switching {
            return;
        }
        self.checking = true;
        let (settings, tx) = (self.upstream.clone(), self.checks.clone());
        let kept = self.check_conn.clone();
        tokio::spawn(async move {
            let r = role_kept(&settings, &master, &kept).await;
            let _ = tx.send((master, r)).await;
        });
    }

    /// The result of a ROLE check on `master`.
    fn on_check(&mut self, master: String, result: Result<String, Error>) {
        self.checking = false;
        if self.master.as_deref() != Some(master.as_str())
            || matches!(self.state, State::Fenced | State::Switching)
        {
            // About a master already replaced or fenced.
            return;
        }
        match result {
            Ok(r) if r == "master" => {
                self.failed_checks = 0;
                if self.state == State::Suspect && !self.sdown {
                    self.set_state(State::Healthy, "master answers ROLE again");
                }
            }
            Ok(r) => {
                // Demoted under us (a failover we missed, or REPLICAOF).
                tracing::warn!(master = %master, role = %r, "master reports another role; fencing it");
                self.fence("master was demoted");
            }
            Err(_) => {
                self.failed_checks += 1;
                if self.failed_checks >= self.ctx.config.sentinel.ping_failures
                    && self.state == State::Healthy
                {
                    self.set_state(State::Suspect, "master does not answer ROLE");
                }
            }
        }
    }
}

/// `SENTINEL MASTER`, `REPLICAS` and `SENTINELS` for `name` on one Sentinel.
async fn query(s: &Settings, name: &str) -> Result<Report, Error> {
    let fut = async {
        let mut stream = connector::connect(s, Proto::Resp2).await?;
        let master = decode(
            &connector::call(&mut stream, &[b"SENTINEL", b"MASTER", name.as_bytes()]).await?,
        )?;
        let replicas = decode(
            &connector::call(&mut stream, &[b"SENTINEL", b"REPLICAS", name.as_bytes()]).await?,
        )?;
        let sentinels = decode(
            &connector::call(&mut stream, &[b"SENTINEL", b"SENTINELS", name.as_bytes()]).await?,
        )?;
        let mut rep = Report::default();
        if let OwnedFrame::Array(_) = &master {
            let m = fields(&master);
            if let (Some(ip), Some(port)) = (m.get("ip"), m.get("port")) {
                let epoch = m
                    .get("config-epoch")
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                rep.master = Some((
                    format!("{ip}:{port}"),
                    epoch,
                    m.get("flags").cloned().unwrap_or_default(),
                ));
                rep.quorum = m.get("quorum").and_then(|q| q.parse().ok());
            }
        }
        for item in items(&replicas) {
            let f = fields(item);
            let down = f
                .get("flags")
                .map(|fl| fl.contains("down"))
                .unwrap_or(false);
            if let (Some(ip), Some(port), false) = (f.get("ip"), f.get("port"), down) {
                rep.replicas.push(format!("{ip}:{port}"));
            }
        }
        for item in items(&sentinels) {
            let f = fields(item);
            if let (Some(ip), Some(port)) = (f.get("ip"), f.get("port")) {
                rep.sentinels.push(format!("{ip}:{port}"));
            }
        }
        Ok(rep)
    };
    tokio::time::timeout(s.command_timeout * 2, fut)
        .await
        .map_err(|_| {
            Error::upstream(
                Kind::Timeout,
                format!("{}: sentinel query timed out", s.address),
            )
        })?
}

/// How many Sentinels name `master` (in `epoch`, if given) with one of
/// `flags` (`s_down`, `o_down`, `failover_in_progress`).
fn flagged(reports: &[Report], master: &str, epoch: Option<u64>, flags: &[&str]) -> usize {
    reports
        .iter()
        .filter_map(|r| r.master.as_ref())
        .filter(|(a, e, fl)| {
            a == master
                && epoch.is_none_or(|want| *e == want)
                && fl.split(',').any(|f| flags.contains(&f))
        })
        .count()
}

/// Does a `+switch-master` from `old` move the master keyward follows?
/// Only when `old` is that master (or none is known yet).
fn switch_applies(current: Option<&str>, old: &str) -> bool {
    current.is_none_or(|c| c == old)
}

/// `ROLE` on a Redis node: "master", "slave" or "sentinel".
pub(super) async fn role(s: &Settings, addr: &str) -> Result<String, Error> {
    let mut s = s.clone();
    s.address = addr.to_string();
    let fut = async {
        let mut stream = connector::connect(&s, Proto::Resp2).await?;
        ask_role(&mut stream, addr).await
    };
    tokio::time::timeout(s.command_timeout, fut)
        .await
        .map_err(|_| Error::upstream(Kind::Timeout, format!("{addr}: ROLE timed out")))?
}

async fn ask_role(stream: &mut TcpStream, addr: &str) -> Result<String, Error> {
    let reply = decode(&connector::call(stream, &[b"ROLE"]).await?)?;
    match items(&reply).first() {
        Some(OwnedFrame::BulkString(b)) | Some(OwnedFrame::SimpleString(b)) => {
            Ok(String::from_utf8_lossy(b).into_owned())
        }
        _ => Err(Error::upstream(
            Kind::Protocol,
            format!("{addr}: unexpected ROLE reply"),
        )),
    }
}

/// A connection kept between ROLE checks of the master, with its address.
type KeptConn = Arc<tokio::sync::Mutex<Option<(String, TcpStream)>>>;

/// `role`, over the connection the last check left in `kept` (a check every
/// `sentinel.ping_ms` on a fresh connection was four connects a second to
/// the master). Any failure drops it, so a late reply can never answer a
/// later check; a kept connection that fails (closed by Redis's `timeout`,
/// CLIENT KILL) is retried once on a fresh one, within the same time.
async fn role_kept(s: &Settings, addr: &str, kept: &KeptConn) -> Result<String, Error> {
    let mut kept = kept.lock().await;
    let reuse = match kept.take() {
        Some((a, stream)) if a == addr => Some(stream),
        _ => None,
    };
    let mut fresh = s.clone();
    fresh.address = addr.to_string();
    let fut = async {
        if let Some(mut stream) = reuse {
            if let Ok(r) = ask_role(&mut stream, addr).await {
                return Ok((r, stream));
            }
        }
        let mut stream = connector::connect(&fresh, Proto::Resp2).await?;
        let r = ask_role(&mut stream, addr).await?;
        Ok((r, stream))
    };
    match tokio::time::timeout(s.command_timeout, fut).await {
        Ok(Ok((r, stream))) => {
            *kept = Some((addr.to_string(), stream));
            Ok(r)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::upstream(
            Kind::Timeout,
            format!("{addr}: ROLE timed out"),
        )),
    }
}

/// Is `addr` a replica connected to `master` (ROLE: slave, master host and
/// port, state `connected`)?
async fn replica_of(s: &Settings, addr: &str, master: &str) -> bool {
    let mut s = s.clone();
    s.address = addr.to_string();
    let fut = async {
        let mut stream = connector::connect(&s, Proto::Resp2).await.ok()?;
        let reply = decode(&connector::call(&mut stream, &[b"ROLE"]).await.ok()?).ok()?;
        let text = |f: &OwnedFrame| match f {
            OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
                Some(String::from_utf8_lossy(b).into_owned())
            }
            _ => None,
        };
        let parts = items(&reply);
        let role = text(parts.first()?)?;
        let host = text(parts.get(1)?)?;
        let port = match parts.get(2)? {
            OwnedFrame::Integer(p) => p.to_string(),
            other => text(other)?,
        };
        let state = text(parts.get(3)?)?;
        Some(role == "slave" && format!("{host}:{port}") == master && state == "connected")
    };
    matches!(
        tokio::time::timeout(s.command_timeout, fut).await,
        Ok(Some(true))
    )
}

pub(super) fn decode(bytes: &[u8]) -> Result<OwnedFrame, Error> {
    match redis_protocol::resp2::decode::decode(bytes) {
        Ok(Some((OwnedFrame::Error(e), _))) => Err(Error::upstream(Kind::Protocol, e)),
        Ok(Some((f, _))) => Ok(f),
        _ => Err(Error::upstream(Kind::Protocol, "undecodable reply")),
    }
}

pub(super) fn items(f: &OwnedFrame) -> &[OwnedFrame] {
    match f {
        OwnedFrame::Array(v) => v,
        _ => &[],
    }
}

/// A flat key/value array (Sentinel's format) as a map.
pub(super) fn fields(f: &OwnedFrame) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in items(f).chunks(2) {
        if let [OwnedFrame::BulkString(k), OwnedFrame::BulkString(v)] = pair {
            out.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
    }
    out
}

/// Keep a pub/sub subscription on one Sentinel, forwarding its events;
/// reconnect with jittered backoff.
async fn subscribe(
    s: Settings,
    events: mpsc::Sender<Event>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let run = async {
            let mut stream: TcpStream = connector::connect(&s, Proto::Resp2).await?;
            connector::send(&mut stream, &[b"PSUBSCRIBE", b"*"]).await?;
            // One buffer for the whole stream: an event may arrive in the
            // same read as the PSUBSCRIBE confirmation.
            let mut buf = BytesMut::with_capacity(4096);
            let mut scanner = Scanner::new();
            decode(&connector::read_frame(&mut stream, &mut buf, &mut scanner).await?)?;
            tracing::debug!(sentinel = %s.address, "subscribed to sentinel events");
            loop {
                let frame = connector::read_frame(&mut stream, &mut buf, &mut scanner).await?;
                // pmessage <pattern> <channel> <payload>
                let Ok(f) = decode(&frame) else { continue };
                if let [OwnedFrame::BulkString(kind), _, OwnedFrame::BulkString(ch), OwnedFrame::BulkString(p)] =
                    items(&f)
                {
                    if kind == b"pmessage" {
                        let ev = Event {
                            channel: String::from_utf8_lossy(ch).into_owned(),
                            payload: String::from_utf8_lossy(p).into_owned(),
                        };
                        if events.send(ev).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        };
        let res: Result<(), Error> = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = run => r,
        };
        match res {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(sentinel = %s.address, error = %e.detail, "sentinel subscription lost; reconnecting")
            }
        }
        let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_switch_from_a_replaced_master_does_not_apply() {
        assert!(switch_applies(None, "a:1"));
        assert!(switch_applies(Some("a:1"), "a:1"));
        // keyward follows C; a Sentinel finishes the A -> B failover late.
        assert!(!switch_applies(Some("c:3"), "a:1"));
    }

    fn report(master: &str, flags: &str) -> Report {
        Report {
            master: Some((master.into(), 1, flags.into())),
            quorum: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn sentinels_seeing_the_master_down_are_counted() {
        let reports = [
            report("m:1", "master"),
            report("m:1", "master,s_down"),
            report("m:1", "master,s_down,o_down"),
            report("other:2", "master,s_down"),
        ];
        let down = ["s_down", "o_down"];
        assert_eq!(flagged(&reports, "m:1", None, &down), 2);
        assert_eq!(flagged(&reports[..2], "m:1", None, &down), 1);
        assert_eq!(flagged(&reports, "none:0", None, &down), 0);
        assert_eq!(flagged(&reports, "m:1", Some(1), &["o_down"]), 1);
        assert_eq!(flagged(&reports, "m:1", Some(2), &down), 0);
    }
}

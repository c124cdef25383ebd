//! Replication and Sentinel for failover tests: replicas that follow a
//! [`Redis`] master, a group of real `redis-server --sentinel` processes
//! watching it ([`Sentinels`]), keyward started in Sentinel mode, the time
//! limits a failover is held to, and the small readers those tests need (a
//! RESP2 reply parser, keyward's `/topology` and `POST /failover` JSON).
//!
//! Everything here waits by polling what Redis itself reports (`ROLE`,
//! `INFO replication`, `SENTINEL ...`) against a deadline. Sentinel is slow
//! by design, which shapes the deadlines:
//! - sentinels find each other through hello messages on the master, sent
//!   every 2 s, so a fresh group needs a couple of seconds to be complete;
//! - a sentinel learns replicas from the master's `INFO`, polled every 10 s
//!   (1 s during a failover), so replicas should be connected *before* the
//!   sentinels start, or discovery takes up to ~10 s;
//! - after a failover the old master, if alive, keeps acting as a master
//!   until a sentinel's next `INFO` poll (up to ~10 s) reconfigures it as a
//!   replica. Writes it accepts in that window are lost: exactly what a
//!   fenced proxy must never acknowledge.

use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::admin::wait_ready;
use super::keyward::Keyward;
use super::ports::free_port;
use super::proc::{kill_and_reap, log_stdio, mentions_addr_in_use, read_text, tail};
use super::redis::{read_frames, Redis};
use super::resp::{cmd, esc};
use super::runtime::blocking;
use super::{DEADLINE, POLL};

/// How long a fresh sentinel group may take to discover its peers and the
/// master's replicas (hello messages every 2 s, master INFO every 10 s).
pub const SENTINEL_DISCOVERY: Duration = Duration::from_secs(15);

/// keyward in Sentinel mode has to ask the Sentinels and verify the master
/// before it is ready; allow for a slow start on a loaded box.
pub const READY_LIMIT: Duration = Duration::from_secs(20);

/// How long the Sentinels may take to complete a failover.
pub const SWITCH_LIMIT: Duration = Duration::from_secs(15);

/// After the Sentinels agree on a new master, keyward must take writes (and
/// carry subscribers) there within this long.
pub const RESUME_LIMIT: Duration = Duration::from_secs(10);

/// Per-probe timeout for the kit's own polling connections: short, because
/// the caller polls again, and a dead or frozen node must not eat the
/// deadline in one go.
const PROBE: Duration = Duration::from_millis(500);

impl Redis {
    /// A new `redis-server` replicating from `master`
    /// (`--replicaof 127.0.0.1 <port> --replica-announce-ip 127.0.0.1`), returned
    /// once `INFO replication` shows `master_link_status:up`, i.e. the initial
    /// sync is done and Sentinel will see it as a healthy replica.
    pub fn start_replica_of(master: &Redis) -> Redis {
        start_replica(master.port())
    }
}

/// [`Redis::start_replica_of`] for a master known only by its port.
///
/// Side effect on the master: `CONFIG SET repl-diskless-sync-delay 0`.
/// Redis otherwise waits 5 s for more replicas before a diskless full sync;
/// the replica starts with the same setting so a later resync from it (after
/// a failover) is just as quick.
pub fn start_replica(master_port: u16) -> Redis {
    let set = try_redis_cmd(
        master_port,
        &[b"CONFIG", b"SET", b"repl-diskless-sync-delay", b"0"],
        DEADLINE,
    );
    assert!(
        matches!(&set, Ok(r) if r.starts_with(b"+OK")),
        "CONFIG SET repl-diskless-sync-delay 0 on master 127.0.0.1:{master_port}: {set:?}"
    );
    let port = master_port.to_string();
    let replica = Redis::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &port,
        "--replica-announce-ip",
        "127.0.0.1",
        "--repl-diskless-sync-delay",
        "0",
    ]);
    let deadline = Instant::now() + DEADLINE;
    loop {
        if replica_link_up(replica.port()) {
            return replica;
        }
        if Instant::now() >= deadline {
            panic!(
                "replica 127.0.0.1:{} did not report master_link_status:up (master 127.0.0.1:{master_port}) within {DEADLINE:?}\n{}",
                replica.port(),
                replica.log()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the server on `port` is a replica whose link to its master is up.
pub fn replica_link_up(port: u16) -> bool {
    match try_redis_cmd(port, &[b"INFO", b"replication"], PROBE) {
        Ok(r) => {
            let text = String::from_utf8_lossy(&r).into_owned();
            text.contains("role:slave") && text.contains("master_link_status:up")
        }
        Err(_) => false,
    }
}

/// The first element of `ROLE` on `port` ("master", "slave", "sentinel"),
/// or `None` if the node does not answer within a short probe timeout.
pub fn role_of(port: u16) -> Option<String> {
    let r = try_redis_cmd(port, &[b"ROLE"], PROBE).ok()?;
    parse_reply(&r).ok()?.array()?.first()?.text()
}

/// Poll until the node on `port` reports `ROLE` `role` ("master" or
/// "slave"); panic after `timeout`.
pub fn wait_role(port: u16, role: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = role_of(port);
        if seen.as_deref() == Some(role) {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "127.0.0.1:{port} did not report ROLE {role:?} within {timeout:?} (last: {seen:?})"
            );
        }
        std::thread::sleep(POLL);
    }
}

/// How a [`Sentinels`] group is configured. `Default` is the usual test
/// setup: 3 sentinels, quorum 2, master name `mymaster`, master declared
/// down after 1 s without a valid reply.
#[derive(Debug, Clone)]
pub struct SentinelOpts {
    /// Number of sentinel processes.
    pub count: usize,
    /// Sentinels that must agree the master is down before a failover.
    pub quorum: usize,
    /// The name the group monitors the master under.
    pub master_name: String,
    /// `sentinel down-after-milliseconds`.
    pub down_after_ms: u64,
    /// `sentinel failover-timeout`.
    pub failover_timeout_ms: u64,
}

impl Default for SentinelOpts {
    fn default() -> Self {
        SentinelOpts {
            count: 3,
            quorum: 2,
            master_name: "mymaster".into(),
            down_after_ms: 1000,
            // Three sentinels that see the master down together can split
            // their votes; the next try comes 2 x failover-timeout after the
            // first (Redis's election wait is the smaller of it and 10 s),
            // which must fall within SWITCH_LIMIT.
            failover_timeout_ms: 4_000,
        }
    }
}

/// One sentinel process and the temp dir holding its (rewritable) config
/// and log.
struct Node {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Node {
    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.conf")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }
    fn stdio_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.stdio")
    }
    fn log(&self) -> String {
        format!(
            "--- sentinel 127.0.0.1:{} log ---\n{}\n--- its stdout/stderr ---\n{}",
            self.port,
            read_text(&self.log_path()),
            read_text(&self.stdio_path())
        )
    }
}

/// A group of real `redis-server <conf> --sentinel` processes on loopback
/// ports monitoring one master. Killed on drop; if the test is panicking,
/// the tail of every sentinel's log is printed.
///
/// Construction blocks the calling thread (up to [`SENTINEL_DISCOVERY`])
/// until every sentinel answers, names the master, knows all its peers and
/// every replica the master had connected at start. From async tests, call
/// the blocking methods through `tokio::task::block_in_place`.
pub struct Sentinels {
    nodes: Vec<Node>,
    opts: SentinelOpts,
}

impl Sentinels {
    /// Three sentinels with default settings watching `master`.
    pub fn start(master: &Redis) -> Sentinels {
        Sentinels::start_with(master.port(), SentinelOpts::default())
    }

    /// Default settings except `down-after-milliseconds`.
    pub fn start_down_after(master: &Redis, down_after_ms: u64) -> Sentinels {
        Sentinels::start_with(
            master.port(),
            SentinelOpts {
                down_after_ms,
                ..SentinelOpts::default()
            },
        )
    }

    /// The general form: `opts.count` sentinels watching 127.0.0.1:`master_port`.
    pub fn start_with(master_port: u16, opts: SentinelOpts) -> Sentinels {
        assert!(opts.count >= 1, "Sentinels: count must be at least 1");
        let expect_replicas = connected_replicas(master_port);
        let mut group = Sentinels {
            nodes: Vec::with_capacity(opts.count),
            opts,
        };
        for _ in 0..group.opts.count {
            let node = group.launch_node(master_port);
            group.nodes.push(node);
        }
        let master = format!("127.0.0.1:{master_port}");
        group.wait_ready(&master, expect_replicas);
        group
    }

    /// The monitored master's name (`mymaster` by default).
    pub fn master_name(&self) -> &str {
        &self.opts.master_name
    }

    /// `"127.0.0.1:<port>"` of every sentinel, in start order (the form
    /// keyward's `--sentinel` takes).
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Every sentinel's port, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Number of sentinels in the group (alive or killed).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The master address according to the first sentinel that answers
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME`. Panics if none does.
    pub fn master_addr(&self) -> String {
        for i in 0..self.nodes.len() {
            if let Some(addr) = self.master_seen_by(i) {
                return addr;
            }
        }
        panic!(
            "no sentinel answered GET-MASTER-ADDR-BY-NAME {}\n{}",
            self.opts.master_name,
            self.logs()
        );
    }

    /// What sentinel `i` currently names as the master (`None` if it is
    /// dead, slow, or does not know the master).
    pub fn master_seen_by(&self, i: usize) -> Option<String> {
        let r = self.ask(
            i,
            &[
                b"SENTINEL",
                b"GET-MASTER-ADDR-BY-NAME",
                self.opts.master_name.as_bytes(),
            ],
        )?;
        let items = parse_reply(&r).ok()?.array()?;
        match items.as_slice() {
            [host, port] => Some(format!("{}:{}", host.text()?, port.text()?)),
            _ => None,
        }
    }

    /// The highest `config-epoch` of the master among the sentinels that
    /// answer `SENTINEL MASTER`: bumped by every completed failover.
    pub fn config_epoch(&self) -> u64 {
        (0..self.nodes.len())
            .filter_map(|i| {
                let r = self.ask(
                    i,
                    &[b"SENTINEL", b"MASTER", self.opts.master_name.as_bytes()],
                )?;
                parse_reply(&r).ok()?.field("config-epoch")?.parse().ok()
            })
            .max()
            .unwrap_or_else(|| panic!("no sentinel answered SENTINEL MASTER\n{}", self.logs()))
    }

    /// Ask a sentinel for a failover of a healthy master
    /// (`SENTINEL FAILOVER <name>`), trying each live sentinel in turn and
    /// retrying `-INPROG` (one already running) and `-NOGOODSLAVE` (replica
    /// not yet known or not yet healthy in Sentinel's eyes) until
    /// [`DEADLINE`]. Returns once a sentinel answered `+OK`; the switch
    /// itself takes about a second more, see [`Sentinels::wait_master_change`].
    pub fn failover(&self) {
        let deadline = Instant::now() + DEADLINE;
        let name = self.opts.master_name.as_bytes();
        let mut last = String::from("no sentinel answered");
        loop {
            for i in 0..self.nodes.len() {
                let Some(r) = self.ask(i, &[b"SENTINEL", b"FAILOVER", name]) else {
                    continue;
                };
                if r.starts_with(b"+OK") {
                    return;
                }
                last = format!("sentinel 127.0.0.1:{}: {}", self.nodes[i].port, esc(&r));
                if !(r.starts_with(b"-INPROG") || r.starts_with(b"-NOGOODSLAVE")) {
                    panic!("SENTINEL FAILOVER refused: {last}\n{}", self.logs());
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "SENTINEL FAILOVER not accepted within {DEADLINE:?}; last answer: {last}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll every sentinel until a majority of the whole group names a
    /// master other than `old` (all the same one) and that node answers
    /// `ROLE` with `master`; return its address. Panics after `timeout`
    /// with what each sentinel said and their logs.
    pub fn wait_master_change(&self, old: &str, timeout: Duration) -> String {
        let majority = self.nodes.len() / 2 + 1;
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<Option<String>> = (0..self.nodes.len())
                .map(|i| self.master_seen_by(i))
                .collect();
            for candidate in seen.iter().flatten() {
                if candidate == old {
                    continue;
                }
                let votes = seen
                    .iter()
                    .filter(|s| s.as_deref() == Some(candidate))
                    .count();
                if votes >= majority
                    && addr_port(candidate).and_then(role_of).as_deref() == Some("master")
                {
                    return candidate.clone();
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "sentinels did not agree on a master other than {old} within {timeout:?}; they say {seen:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether every sentinel lists the node on `port` among the master's
    /// replicas (as a replica of `master_port`, when given) with none of the
    /// flags `s_down`, `o_down`, `disconnected`: what Sentinel's replica
    /// selection needs before a failover can pick it.
    pub fn all_know_healthy_replica(&self, port: u16, master_port: Option<u16>) -> bool {
        let name = self.opts.master_name.as_bytes();
        (0..self.nodes.len()).all(|i| {
            let Some(r) = self.ask(i, &[b"SENTINEL", b"REPLICAS", name]) else {
                return false;
            };
            let Some(list) = parse_reply(&r).ok().and_then(Reply::array) else {
                return false;
            };
            list.iter().any(|rep| {
                rep.field("port") == Some(port.to_string())
                    && master_port.is_none_or(|m| rep.field("master-port") == Some(m.to_string()))
                    && rep.field("flags").is_some_and(|f| {
                        !f.contains("s_down")
                            && !f.contains("o_down")
                            && !f.contains("disconnected")
                    })
            })
        })
    }

    /// SIGKILL sentinel `i` and reap it (no-op if already dead). Its port
    /// then refuses connections; its log stays readable.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// Whether sentinel `i` is still running.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait on sentinel").is_none(),
            None => false,
        }
    }

    /// Sentinel `i`'s temp dir (holds `sentinel.conf`, which Sentinel
    /// rewrites as it learns, and `sentinel.log`).
    pub fn dir(&self, i: usize) -> &Path {
        self.nodes[i].dir.path()
    }

    /// Every sentinel's log (and stdout/stderr), one after another.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.log())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Send one command to sentinel `i`; `None` if it does not answer
    /// within a short probe timeout.
    pub fn ask(&self, i: usize, args: &[&[u8]]) -> Option<Vec<u8>> {
        try_redis_cmd(self.nodes[i].port, args, PROBE).ok()
    }

    /// Write a fresh config for a new node and spawn it, retrying on a new
    /// port if another process took ours; wait until it answers PING.
    fn launch_node(&self, master_port: u16) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("keyward-sentinel-")
            .tempdir()
            .expect("create temp dir for sentinel");
        let mut node = Node {
            child: None,
            port: 0,
            dir,
        };
        let bin: OsString =
            std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        for _ in 0..5 {
            node.port = free_port();
            // Sentinel rewrites its config as it learns peers and replicas,
            // so each attempt starts from a freshly written file (and a fresh
            // log, so an old "address in use" cannot mislead).
            std::fs::write(node.conf_path(), self.config_text(&node, master_port))
                .expect("write sentinel.conf");
            let _ = std::fs::remove_file(node.log_path());
            let _ = std::fs::remove_file(node.stdio_path());
            let (out, err) = log_stdio(&node.stdio_path());
            let mut child = Command::new(&bin)
                .arg(node.conf_path())
                .arg("--sentinel")
                .current_dir(node.dir.path())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot spawn {bin:?} --sentinel (install redis-server or set REDIS_SERVER): {e}")
                });
            let deadline = Instant::now() + DEADLINE;
            loop {
                if let Some(status) = child.try_wait().expect("try_wait on sentinel") {
                    let log = node.log();
                    if mentions_addr_in_use(&log) {
                        break; // next port
                    }
                    panic!("sentinel exited during startup ({status})\n{log}");
                }
                // Liveness re-check after the PONG: it must be ours.
                let pong = try_redis_cmd(node.port, &[b"PING"], PROBE)
                    .map(|r| r.starts_with(b"+PONG"))
                    .unwrap_or(false);
                if pong && child.try_wait().expect("try_wait on sentinel").is_none() {
                    node.child = Some(child);
                    return node;
                }
                if Instant::now() >= deadline {
                    kill_and_reap(&mut child);
                    panic!(
                        "sentinel on port {} did not answer PING within {DEADLINE:?}\n{}",
                        node.port,
                        node.log()
                    );
                }
                std::thread::sleep(POLL);
            }
        }
        panic!(
            "sentinel: every port tried was already in use\n{}",
            node.log()
        );
    }

    fn config_text(&self, node: &Node, master_port: u16) -> String {
        let o = &self.opts;
        let name = &o.master_name;
        let dir = node.dir.path().display();
        // announce-ip and resolve-hostnames keep every address Sentinel
        // reports in the 127.0.0.1:port form tests compare against.
        format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             daemonize no\n\
             sentinel announce-ip 127.0.0.1\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {name} {down}\n\
             sentinel failover-timeout {name} {fto}\n\
             sentinel parallel-syncs {name} 1\n\
             logfile \"{dir}/sentinel.log\"\n\
             dir \"{dir}\"\n",
            port = node.port,
            quorum = o.quorum,
            down = o.down_after_ms,
            fto = o.failover_timeout_ms,
        )
    }

    /// Until [`SENTINEL_DISCOVERY`]: every sentinel names `master`, lists
    /// all its peers and at least `replicas` replicas.
    fn wait_ready(&self, master: &str, replicas: usize) {
        let name = self.opts.master_name.as_bytes();
        let peers = self.nodes.len() - 1;
        let deadline = Instant::now() + SENTINEL_DISCOVERY;
        loop {
            let mut pending = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                let m = self.master_seen_by(i);
                if m.as_deref() != Some(master) {
                    pending.push(format!("127.0.0.1:{} names master {m:?}", node.port));
                    continue;
                }
                let count = |sub: &[u8]| {
                    self.ask(i, &[b"SENTINEL", sub, name])
                        .and_then(|r| parse_reply(&r).ok())
                        .and_then(|r| r.array())
                        .map(|a| a.len())
                };
                let s = count(b"SENTINELS");
                if s != Some(peers) {
                    pending.push(format!(
                        "127.0.0.1:{} knows {s:?} of {peers} peer sentinels",
                        node.port
                    ));
                }
                let r = count(b"REPLICAS");
                if r.unwrap_or(0) < replicas {
                    pending.push(format!(
                        "127.0.0.1:{} knows {r:?} of {replicas} replicas",
                        node.port
                    ));
                }
            }
            if pending.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sentinel group not settled within {SENTINEL_DISCOVERY:?}: {}\n{}",
                    pending.join("; "),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("{}", tail(&n.log(), 16 * 1024));
            }
        }
    }
}

/// The master's `connected_slaves` count (replicas with an open link).
fn connected_replicas(master_port: u16) -> usize {
    let r = try_redis_cmd(master_port, &[b"INFO", b"replication"], DEADLINE)
        .unwrap_or_else(|e| panic!("INFO replication on master 127.0.0.1:{master_port}: {e}"));
    String::from_utf8_lossy(&r)
        .lines()
        .find_map(|l| l.strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The port of a `host:port` address.
pub fn addr_port(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// A master, one replica of it (synced before the sentinels start, so they
/// know it at once), and three sentinels watching the master with
/// `down-after-milliseconds` = `down_after_ms`.
pub fn replicated_group(down_after_ms: u64) -> (Redis, Redis, Sentinels) {
    let master = Redis::start();
    let replica = Redis::start_replica_of(&master);
    let sentinels = Sentinels::start_down_after(&master, down_after_ms);
    (master, replica, sentinels)
}

/// A master and two replicas of it, synced.
pub fn master_with_two_replicas() -> (Redis, Redis, Redis) {
    let master = Redis::start();
    let a = Redis::start_replica_of(&master);
    let b = Redis::start_replica_of(&master);
    (master, a, b)
}

/// Wait until every sentinel lists each of `replicas` as a healthy replica
/// of `master` (what SENTINEL FAILOVER's replica selection needs).
pub async fn wait_sentinels_know(sentinels: &Sentinels, master: u16, replicas: &[u16]) {
    super::wait_until("the sentinels know the replicas", DEADLINE, || async {
        super::blocking(|| {
            replicas
                .iter()
                .all(|r| sentinels.all_know_healthy_replica(*r, Some(master)))
        })
    })
    .await;
}

/// [`replicated_group`] and keyward following its sentinels
/// ([`start_keyward_sentinel`] with no extra arguments), returned once
/// keyward's `/ready` answers 200. Needs the multi-threaded runtime.
pub async fn sentinel_stack(down_after_ms: u64) -> (Redis, Redis, Sentinels, Keyward) {
    let (master, replica, sentinels) = blocking(|| replicated_group(down_after_ms));
    let kw = blocking(|| start_keyward_sentinel(&sentinels, &[]));
    wait_ready(&kw, READY_LIMIT).await;
    (master, replica, sentinels, kw)
}

/// keyward following `sentinels` (`--sentinel` for each, `--master-name`,
/// no `--upstream`), plus `extra` arguments. Returns once the proxy and
/// admin ports accept; readiness (a verified master) is the test's to wait
/// for, via `/ready`.
pub fn start_keyward_sentinel(sentinels: &Sentinels, extra: &[&str]) -> Keyward {
    let mut args = sentinel_args(sentinels);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Keyward::launch(None, None, &refs, true)
}

/// Like [`start_keyward_sentinel`] with `toml` as keyward's config file
/// (`--config`), for settings that have no command-line flag.
pub fn start_keyward_sentinel_config(sentinels: &Sentinels, toml: &str) -> Keyward {
    let args = sentinel_args(sentinels);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Keyward::launch(None, Some(toml), &refs, true)
}

/// `--sentinel <addr>` for each sentinel, then `--master-name <name>`.
fn sentinel_args(sentinels: &Sentinels) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    for a in sentinels.addrs() {
        args.push("--sentinel".into());
        args.push(a);
    }
    args.push("--master-name".into());
    args.push(sentinels.master_name().into());
    args
}

/// Like `redis_cmd`, but returns connection errors and timeouts instead of
/// panicking: for probing nodes that may be down, frozen or mid-failover.
pub fn try_redis_cmd(port: u16, args: &[&[u8]], timeout: Duration) -> Result<Vec<u8>, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(&cmd(args))
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut frames = read_frames(&mut s, 1, timeout).map_err(|e| format!("{addr}: {e}"))?;
    Ok(frames.remove(0))
}

/// A parsed RESP2 reply (what Redis and Sentinel send by default), for
/// tests that need values rather than bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+text`
    Status(String),
    /// `-text`
    Error(String),
    /// `:n`
    Int(i64),
    /// `$n` payload, `None` for `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*n` elements, `None` for `*-1`.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Status, bulk or integer as text; `None` for errors, nulls, arrays.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Int(n) => Some(n.to_string()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The elements of a non-null array.
    pub fn array(self) -> Option<Vec<Reply>> {
        match self {
            Reply::Array(Some(v)) => Some(v),
            _ => None,
        }
    }

    /// In a flat `[name, value, name, value, ...]` array (the shape of
    /// `SENTINEL MASTER` in RESP2), the value for `name`.
    pub fn field(&self, name: &str) -> Option<String> {
        let Reply::Array(Some(v)) = self else {
            return None;
        };
        v.chunks(2)
            .find(|kv| kv.len() == 2 && kv[0].text().as_deref() == Some(name))
            .and_then(|kv| kv[1].text())
    }
}

/// Parse exactly one complete RESP2 reply (trailing bytes are an error).
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, String> {
    let (reply, used) = parse_at(bytes, 0)?;
    if used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the reply: {}",
            bytes.len() - used,
            esc(bytes)
        ));
    }
    Ok(reply)
}

fn parse_at(b: &[u8], pos: usize) -> Result<(Reply, usize), String> {
    let end = b
        .get(pos..)
        .and_then(|rest| rest.windows(2).position(|w| w == b"\r\n"))
        .map(|i| pos + i)
        .ok_or_else(|| format!("incomplete reply: {}", esc(b)))?;
    let line = std::str::from_utf8(&b[pos + 1..end]).map_err(|_| "non-UTF-8 header".to_string())?;
    let next = end + 2;
    let num = || {
        line.parse::<i64>()
            .map_err(|_| format!("bad number {line:?} in {}", esc(b)))
    };
    match b[pos] {
        b'+' => Ok((Reply::Status(line.into()), next)),
        b'-' => Ok((Reply::Error(line.into()), next)),
        b':' => Ok((Reply::Int(num()?), next)),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok((Reply::Bulk(None), next));
            }
            let stop = next + n as usize;
            let data = b
                .get(next..stop)
                .ok_or_else(|| format!("short bulk in {}", esc(b)))?;
            Ok((Reply::Bulk(Some(data.to_vec())), stop + 2))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok((Reply::Array(None), next));
            }
            let mut items = Vec::with_capacity(n as usize);
            let mut at = next;
            for _ in 0..n {
                let (item, after) = parse_at(b, at)?;
                items.push(item);
                at = after;
            }
            Ok((Reply::Array(Some(items)), at))
        }
        other => Err(format!(
            "unsupported RESP type {:?} (RESP2 only) in {}",
            other as char,
            esc(b)
        )),
    }
}

/// keyward's `GET /topology`, parsed. Fields missing from the JSON are
/// `None` / empty so a test can say precisely what it expected.
#[derive(Debug, Clone, Default)]
pub struct TopologyView {
    /// `"master"`: the master keyward sends writes to.
    pub master: Option<String>,
    /// `"epoch"`: the Sentinel config epoch keyward adopted.
    pub epoch: Option<u64>,
    /// `"state"`: e.g. "healthy".
    pub state: Option<String>,
    /// `"replicas"`.
    pub replicas: Vec<String>,
    /// `"sentinels"`: (address, reachable).
    pub sentinels: Vec<(String, bool)>,
    /// The body as served, for failure messages.
    pub raw: String,
}

/// `GET /topology` on keyward's admin port. `Err` (with status and body)
/// unless the answer is 200 with a JSON object. Blocking.
pub fn get_topology(admin_port: u16) -> Result<TopologyView, String> {
    let (status, body) = super::http::http_get(admin_port, "/topology");
    if status != 200 {
        return Err(format!("/topology answered {status}: {body}"));
    }
    let json = Json::parse(&body).map_err(|e| format!("/topology is not JSON ({e}): {body}"))?;
    let Json::Obj(_) = json else {
        return Err(format!("/topology is not a JSON object: {body}"));
    };
    let strs = |v: Option<&Json>| -> Vec<String> {
        match v {
            Some(Json::Arr(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    let sentinels = match json.get("sentinels") {
        Some(Json::Arr(a)) => a
            .iter()
            .filter_map(|s| {
                let addr = s.get("address")?.as_str()?.to_string();
                let reachable = matches!(s.get("reachable"), Some(Json::Bool(true)));
                Some((addr, reachable))
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(TopologyView {
        master: json
            .get("master")
            .and_then(Json::as_str)
            .map(str::to_string),
        epoch: match json.get("epoch") {
            Some(Json::Num(n)) if *n >= 0.0 => Some(*n as u64),
            _ => None,
        },
        state: json.get("state").and_then(Json::as_str).map(str::to_string),
        replicas: strs(json.get("replicas")),
        sentinels,
        raw: body,
    })
}

/// [`get_topology`] of `kw`, panicking with the reason if it is not 200
/// JSON.
pub fn topology(kw: &Keyward) -> TopologyView {
    get_topology(kw.admin_port()).unwrap_or_else(|e| panic!("GET /topology: {e}"))
}

/// What keyward's `POST /failover` answered, parsed. Fields missing from
/// the JSON are `None`.
#[derive(Debug)]
pub struct FailoverAnswer {
    pub status: u16,
    /// `"ok"`.
    pub ok: Option<bool>,
    /// `"old"`: the master before the switchover.
    pub old: Option<String>,
    /// `"new"`: the master after it.
    pub new: Option<String>,
    /// `"held_ms"`: how long keyward held requests.
    pub held_ms: Option<f64>,
    /// `"error"`: why the switchover was refused or failed.
    pub error: Option<String>,
    /// The body as served, for failure messages.
    pub body: String,
}

/// `POST /failover` on keyward's admin port (blocking). Panics unless the
/// body is JSON.
pub fn post_failover(admin_port: u16) -> FailoverAnswer {
    let (status, body) = super::http::http_post(admin_port, "/failover", b"");
    let json = Json::parse(&body)
        .unwrap_or_else(|e| panic!("POST /failover answered {status} with non-JSON ({e}): {body}"));
    let text = |k: &str| json.get(k).and_then(Json::as_str).map(str::to_string);
    FailoverAnswer {
        status,
        ok: match json.get("ok") {
            Some(Json::Bool(b)) => Some(*b),
            _ => None,
        },
        old: text("old"),
        new: text("new"),
        held_ms: match json.get("held_ms") {
            Some(Json::Num(n)) => Some(*n),
            _ => None,
        },
        error: text("error"),
        body,
    }
}

/// A minimal JSON value: enough to read admin endpoints without a JSON
/// dependency in the test crate.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parse a complete JSON document.
    pub fn parse(text: &str) -> Result<Json, String> {
        let b = text.as_bytes();
        let mut pos = 0;
        let v = json_value(b, &mut pos)?;
        skip_ws(b, &mut pos);
        if pos != b.len() {
            return Err(format!("trailing data at byte {pos}"));
        }
        Ok(v)
    }

    /// Member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn skip_ws(b: &[u8], pos: &mut usize) {
    while *pos < b.len() && b[*pos].is_ascii_whitespace() {
        *pos += 1;
    }
}

fn json_value(b: &[u8], pos: &mut usize) -> Result<Json, String> {
    skip_ws(b, pos);
    let lit = |pos: &mut usize, word: &str, v: Json| {
        if b[*pos..].starts_with(word.as_bytes()) {
            *pos += word.len();
            Ok(v)
        } else {
            Err(format!("unexpected token at byte {pos}"))
        }
    };
    match b.get(*pos) {
        None => Err("unexpected end".into()),
        Some(b'n') => lit(pos, "null", Json::Null),
        Some(b't') => lit(pos, "true", Json::Bool(true)),
        Some(b'f') => lit(pos, "false", Json::Bool(false)),
        Some(b'"') => json_string(b, pos).map(Json::Str),
        Some(b'[') => {
            *pos += 1;
            let mut items = Vec::new();
            skip_ws(b, pos);
            if b.get(*pos) == Some(&b']') {
                *pos += 1;
                return Ok(Json::Arr(items));
            }
            loop {
                items.push(json_value(b, pos)?);
                skip_ws(b, pos);
                match b.get(*pos) {
                    Some(b',') => *pos += 1,
                    Some(b']') => {
                        *pos += 1;
                        return Ok(Json::Arr(items));
                    }
                    _ => return Err(format!("expected , or ] at byte {pos}")),
                }
            }
        }
        Some(b'{') => {
            *pos += 1;
            let mut members = Vec::new();
            skip_ws(b, pos);
            if b.get(*pos) == Some(&b'}') {
                *pos += 1;
                return Ok(Json::Obj(members));
            }
            loop {
                skip_ws(b, pos);
                let k = json_string(b, pos)?;
                skip_ws(b, pos);
                if b.get(*pos) != Some(&b':') {
                    return Err(format!("expected : at byte {pos}"));
                }
                *pos += 1;
                members.push((k, json_value(b, pos)?));
                skip_ws(b, pos);
                match b.get(*pos) {
                    Some(b',') => *pos += 1,
                    Some(b'}') => {
                        *pos += 1;
                        return Ok(Json::Obj(members));
                    }
                    _ => return Err(format!("expected , or }} at byte {pos}")),
                }
            }
        }
        Some(_) => {
            let start = *pos;
            while *pos < b.len()
                && matches!(b[*pos], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
            {
                *pos += 1;
            }
            std::str::from_utf8(&b[start..*pos])
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .map(Json::Num)
                .ok_or_else(|| format!("bad value at byte {start}"))
        }
    }
}

fn json_string(b: &[u8], pos: &mut usize) -> Result<String, String> {
    if b.get(*pos) != Some(&b'"') {
        return Err(format!("expected string at byte {pos}"));
    }
    *pos += 1;
    let mut out: Vec<u8> = Vec::new();
    loop {
        match b.get(*pos) {
            None => return Err("unterminated string".into()),
            Some(b'"') => {
                *pos += 1;
                return String::from_utf8(out).map_err(|_| "non-UTF-8 string".into());
            }
            Some(b'\\') => {
                let c = *b.get(*pos + 1).ok_or("unterminated escape")?;
                *pos += 2;
                match c {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'u' => {
                        let hex = b
                            .get(*pos..*pos + 4)
                            .and_then(|h| std::str::from_utf8(h).ok())
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .ok_or("bad \\u escape")?;
                        *pos += 4;
                        // Surrogate pairs never occur in addresses; map
                        // them to U+FFFD rather than failing.
                        let ch = char::from_u32(hex).unwrap_or('\u{fffd}');
                        out.extend_from_slice(ch.to_string().as_bytes());
                    }
                    other => out.push(other),
                }
            }
            Some(&c) => {
                out.push(c);
                *pos += 1;
            }
        }
    }
}

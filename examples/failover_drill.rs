//! Failover drill: what clients writing through keyward see when the master
//! dies, freezes, or is switched over on purpose.
//!
//! For every scenario and round the drill starts a fresh stack on free
//! loopback ports in a temp dir (a master, two replicas, three Sentinels with
//! `down-after-milliseconds 1000` and `failover-timeout 10000`, keyward in
//! front of them), lets `--writers` connections write through keyward as
//! fast as they can (one request at a time each, `SET w<conn>:<seq> <seq> NX`
//! over raw RESP), and after about a second injects the fault:
//!
//! - `kill`: SIGKILL the master;
//! - `stop`: SIGSTOP the master, wait until a majority of the Sentinels name
//!   another master, then SIGCONT it: the old master comes back believing it
//!   is still the master (a zombie) until Sentinel reconfigures it, ~8 s
//!   later; its keyspace is read in that window;
//! - `planned`: `POST /failover` on keyward's admin port.
//!
//! Writes go on until ~3 s after the new master is named and writes succeed
//! again; then every key on the new master is read back (SCAN + MGET) and
//! compared with what the clients were told.
//!
//! Definitions:
//! - *gap*: on one connection, the longest time between two consecutive
//!   successful replies (`+OK`). "max gap" is the longest over all
//!   connections; "p50 gap" the median of the per-connection longest gaps.
//! - *sentinel switch*: fault -> the first moment a majority of the
//!   Sentinels answer `SENTINEL GET-MASTER-ADDR-BY-NAME` with the same new
//!   master (polled every 10 ms).
//! - *keyward resume*: fault (signal delivered, or POST sent) -> the end of
//!   the outage, i.e. the first `+OK` after the first gap longer than
//!   100 ms that ends after the fault, earliest over the connections. It
//!   may be earlier than the sentinel switch: keyward adopts the replica
//!   Sentinel promotes as soon as it answers `ROLE` master, before the
//!   Sentinels publish it.
//! - *stall after resume*: the longest further gap > 100 ms on a connection
//!   after its outage ended (a second hold after the switch).
//! - *lost*: a write answered `+OK` whose key is missing on the new master
//!   or holds another value. Sentinel replication is asynchronous, so after
//!   a SIGKILL this is Redis's own window, reported but not a target.
//! - *duplicates*: evidence that a write was applied twice or that a value
//!   nobody sent appeared: a `SET .. NX` answered nil (the key already
//!   existed, so this very command had run before: a replay), a key holding
//!   a value never sent for it, a `w*` key never sent at all, or (stop) a
//!   key sent after the freeze that is on both the zombie and the new master
//!   (the zombie never replicates to the new master, so it was sent twice).
//!   An error reply for a write that nevertheless landed is *not* a
//!   duplicate: keyward says such an outcome is unknown.
//! - *writes on fenced master* (stop): `w*` keys on the zombie that are not
//!   on the new master and that either a client sent after the switch
//!   moment, or that the zombie acknowledged after it woke up (its `+OK`
//!   reached the client): a write keyward let through to, or acknowledged
//!   from, a deposed master. Each of these is also a lost acknowledged
//!   write when it was answered `+OK`. Keys only on the zombie whose client
//!   got an error were in the frozen master's socket buffer when it froze
//!   (at most one per connection): unavoidable, reported as "zombie
//!   in-flight" only. Keys acknowledged before the freeze that never reached
//!   a replica are Redis's asynchronous replication window: lost, not fenced.
//!
//! Targets (any miss in any round makes the exit status 1): kill: max gap <=
//! sentinel switch + 0.5 s and < 3 s; planned: no errors, nothing lost, max
//! gap < 1.5 s; everywhere: no duplicates and no writes on the fenced master.
//!
//! ```text
//! cargo build --release --bin keyward --example failover_drill
//! target/release/examples/failover_drill --keyward target/release/keyward \
//!     [--rounds 3] [--writers 8] [--scenarios kill,stop,planned] [--redis-server redis-server] [--keep]
//! ```
//! (`scripts/failover-drill` does both.) Env: `KEYWARD_BIN`, `REDIS_SERVER`,
//! `ROUNDS`, `WRITERS` as defaults for the flags. `--keep` keeps every
//! round's folder (configs, logs) and prints where. Per-round details go to
//! stderr, the markdown table to stdout.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASTER_NAME: &str = "mymaster";
/// Writes before the fault.
const WARMUP: Duration = Duration::from_secs(1);
/// Writes after the new master is named and writes succeed again.
const AFTER: Duration = Duration::from_secs(3);
/// The fault must be over (new master named, writes resumed) by then.
const SWITCH_DEADLINE: Duration = Duration::from_secs(25);
/// A single write that takes longer is abandoned (keyward holds at most
/// `sentinel.hold_ms`, 5 s by default, then answers -MASTERDOWN).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-probe timeout of the drill's own polling connections.
const PROBE: Duration = Duration::from_millis(500);
/// Startup deadlines: a process answering, replication up, Sentinel
/// discovery (hello messages every 2 s), keyward /ready.
const START_DEADLINE: Duration = Duration::from_secs(15);
/// Requests in a frozen master's socket buffer are what it executes first
/// when it wakes up; read the zombie after it had this long to do so.
const ZOMBIE_SETTLE: Duration = Duration::from_millis(300);
/// A gap between two acks on one connection longer than this is an outage
/// (acks normally come every few tens of microseconds).
const STALL: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------ args --

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Kill,
    Stop,
    Planned,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "SIGKILL master",
            Scenario::Stop => "SIGSTOP master (zombie)",
            Scenario::Planned => "planned (POST /failover)",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Stop => "stop",
            Scenario::Planned => "planned",
        }
    }
}

struct Args {
    keyward: PathBuf,
    redis_server: String,
    rounds: usize,
    writers: usize,
    scenarios: Vec<Scenario>,
    /// Keep every round's temp dir (configs and logs) instead of deleting it.
    keep: bool,
}

fn parse_args() -> Result<Args, String> {
    let env_num = |name: &str, default: usize| -> Result<usize, String> {
        match std::env::var(name) {
            Ok(v) => v.parse().map_err(|e| format!("{name}={v}: {e}")),
            Err(_) => Ok(default),
        }
    };
    let mut args = Args {
        keyward: std::env::var_os("KEYWARD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/release/keyward")),
        redis_server: std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()),
        rounds: env_num("ROUNDS", 3)?,
        writers: env_num("WRITERS", 8)?,
        scenarios: vec![Scenario::Kill, Scenario::Stop, Scenario::Planned],
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if flag == "--keep" {
            args.keep = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--keyward" => args.keyward = PathBuf::from(&value),
            "--redis-server" => args.redis_server = value,
            "--rounds" => args.rounds = value.parse().map_err(|e| bad(&e))?,
            "--writers" => args.writers = value.parse().map_err(|e| bad(&e))?,
            "--scenarios" => {
                args.scenarios = value
                    .split(',')
                    .map(|s| match s.trim() {
                        "kill" => Ok(Scenario::Kill),
                        "stop" => Ok(Scenario::Stop),
                        "planned" => Ok(Scenario::Planned),
                        other => Err(bad(&format!("unknown scenario {other:?}"))),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.rounds == 0 || args.writers == 0 || args.scenarios.is_empty() {
        return Err("--rounds, --writers and --scenarios must not be zero/empty".into());
    }
    // Absolute, because every process runs in its own folder.
    args.keyward = std::fs::canonicalize(&args.keyward).map_err(|e| {
        format!(
            "keyward binary {}: {e} (build it: cargo build --release --bin keyward)",
            args.keyward.display()
        )
    })?;
    if args.redis_server.contains('/') {
        args.redis_server = std::fs::canonicalize(&args.redis_server)
            .map_err(|e| format!("--redis-server {}: {e}", args.redis_server))?
            .to_string_lossy()
            .into_owned();
    }
    Ok(args)
}

// ------------------------------------------------------------------ RESP --

#[derive(Debug, Clone)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Int(n) => Some(n.to_string()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
    fn items(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(Some(a)) => Some(a),
            _ => None,
        }
    }
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn num(b: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad RESP number {:?}", String::from_utf8_lossy(b)))
}

/// One RESP2 reply from the start of `buf`: `Ok(None)` if incomplete.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some((l, mut used)) = line(&buf[1..]) else {
        return Ok(None);
    };
    used += 1;
    let reply = match tag {
        b'+' => Reply::Simple(String::from_utf8_lossy(l).into_owned()),
        b'-' => Reply::Error(String::from_utf8_lossy(l).into_owned()),
        b':' => Reply::Int(num(l)?),
        b'$' => {
            let n = num(l)?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let n = n as usize;
                if buf.len() < used + n + 2 {
                    return Ok(None);
                }
                let v = buf[used..used + n].to_vec();
                used += n + 2;
                Reply::Bulk(Some(v))
            }
        }
        b'*' => {
            let n = num(l)?;
            if n < 0 {
                Reply::Array(None)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    match parse(&buf[used..])? {
                        Some((r, u)) => {
                            items.push(r);
                            used += u;
                        }
                        None => return Ok(None),
                    }
                }
                Reply::Array(Some(items))
            }
        }
        other => return Err(format!("unexpected RESP type byte {other:#04x}")),
    };
    Ok(Some((reply, used)))
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.clear();
    let _ = write!(Fmt(out), "*{}\r\n", args.len());
    for a in args {
        let _ = write!(Fmt(out), "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// `write!` into a `Vec<u8>`.
struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A plain RESP2 connection.
struct Conn {
    s: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
}

impl Conn {
    async fn connect(port: u16, timeout: Duration) -> std::io::Result<Conn> {
        let s = tokio::time::timeout(timeout, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: BytesMut::with_capacity(16 * 1024),
            out: Vec::with_capacity(256),
        })
    }

    async fn read_reply(&mut self) -> std::io::Result<Reply> {
        loop {
            match parse(&self.buf) {
                Ok(Some((r, used))) => {
                    self.buf.advance(used);
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
        }
    }

    /// Send pre-encoded bytes and read one reply.
    async fn roundtrip(&mut self, bytes: &[u8]) -> std::io::Result<Reply> {
        self.s.write_all(bytes).await?;
        self.read_reply().await
    }

    async fn call(&mut self, args: &[&[u8]], timeout: Duration) -> std::io::Result<Reply> {
        let mut out = std::mem::take(&mut self.out);
        encode(&mut out, args);
        let r = tokio::time::timeout(timeout, self.roundtrip(&out)).await;
        self.out = out;
        r.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "reply timeout"))?
    }
}

/// One command on a fresh connection; `None` if the node does not answer
/// within [`PROBE`].
async fn ask(port: u16, args: &[&[u8]]) -> Option<Reply> {
    let mut c = Conn::connect(port, PROBE).await.ok()?;
    c.call(args, PROBE).await.ok()
}

async fn role(port: u16) -> Option<String> {
    ask(port, &[b"ROLE"]).await?.items()?.first()?.text()
}

// ------------------------------------------------------------------ HTTP --

/// A minimal HTTP/1.1 request with `Connection: close`: (status, body).
async fn http(
    port: u16,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{method} {path}: no answer within {timeout:?}"))?
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ------------------------------------------------------------- processes --

/// A child process killed (SIGKILL, which also ends a stopped one) and
/// reaped on drop, so no exit path leaves servers behind.
struct Proc {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| format!("spawn {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT by pid (std has no API for other signals).
    fn signal(&self, sig: &str) -> Result<(), String> {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .map_err(|e| format!("kill -{sig} {}: {e}", self.pid))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("kill -{sig} {} failed: {st}", self.pid))
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!(
            "---- last lines of {} ({}) ----\n{}",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct free loopback ports (all held open while choosing).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let socks: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    socks
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()).map_err(|e| e.to_string()))
        .collect()
}

/// Poll `f` every `every` until it yields `Some`, or fail with `what`
/// (and the last thing `f` reported) after `timeout`.
async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_chance = Instant::now() >= deadline;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if last_chance => {
                return Err(format!(
                    "timed out after {timeout:?} waiting until {what}: {e}"
                ))
            }
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

// ----------------------------------------------------------------- stack --

/// One master, two replicas, three Sentinels and keyward, each on its own
/// free port with its files under one temp dir. Field order is drop order:
/// keyward goes first, the temp dir last.
struct Stack {
    keyward: Proc,
    kport: u16,
    aport: u16,
    sentinels: Vec<(Proc, u16)>,
    replicas: Vec<(Proc, u16)>,
    master: Proc,
    mport: u16,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(args: &Args) -> Result<Stack, String> {
        let mut last = String::new();
        // A port picked free can be taken before the server binds it; a
        // fresh set of ports is the cure.
        for _ in 0..3 {
            match Stack::try_start(args).await {
                Ok(s) => return Ok(s),
                Err(e) if e.contains("in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn try_start(args: &Args) -> Result<Stack, String> {
        let dir = tempfile::Builder::new()
            .prefix("keyward-drill-")
            .disable_cleanup(args.keep)
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let p = free_ports(8)?;
        let (mport, rports, sports, kport, aport) =
            (p[0], [p[1], p[2]], [p[3], p[4], p[5]], p[6], p[7]);

        let master = start_redis(args, dir.path(), "master", mport, &[]).await?;
        let mut replicas = Vec::new();
        for (i, port) in rports.into_iter().enumerate() {
            let m = mport.to_string();
            let r = start_redis(
                args,
                dir.path(),
                &format!("replica{}", i + 1),
                port,
                &[
                    "--replicaof",
                    "127.0.0.1",
                    &m,
                    "--replica-announce-ip",
                    "127.0.0.1",
                ],
            )
            .await?;
            replicas.push((r, port));
        }
        // Replicas in sync before the Sentinels start: a Sentinel learns
        // replicas from the master's INFO (every 10 s once running).
        for (r, port) in &replicas {
            let port = *port;
            poll(
                "replica link up",
                START_DEADLINE,
                Duration::from_millis(20),
                || async move {
                    let info = ask(port, &[b"INFO", b"replication"])
                        .await
                        .and_then(|r| r.text());
                    match info {
                        Some(t) if t.contains("master_link_status:up") => Ok(()),
                        other => Err(format!("INFO replication: {other:?}")),
                    }
                },
            )
            .await
            .map_err(|e| format!("{e}\n{}", r.tail()))?;
        }

        let mut sentinels = Vec::new();
        for (i, port) in sports.into_iter().enumerate() {
            let name = format!("sentinel{}", i + 1);
            let sdir = dir.path().join(&name);
            std::fs::create_dir_all(&sdir).map_err(|e| e.to_string())?;
            let conf = sdir.join("sentinel.conf");
            let text = format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 sentinel announce-ip 127.0.0.1\n\
                 sentinel resolve-hostnames no\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {mport} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n\
                 logfile \"{d}/sentinel.log\"\n\
                 dir \"{d}\"\n",
                d = sdir.display()
            );
            std::fs::write(&conf, text).map_err(|e| e.to_string())?;
            let mut proc = Proc::spawn(
                &name,
                Command::new(&args.redis_server)
                    .arg(&conf)
                    .arg("--sentinel")
                    .current_dir(&sdir),
                &sdir.join("stdio.log"),
            )?;
            proc.log = sdir.join("sentinel.log");
            wait_ping(&mut proc, port).await?;
            sentinels.push((proc, port));
        }
        // Every Sentinel knows its 2 peers (hello messages every 2 s) and
        // both replicas as healthy, or a failover could not pick one.
        for (s, port) in &sentinels {
            let port = *port;
            poll(
                "sentinel discovery",
                START_DEADLINE,
                Duration::from_millis(50),
                || async move {
                    let peers = ask(port, &[b"SENTINEL", b"SENTINELS", MASTER_NAME.as_bytes()])
                        .await
                        .and_then(|r| r.items().map(|a| a.len()));
                    let reps = ask(port, &[b"SENTINEL", b"REPLICAS", MASTER_NAME.as_bytes()]).await;
                    let healthy = reps.as_ref().and_then(|r| r.items()).map(|a| {
                        a.iter()
                            .filter(|r| field(r, "flags").as_deref() == Some("slave"))
                            .count()
                    });
                    if peers == Some(2) && healthy == Some(2) {
                        Ok(())
                    } else {
                        Err(format!(
                            "knows {peers:?} peers, {healthy:?} healthy replicas"
                        ))
                    }
                },
            )
            .await
            .map_err(|e| format!("{e}\n{}", s.tail()))?;
        }

        let kdir = dir.path().join("keyward");
        std::fs::create_dir_all(&kdir).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&args.keyward);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{kport}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{aport}"));
        for (_, port) in &sentinels {
            cmd.arg("--sentinel").arg(format!("127.0.0.1:{port}"));
        }
        cmd.arg("--master-name").arg(MASTER_NAME).current_dir(&kdir);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut keyward = Proc::spawn("keyward", &mut cmd, &kdir.join("keyward.log"))?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if !keyward.running() {
                return Err(format!("keyward exited during startup\n{}", keyward.tail()));
            }
            if let Ok((200, _)) = http(aport, "GET", "/ready", PROBE).await {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "keyward not ready within {START_DEADLINE:?}\n{}",
                    keyward.tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Stack {
            keyward,
            kport,
            aport,
            sentinels,
            replicas,
            master,
            mport,
            _dir: dir,
        })
    }

    fn tails(&self) -> String {
        let mut s = self.keyward.tail();
        for p in [&self.master]
            .into_iter()
            .chain(self.replicas.iter().map(|r| &r.0))
            .chain(self.sentinels.iter().map(|s| &s.0))
        {
            s.push('\n');
            s.push_str(&p.tail());
        }
        s
    }
}

/// A field of a `SENTINEL REPLICAS` entry (a flat name/value array).
fn field(entry: &Reply, name: &str) -> Option<String> {
    let items = entry.items()?;
    items
        .chunks(2)
        .find(|kv| kv[0].text().as_deref() == Some(name))
        .and_then(|kv| kv.get(1)?.text())
}

async fn start_redis(
    args: &Args,
    dir: &Path,
    name: &str,
    port: u16,
    extra: &[&str],
) -> Result<Proc, String> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&args.redis_server);
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--dir")
        .arg(&d)
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        // Otherwise a full sync waits 5 s for more replicas to join.
        .args(["--repl-diskless-sync-delay", "0"])
        .args(extra)
        .current_dir(&d);
    let mut p = Proc::spawn(name, &mut cmd, &d.join("redis.log"))?;
    wait_ping(&mut p, port).await?;
    Ok(p)
}

async fn wait_ping(p: &mut Proc, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if !p.running() {
            let tail = p.tail();
            let why = if tail.to_ascii_lowercase().contains("address already in use") {
                "port in use"
            } else {
                "exited"
            };
            return Err(format!(
                "{} on port {port} {why} during startup\n{tail}",
                p.name
            ));
        }
        if matches!(ask(port, &[b"PING"]).await, Some(Reply::Simple(s)) if s == "PONG") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} on port {port} did not answer PING\n{}",
                p.name,
                p.tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --------------------------------------------------------------- writers --

#[derive(Debug, Clone)]
enum Res {
    Ok,
    /// `SET .. NX` found the key already there.
    Nil,
    /// An error reply, or a client-side failure (`EOF ...`, `TIMEOUT ...`).
    Err(String),
}

/// One write: seq N is element N-1 of its writer's log.
struct Rec {
    sent: Instant,
    done: Instant,
    res: Res,
}

#[derive(Default)]
struct WriterLog {
    recs: Vec<Rec>,
    /// Failed reconnects to keyward (no write was sent).
    connect_errors: usize,
}

/// Shared progress, for the round's control loop.
struct Progress {
    base: Instant,
    /// Latest send time (µs since base) of a write answered +OK.
    last_ok_sent_us: AtomicU64,
    acks: AtomicU64,
}

async fn writer(id: usize, port: u16, stop: Arc<AtomicBool>, prog: Arc<Progress>) -> WriterLog {
    let mut log = WriterLog {
        recs: Vec::with_capacity(1 << 15),
        ..WriterLog::default()
    };
    let mut conn: Option<Conn> = None;
    let mut out = Vec::with_capacity(64);
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(port, Duration::from_secs(1)).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    log.connect_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        seq += 1;
        let key = format!("w{id}:{seq}");
        let val = seq.to_string();
        encode(&mut out, &[b"SET", key.as_bytes(), val.as_bytes(), b"NX"]);
        let sent = Instant::now();
        let r = tokio::time::timeout(WRITE_TIMEOUT, c.roundtrip(&out)).await;
        let done = Instant::now();
        let res = match r {
            Err(_) => {
                conn = None;
                Res::Err(format!("TIMEOUT no reply within {WRITE_TIMEOUT:?}"))
            }
            Ok(Err(e)) => {
                conn = None;
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Res::Err("EOF connection closed by keyward".into())
                } else {
                    Res::Err(format!("IO {e}"))
                }
            }
            Ok(Ok(Reply::Simple(s))) if s == "OK" => Res::Ok,
            Ok(Ok(Reply::Bulk(None))) => Res::Nil,
            Ok(Ok(Reply::Error(e))) => Res::Err(e),
            Ok(Ok(other)) => Res::Err(format!("UNEXPECTED reply {other:?}")),
        };
        if matches!(res, Res::Ok) {
            let us = sent.duration_since(prog.base).as_micros() as u64;
            prog.last_ok_sent_us.fetch_max(us, Ordering::Relaxed);
            prog.acks.fetch_add(1, Ordering::Relaxed);
        }
        log.recs.push(Rec { sent, done, res });
    }
    log
}

// --------------------------------------------------------------- watcher --

#[derive(Default, Clone)]
struct Seen {
    /// First moment a majority of the Sentinels named `new_master`.
    named_at: Option<Instant>,
    new_master: Option<String>,
    /// keyward's /topology: first state other than healthy, first time it
    /// names a master other than the old one, and every change seen.
    kw_unhealthy_at: Option<Instant>,
    kw_switched_at: Option<Instant>,
    kw_changes: Vec<(Instant, String)>,
}

/// Poll the Sentinels every 10 ms (persistent connections) until `stop`.
async fn watch_sentinels(
    ports: Vec<u16>,
    old: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let majority = ports.len() / 2 + 1;
    let mut conns: Vec<Option<Conn>> = ports.iter().map(|_| None).collect();
    let cmd: [&[u8]; 3] = [
        b"SENTINEL",
        b"GET-MASTER-ADDR-BY-NAME",
        MASTER_NAME.as_bytes(),
    ];
    while !stop.load(Ordering::Relaxed) {
        let mut names: Vec<Option<String>> = Vec::with_capacity(ports.len());
        for (i, port) in ports.iter().enumerate() {
            if conns[i].is_none() {
                conns[i] = Conn::connect(*port, PROBE).await.ok();
            }
            let mut name = None;
            if let Some(c) = conns[i].as_mut() {
                match c.call(&cmd, Duration::from_millis(200)).await {
                    Ok(r) => {
                        name = r.items().and_then(|a| {
                            Some(format!("{}:{}", a.first()?.text()?, a.get(1)?.text()?))
                        })
                    }
                    Err(_) => conns[i] = None,
                }
            }
            names.push(name);
        }
        let now = Instant::now();
        for cand in names.iter().flatten() {
            if *cand == old {
                continue;
            }
            let votes = names.iter().filter(|n| n.as_deref() == Some(cand)).count();
            if votes >= majority {
                let mut s = seen.lock().unwrap();
                if s.named_at.is_none() {
                    s.named_at = Some(now);
                    s.new_master = Some(cand.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Poll keyward's /topology every 20 ms until `stop`.
async fn watch_keyward(aport: u16, old: String, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok((200, body)) = http(aport, "GET", "/topology", PROBE).await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                let state = v["state"].as_str().unwrap_or("?").to_string();
                let master = v["master"].as_str().unwrap_or("-").to_string();
                let now = Instant::now();
                let desc = format!("{state} master={master} epoch={}", v["epoch"]);
                let mut s = seen.lock().unwrap();
                if desc != last {
                    s.kw_changes.push((now, desc.clone()));
                    last = desc;
                }
                if state != "healthy" && s.kw_unhealthy_at.is_none() {
                    s.kw_unhealthy_at = Some(now);
                }
                if master != old && master != "-" && s.kw_switched_at.is_none() {
                    s.kw_switched_at = Some(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --------------------------------------------------------------- readers --

/// Every `w*` key on the node and its value (SCAN + MGET), or an error.
async fn read_keyspace(port: u16) -> Result<HashMap<String, Vec<u8>>, String> {
    let t = Duration::from_secs(10);
    let mut c = Conn::connect(port, PROBE)
        .await
        .map_err(|e| format!("connect :{port}: {e}"))?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = "0".to_string();
    for _ in 0..1_000_000 {
        let r = c
            .call(
                &[
                    b"SCAN",
                    cursor.as_bytes(),
                    b"MATCH",
                    b"w*",
                    b"COUNT",
                    b"2000",
                ],
                t,
            )
            .await
            .map_err(|e| format!("SCAN: {e}"))?;
        let items = r.items().ok_or(format!("SCAN: unexpected {r:?}"))?;
        cursor = items
            .first()
            .and_then(|c| c.text())
            .ok_or("SCAN: no cursor")?;
        for k in items.get(1).and_then(|a| a.items()).unwrap_or(&[]) {
            keys.push(k.text().ok_or("SCAN: bad key")?);
        }
        if cursor == "0" {
            break;
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let mut map = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(chunk.iter().map(|k| k.as_bytes()));
        let r = c.call(&args, t).await.map_err(|e| format!("MGET: {e}"))?;
        let vals = r.items().ok_or(format!("MGET: unexpected {r:?}"))?;
        for (k, v) in chunk.iter().zip(vals) {
            if let Reply::Bulk(Some(v)) = v {
                map.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(map)
}

/// MGET `keys` (in chunks): value per key, `None` if missing.
async fn mget(port: u16, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let t = Duration::from_secs(10);
    let mut c = Conn::connect(port, PROBE)
        .await
        .map_err(|e| format!("connect :{port}: {e}"))?;
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(chunk.iter().map(|k| k.as_bytes()));
        let r = c.call(&args, t).await.map_err(|e| format!("MGET: {e}"))?;
        let vals = r.items().ok_or(format!("MGET: unexpected {r:?}"))?;
        if vals.len() != chunk.len() {
            return Err(format!(
                "MGET: {} values for {} keys",
                vals.len(),
                chunk.len()
            ));
        }
        out.extend(vals.iter().map(|v| match v {
            Reply::Bulk(Some(b)) => Some(b.clone()),
            _ => None,
        }));
    }
    Ok(out)
}

/// The zombie's `w*` keys, if it still says it is a master before and
/// after the read (once Sentinel turns it into a replica it flushes).
async fn read_zombie(port: u16) -> Result<HashMap<String, Vec<u8>>, String> {
    let before = role(port).await;
    if before.as_deref() != Some("master") {
        return Err(format!("old master ROLE is {before:?}, not master"));
    }
    let map = read_keyspace(port).await?;
    let after = role(port).await;
    if after.as_deref() != Some("master") {
        return Err(format!("old master turned {after:?} during the read"));
    }
    Ok(map)
}

fn parse_key(k: &str) -> Option<(usize, u64)> {
    let (c, s) = k.strip_prefix('w')?.split_once(':')?;
    Some((c.parse().ok()?, s.parse().ok()?))
}

// ----------------------------------------------------------------- round --

#[derive(Clone)]
struct RoundResult {
    failure: Option<String>,
    sent: usize,
    acked: usize,
    switch_s: Option<f64>,
    resume_s: Option<f64>,
    max_gap_s: f64,
    p50_gap_s: f64,
    /// Longest gap > STALL on a connection after its first outage ended.
    later_stall_s: f64,
    later_stall_at: Option<(Instant, Instant)>,
    errors: BTreeMap<String, usize>,
    lost: usize,
    dups: usize,
    fenced: usize,
    zombie_inflight: Option<usize>,
    landed_despite_error: usize,
    notes: Vec<String>,
}

impl Default for RoundResult {
    fn default() -> Self {
        RoundResult {
            failure: None,
            sent: 0,
            acked: 0,
            switch_s: None,
            resume_s: None,
            max_gap_s: f64::NAN,
            p50_gap_s: f64::NAN,
            later_stall_s: 0.0,
            later_stall_at: None,
            errors: BTreeMap::new(),
            lost: 0,
            dups: 0,
            fenced: 0,
            zombie_inflight: None,
            landed_despite_error: 0,
            notes: Vec::new(),
        }
    }
}

impl RoundResult {
    fn error_count(&self) -> usize {
        self.errors.values().sum()
    }
    fn diff_s(&self) -> Option<f64> {
        Some(self.resume_s? - self.switch_s?)
    }
    /// Targets this round missed.
    fn misses(&self, sc: Scenario) -> Vec<String> {
        let mut m = Vec::new();
        if let Some(f) = &self.failure {
            m.push(format!("round failed: {}", first_line(f)));
            return m;
        }
        if self.dups > 0 {
            m.push(format!("{} duplicates", self.dups));
        }
        if self.fenced > 0 {
            m.push(format!("{} writes on fenced master", self.fenced));
        }
        match sc {
            Scenario::Kill => {
                let switch = self.switch_s.unwrap_or(f64::NAN);
                if self.max_gap_s.is_nan() || self.max_gap_s > switch + 0.5 {
                    m.push(format!(
                        "max gap {:.2}s > sentinel switch {switch:.2}s + 0.5s",
                        self.max_gap_s
                    ));
                }
                if self.max_gap_s.is_nan() || self.max_gap_s >= 3.0 {
                    m.push(format!("max gap {:.2}s >= 3s", self.max_gap_s));
                }
            }
            Scenario::Planned => {
                if self.error_count() > 0 {
                    m.push(format!("{} errors", self.error_count()));
                }
                if self.lost > 0 {
                    m.push(format!("{} lost", self.lost));
                }
                if self.max_gap_s.is_nan() || self.max_gap_s >= 1.5 {
                    m.push(format!("max gap {:.2}s >= 1.5s", self.max_gap_s));
                }
            }
            Scenario::Stop => {}
        }
        m
    }
}

/// `hh:mm:ss.mmm` of a wall-clock time, UTC (the log timestamps' form).
fn utc(t: std::time::SystemTime) -> String {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Signed seconds from `a` to `b`.
fn delta(a: Instant, b: Instant) -> f64 {
    if b >= a {
        secs(b - a)
    } else {
        -secs(a - b)
    }
}

async fn run_round(args: &Args, sc: Scenario) -> RoundResult {
    let mut res = RoundResult::default();
    let mut stack = match Stack::start(args).await {
        Ok(s) => s,
        Err(e) => {
            res.failure = Some(format!("stack did not start: {e}"));
            return res;
        }
    };
    if let Err(e) = drive(args, sc, &mut stack, &mut res).await {
        res.failure = Some(e);
    }
    if res.failure.is_some() {
        eprintln!("{}", stack.tails());
    }
    res
}

async fn drive(
    args: &Args,
    sc: Scenario,
    stack: &mut Stack,
    res: &mut RoundResult,
) -> Result<(), String> {
    let old = format!("127.0.0.1:{}", stack.mport);
    if args.keep {
        res.notes
            .push(format!("files kept in {}", stack._dir.path().display()));
    }
    let prog = Arc::new(Progress {
        base: Instant::now(),
        last_ok_sent_us: AtomicU64::new(0),
        acks: AtomicU64::new(0),
    });
    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writers: Vec<_> = (0..args.writers)
        .map(|id| tokio::spawn(writer(id, stack.kport, stop_writers.clone(), prog.clone())))
        .collect();
    let sports: Vec<u16> = stack.sentinels.iter().map(|s| s.1).collect();
    let watchers = [
        tokio::spawn(watch_sentinels(
            sports.clone(),
            old.clone(),
            seen.clone(),
            stop_watch.clone(),
        )),
        tokio::spawn(watch_keyward(
            stack.aport,
            old.clone(),
            seen.clone(),
            stop_watch.clone(),
        )),
    ];

    // Stop the background tasks however this function ends.
    struct StopOnDrop(Arc<AtomicBool>, Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
            self.1.store(true, Ordering::Relaxed);
        }
    }
    let _guard = StopOnDrop(stop_writers.clone(), stop_watch.clone());

    tokio::time::sleep(WARMUP).await;
    if prog.acks.load(Ordering::Relaxed) == 0 {
        return Err("no write succeeded through keyward before the fault".into());
    }

    // ---- the fault
    // The fault's moment is taken once the signal has been delivered
    // (`kill` returned), so no write sent after it can have run on the old
    // master before it died or froze.
    let mut failover_call = None;
    match sc {
        Scenario::Kill => stack.master.kill(),
        Scenario::Stop => stack.master.signal("STOP")?,
        Scenario::Planned => {
            let aport = stack.aport;
            failover_call = Some(tokio::spawn(async move {
                let r = http(aport, "POST", "/failover", Duration::from_secs(30)).await;
                (r, Instant::now())
            }));
        }
    }
    let fault_at = Instant::now();
    let fault_us = fault_at.duration_since(prog.base).as_micros() as u64;
    res.notes.push(format!(
        "fault at {} UTC (to match the logs)",
        utc(std::time::SystemTime::now())
    ));

    // ---- until the new master is named, writes succeed, and AFTER passed
    let mut cont_at: Option<Instant> = None;
    let mut zombie: Option<Result<HashMap<String, Vec<u8>>, String>> = None;
    let mut zombie_reads = 0;
    let mut end: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = Instant::now();
        let named = seen.lock().unwrap().named_at;
        if sc == Scenario::Stop && named.is_some() && cont_at.is_none() {
            // Taken before the signal: the zombie may answer before
            // `kill` returns.
            let woke = Instant::now();
            stack.master.signal("CONT")?;
            cont_at = Some(woke);
            res.notes.push(format!(
                "SIGCONT sent to the old master at {:+.3}s",
                delta(fault_at, woke)
            ));
        }
        if let Some(c) = cont_at {
            if zombie_reads == 0 && now >= c + ZOMBIE_SETTLE {
                zombie_reads = 1;
                zombie = Some(read_zombie(stack.mport).await);
            }
        }
        let resumed = prog.last_ok_sent_us.load(Ordering::Relaxed) > fault_us;
        if end.is_none() && named.is_some() && resumed {
            end = Some(Instant::now() + AFTER);
        }
        if let Some(e) = end {
            if now >= e && (sc != Scenario::Stop || zombie_reads > 0) {
                break;
            }
        }
        if now >= fault_at + SWITCH_DEADLINE {
            let s = seen.lock().unwrap().clone();
            return Err(format!(
                "no switch within {SWITCH_DEADLINE:?} of the fault: sentinels named {:?}, writes resumed: {resumed}; keyward: {:?}",
                s.new_master,
                s.kw_changes.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>()
            ));
        }
    }
    // Second look at the zombie at the end of the writes: anything keyward
    // sent it after the switch has landed by now.
    if sc == Scenario::Stop {
        let second = read_zombie(stack.mport).await;
        zombie = Some(match (zombie.take(), second) {
            (Some(Ok(mut a)), Ok(b)) => {
                a.extend(b);
                Ok(a)
            }
            (Some(Ok(a)), Err(e)) => {
                res.notes.push(format!("second zombie read skipped: {e}"));
                Ok(a)
            }
            (_, Ok(b)) => Ok(b),
            (Some(Err(e)), Err(_)) | (None, Err(e)) => Err(e),
        });
    }

    stop_writers.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for w in writers {
        match tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(5), w).await {
            Ok(Ok(l)) => logs.push(l),
            Ok(Err(e)) => return Err(format!("writer task failed: {e}")),
            Err(_) => return Err("a writer did not stop".into()),
        }
    }
    stop_watch.store(true, Ordering::Relaxed);
    for w in watchers {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    let seen = seen.lock().unwrap().clone();
    let named_at = seen.named_at.ok_or("sentinels never named a new master")?;
    let new_master = seen.new_master.clone().unwrap_or_default();
    let new_port: u16 = new_master
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or(format!("bad new master address {new_master:?}"))?;
    res.switch_s = Some(delta(fault_at, named_at));

    if let Some(call) = failover_call {
        match tokio::time::timeout(Duration::from_secs(30), call).await {
            Ok(Ok((Ok((status, body)), at))) => {
                res.notes.push(format!(
                    "POST /failover -> {status} {} (answered {:+.3}s after the fault)",
                    body.trim(),
                    delta(fault_at, at)
                ));
                if status != 200 {
                    return Err(format!("POST /failover answered {status}: {}", body.trim()));
                }
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if v["new"].as_str() != Some(new_master.as_str()) {
                    res.notes.push(format!(
                        "WARNING: /failover says new={} but the sentinels name {new_master}",
                        v["new"]
                    ));
                }
            }
            Ok(Ok((Err(e), _))) => return Err(format!("POST /failover: {e}")),
            _ => return Err("POST /failover did not return".into()),
        }
    }
    if let Some(at) = seen.kw_unhealthy_at {
        res.notes.push(format!(
            "keyward left healthy at {:+.3}s",
            delta(fault_at, at)
        ));
    }
    if let Some(at) = seen.kw_switched_at {
        res.notes.push(format!(
            "keyward /topology named the new master at {:+.3}s",
            delta(fault_at, at)
        ));
    }
    let changes: Vec<String> = seen
        .kw_changes
        .iter()
        .map(|(t, d)| format!("{:+.3}s {d}", delta(fault_at, *t)))
        .collect();
    res.notes
        .push(format!("keyward /topology: {}", changes.join(" | ")));

    // ---- gaps, resume, errors
    let mut conn_max_gaps = Vec::new();
    let mut resume: Option<Instant> = None;
    for log in &logs {
        let oks: Vec<Instant> = log
            .recs
            .iter()
            .filter(|r| matches!(r.res, Res::Ok))
            .map(|r| r.done)
            .collect();
        let mut max_gap = Duration::ZERO;
        let mut outage: Option<Instant> = None;
        for w in oks.windows(2) {
            let g = w[1] - w[0];
            max_gap = max_gap.max(g);
            if w[1] > fault_at && g > STALL {
                match outage {
                    None => outage = Some(w[1]),
                    Some(_) => {
                        res.later_stall_s = res.later_stall_s.max(secs(g));
                        if res.later_stall_at.is_none_or(|(at, _)| w[0] < at) {
                            res.later_stall_at = Some((w[0], w[1]));
                        }
                    }
                }
            }
        }
        conn_max_gaps.push(secs(max_gap));
        if let Some(end) = outage {
            resume = Some(resume.map_or(end, |r: Instant| r.min(end)));
        }
        res.sent += log.recs.len();
        res.acked += oks.len();
        for r in &log.recs {
            match &r.res {
                Res::Ok => {}
                Res::Nil => *res.errors.entry("NIL(key existed)".into()).or_default() += 1,
                Res::Err(e) => {
                    let kind = e.split_whitespace().next().unwrap_or("?").to_string();
                    *res.errors.entry(kind).or_default() += 1;
                }
            }
        }
        if log.connect_errors > 0 {
            *res.errors.entry("CONNECT".into()).or_default() += log.connect_errors;
        }
    }
    conn_max_gaps.sort_by(f64::total_cmp);
    res.max_gap_s = conn_max_gaps.last().copied().unwrap_or(f64::NAN);
    res.p50_gap_s = median(&conn_max_gaps).unwrap_or(f64::NAN);
    res.resume_s = resume.map(|r| delta(fault_at, r));
    if let Some((from, to)) = res.later_stall_at {
        res.notes.push(format!(
            "STALL after the resume: no ack from {:+.3}s to {:+.3}s (longest such gap {:.3}s)",
            delta(fault_at, from),
            delta(fault_at, to),
            res.later_stall_s
        ));
    }
    let mut distinct: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for log in &logs {
        for r in &log.recs {
            if let Res::Err(e) = &r.res {
                let short: String = e.chars().take(160).collect();
                distinct
                    .entry(short)
                    .or_insert((0, delta(fault_at, r.done)))
                    .0 += 1;
            }
        }
    }
    for (e, (n, at)) in distinct.iter().take(8) {
        res.notes
            .push(format!("error x{n} (first at {at:+.3}s): {e}"));
    }

    // ---- read back from the new master
    if role(new_port).await.as_deref() != Some("master") {
        return Err(format!(
            "new master {new_master} does not answer ROLE master"
        ));
    }
    let all = read_keyspace(new_port).await?;
    let mut acked_keys = Vec::new();
    let mut acked_seqs = Vec::new();
    for (id, log) in logs.iter().enumerate() {
        for (i, r) in log.recs.iter().enumerate() {
            if matches!(r.res, Res::Ok) {
                acked_keys.push(format!("w{id}:{}", i + 1));
                acked_seqs.push(i + 1);
            }
            if matches!(r.res, Res::Nil) {
                res.dups += 1;
                res.notes.push(format!(
                    "DUPLICATE: SET w{id}:{} NX answered nil: applied twice",
                    i + 1
                ));
            }
        }
    }
    let vals = mget(new_port, &acked_keys).await?;
    let mut lost_examples = Vec::new();
    for ((k, s), v) in acked_keys.iter().zip(&acked_seqs).zip(&vals) {
        if v.as_deref() != Some(s.to_string().as_bytes()) {
            res.lost += 1;
            if lost_examples.len() < 5 {
                lost_examples.push(k.clone());
            }
        }
    }
    if !lost_examples.is_empty() {
        res.notes.push(format!(
            "lost acked writes, e.g. {}",
            lost_examples.join(" ")
        ));
    }
    let rec_of = |k: &str| -> Option<&Rec> {
        let (c, s) = parse_key(k)?;
        logs.get(c)?.recs.get((s as usize).checked_sub(1)?)
    };
    for (k, v) in &all {
        match rec_of(k) {
            None => {
                res.dups += 1;
                res.notes
                    .push(format!("DUPLICATE: {k} on the new master was never sent"));
            }
            Some(r) => {
                let (_, s) = parse_key(k).unwrap_or_default();
                if v.as_slice() != s.to_string().as_bytes() {
                    res.dups += 1;
                    res.notes.push(format!(
                        "DUPLICATE: {k} holds {:?}, never sent for it",
                        String::from_utf8_lossy(v)
                    ));
                } else if matches!(r.res, Res::Err(_)) {
                    res.landed_despite_error += 1;
                }
            }
        }
    }

    // ---- the zombie (stop)
    if sc == Scenario::Stop {
        match zombie {
            Some(Ok(z)) => {
                let (mut inflight, mut unreplicated) = (0, 0);
                for (k, v) in &z {
                    let on_new = all.get(k) == Some(v);
                    let Some(r) = rec_of(k) else {
                        res.dups += 1;
                        res.notes
                            .push(format!("DUPLICATE: {k} on the zombie was never sent"));
                        continue;
                    };
                    if !on_new {
                        // Sent after the switch, or acknowledged by the
                        // zombie once it woke up (after the switch): a
                        // write keyward let reach or acknowledged from the
                        // deposed master.
                        let woke = cont_at.unwrap_or(named_at);
                        if r.sent >= named_at || (matches!(r.res, Res::Ok) && r.done >= woke) {
                            res.fenced += 1;
                            if res.fenced <= 10 {
                                res.notes.push(format!(
                                    "FENCED WRITE: {k} sent {:+.3}s, answered {:+.3}s with {:?}; only on the old master",
                                    delta(fault_at, r.sent),
                                    delta(fault_at, r.done),
                                    r.res
                                ));
                            }
                        } else if matches!(r.res, Res::Ok) {
                            // Acknowledged before the freeze, never reached
                            // a replica: Redis's asynchronous replication.
                            unreplicated += 1;
                            res.notes.push(format!(
                                "unreplicated at the freeze (Redis async replication): {k} sent {:+.3}s, answered {:+.3}s with Ok",
                                delta(fault_at, r.sent),
                                delta(fault_at, r.done),
                            ));
                        } else {
                            inflight += 1;
                            res.notes.push(format!(
                                "zombie in-flight: {k} sent {:+.3}s, answered {:+.3}s with {:?}",
                                delta(fault_at, r.sent),
                                delta(fault_at, r.done),
                                r.res
                            ));
                        }
                    } else if r.sent > fault_at {
                        // The zombie never replicates to the new master, so a
                        // key sent after the freeze on both was sent twice.
                        res.dups += 1;
                        res.notes.push(format!(
                            "DUPLICATE: {k} sent {:+.3}s after the freeze is on the zombie and the new master",
                            delta(fault_at, r.sent)
                        ));
                    }
                }
                res.zombie_inflight = Some(inflight);
                res.notes.push(format!(
                    "zombie had {} w* keys; only there: {} fenced, {unreplicated} acked before the freeze but unreplicated, {inflight} in flight with an error reply",
                    z.len(),
                    res.fenced
                ));
            }
            Some(Err(e)) => return Err(format!("could not read the zombie: {e}")),
            None => return Err("the zombie was never read".into()),
        }
    }
    // keyward must follow the new master too.
    if let Ok((200, body)) = http(stack.aport, "GET", "/topology", PROBE).await {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["master"].as_str() != Some(new_master.as_str()) {
            res.notes.push(format!(
                "WARNING: keyward's master is {} but the sentinels name {new_master}",
                v["master"]
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- report --

fn median(sorted_or_not: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = sorted_or_not
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn worst(v: &[f64]) -> Option<f64> {
    v.iter()
        .copied()
        .filter(|x| !x.is_nan())
        .max_by(f64::total_cmp)
}

fn cell_s(v: &[f64]) -> String {
    match (median(v), worst(v)) {
        (Some(m), Some(w)) => format!("{m:.2} ({w:.2})"),
        _ => "n/a".into(),
    }
}

fn cell_n(v: &[usize]) -> String {
    let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    match (median(&f), worst(&f)) {
        (Some(m), Some(w)) => format!("{m} ({w})"),
        _ => "n/a".into(),
    }
}

fn print_round(sc: Scenario, round: usize, r: &RoundResult) {
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.3}s"));
    eprintln!(
        "[drill] {} round {round}: sentinel switch {}, keyward resume {} ({}), max gap {:.3}s, p50 gap {:.3}s, stall after resume {:.3}s, sent {}, acked {}, errors {:?}, lost {}, duplicates {}, fenced {}, zombie in-flight (error reply) {}, landed despite error {}{}",
        sc.short(),
        f(r.switch_s),
        f(r.resume_s),
        r.diff_s().map_or("n/a".into(), |d| format!("{d:+.3}s vs switch")),
        r.max_gap_s,
        r.p50_gap_s,
        r.later_stall_s,
        r.sent,
        r.acked,
        r.errors,
        r.lost,
        r.dups,
        r.fenced,
        r.zombie_inflight.map_or("-".into(), |n| n.to_string()),
        r.landed_despite_error,
        r.failure.as_deref().map_or(String::new(), |e| format!(", FAILED: {e}")),
    );
    for n in &r.notes {
        eprintln!("[drill]     {n}");
    }
}

async fn drill(args: Args) -> bool {
    let started = Instant::now();
    let mut all: Vec<(Scenario, Vec<RoundResult>)> = Vec::new();
    for &sc in &args.scenarios {
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            eprintln!(
                "[drill] {} round {round}/{}: starting a fresh stack",
                sc.short(),
                args.rounds
            );
            let r = run_round(&args, sc).await;
            print_round(sc, round, &r);
            rounds.push(r);
        }
        all.push((sc, rounds));
    }

    let redis = Command::new(&args.redis_server)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split_whitespace()
                .find_map(|w| w.strip_prefix("v="))
                .map(String::from)
        })
        .unwrap_or_else(|| "?".into());
    println!();
    println!(
        "keyward failover drill: {} round(s) per scenario, {} writer connections (SET w<conn>:<seq> <seq> NX, one at a time each), redis {redis}, 3 sentinels (quorum 2, down-after 1000 ms, failover-timeout 10000 ms); cells: median (worst) over rounds; {:.0} s in all",
        args.rounds,
        args.writers,
        secs(started.elapsed())
    );
    println!();
    println!("| scenario | rounds ok | sentinel switch s | keyward resume s | resume - switch s | max gap s | p50 conn max gap s | stall after resume s | acked writes | errors | error kinds (all rounds) | lost acked | duplicates | writes on fenced master | targets |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|");
    let mut pass = true;
    for (sc, rounds) in &all {
        let ok: Vec<&RoundResult> = rounds.iter().filter(|r| r.failure.is_none()).collect();
        let col = |f: &dyn Fn(&RoundResult) -> Option<f64>| -> Vec<f64> {
            ok.iter().filter_map(|r| f(r)).collect()
        };
        let coln =
            |f: &dyn Fn(&RoundResult) -> usize| -> Vec<usize> { ok.iter().map(|r| f(r)).collect() };
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for r in &ok {
            for (k, n) in &r.errors {
                *kinds.entry(k.clone()).or_default() += n;
            }
        }
        let kinds = if kinds.is_empty() {
            "-".to_string()
        } else {
            kinds
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut misses = Vec::new();
        for (i, r) in rounds.iter().enumerate() {
            for m in r.misses(*sc) {
                misses.push(format!("r{}: {m}", i + 1));
            }
        }
        let verdict = if misses.is_empty() {
            "PASS".to_string()
        } else {
            pass = false;
            format!("MISS: {}", misses.join("; "))
        };
        let fenced = if *sc == Scenario::Stop {
            cell_n(&coln(&|r| r.fenced))
        } else {
            "n/a".into()
        };
        println!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            sc.name(),
            ok.len(),
            rounds.len(),
            cell_s(&col(&|r| r.switch_s)),
            cell_s(&col(&|r| r.resume_s)),
            cell_s(&col(&|r| r.diff_s())),
            cell_s(&col(&|r| Some(r.max_gap_s))),
            cell_s(&col(&|r| Some(r.p50_gap_s))),
            cell_s(&col(&|r| Some(r.later_stall_s))),
            cell_n(&coln(&|r| r.acked)),
            cell_n(&coln(&|r| r.error_count())),
            kinds,
            cell_n(&coln(&|r| r.lost)),
            cell_n(&coln(&|r| r.dups)),
            fenced,
            verdict
        );
    }
    println!();
    println!("Targets: kill: max gap <= sentinel switch + 0.5 s and < 3 s; planned: 0 errors, 0 lost, max gap < 1.5 s; all: 0 duplicates, 0 writes on fenced master (checked in every round). \"worst\" is the largest value. \"stall after resume\": the longest gap > 100 ms on a connection after its first outage ended (0 when none).");
    pass
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("failover_drill: {e}");
            }
            eprintln!("usage: failover_drill --keyward PATH [--rounds N] [--writers N] [--scenarios kill,stop,planned] [--redis-server PATH] [--keep]");
            return ExitCode::from(if e.is_empty() { 0 } else { 2 });
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failover_drill: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Ctrl-C / SIGTERM drop the drill future, and with it the running
    // stack, whose Drop kills every process it started.
    let outcome = rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            pass = drill(args) => Some(pass),
            _ = tokio::signal::ctrl_c() => None,
            _ = term => None,
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Some(true) => ExitCode::SUCCESS,
        Some(false) => ExitCode::from(1),
        None => {
            eprintln!("failover_drill: interrupted; every process it started was stopped");
            ExitCode::from(130)
        }
    }
}

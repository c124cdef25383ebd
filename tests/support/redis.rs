//! A real `redis-server` child process as the upstream for tests, plus small
//! blocking helpers to talk to it directly (bypassing keyward) for setup and
//! for checking what actually reached the server.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ports::free_port;
use super::proc::{self, kill_and_reap, log_stdio, mentions_addr_in_use, read_text, send_signal};
use super::resp::{cmd, esc, frame_len};
use super::{DEADLINE, POLL};

/// A `redis-server` on 127.0.0.1 with no persistence, living in its own temp
/// dir. Killed on drop.
///
/// The binary is `$REDIS_SERVER` if set, else `redis-server` from `PATH`.
/// Starting blocks the calling thread until the server answers PING (at most
/// 10 s); that is fine inside async tests since nothing else is running yet.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
    dir: TempDir,
}

/// Why one launch attempt failed; only an address clash is worth retrying.
enum LaunchError {
    AddrInUse,
    Fatal(String),
}

impl Redis {
    /// Start a plain server.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Start a server with extra command-line arguments appended after the
    /// kit's own, e.g. `&["--requirepass", "x"]`. A server that requires a
    /// password still counts as up (it answers PING with `-NOAUTH`).
    pub fn start_with(extra: &[&str]) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("keyward-redis-")
            .tempdir()
            .expect("create temp dir for redis");
        let mut redis = Redis {
            child: None,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        // free_port() only says the port was free a moment ago; if something
        // grabbed it meanwhile, redis exits with "Address already in use" and
        // a fresh port fixes it.
        for _ in 0..5 {
            redis.port = free_port();
            match redis.launch() {
                Ok(()) => return redis,
                Err(LaunchError::AddrInUse) => continue,
                Err(LaunchError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!(
            "redis-server: every port tried was already in use\n{}",
            redis.log()
        );
    }

    /// The TCP port the server listens on (stable across `restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `"127.0.0.1:<port>"`, the form keyward's `--upstream` takes.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's working dir (holds `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// OS pid of the running server, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait on redis-server").is_none(),
            None => false,
        }
    }

    /// SIGKILL the server and reap it: an abrupt upstream crash. When this
    /// returns the port refuses connections. No-op if already stopped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// Orderly shutdown: SIGTERM, wait up to 10 s, then SIGKILL as a last
    /// resort so a wedged server cannot hang the test. No-op if stopped.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().expect("try_wait on redis-server").is_none() {
                send_signal(c.id(), "TERM");
                if proc::wait_exit(&mut c, DEADLINE).is_none() {
                    kill_and_reap(&mut c);
                }
            }
        }
    }

    /// Start the server again on the same port and dir (killing it first if
    /// it is still running) and wait until it answers PING. Data is gone:
    /// persistence is off. Rebinding is retried for up to 10 s because
    /// sockets of the old process can briefly keep the port busy.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(LaunchError::AddrInUse) if Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                Err(LaunchError::AddrInUse) => {
                    panic!(
                        "redis-server restart: port {} still in use after {DEADLINE:?}\n{}",
                        self.port,
                        self.log()
                    )
                }
                Err(LaunchError::Fatal(msg)) => panic!("redis-server restart: {msg}"),
            }
        }
    }

    /// `restart` with these extra arguments instead of the ones given at
    /// start (e.g. a different `--databases`).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Everything the server wrote: its log file, then anything it printed on
    /// stdout/stderr (where fatal config errors go before the log is open).
    pub fn log(&self) -> String {
        format!(
            "--- redis.log ---\n{}\n--- redis stdout/stderr ---\n{}",
            read_text(&self.log_path()),
            read_text(&self.stdio_path())
        )
    }

    /// Send one command straight to this server; see [`redis_cmd`].
    pub fn call(&self, args: &[&[u8]]) -> Vec<u8> {
        redis_cmd(self.port, args)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn stdio_path(&self) -> PathBuf {
        self.dir.path().join("redis.stdio")
    }

    /// Spawn on `self.port` and wait for PING. On failure the child is reaped
    /// and `self.child` is left `None`.
    fn launch(&mut self) -> Result<(), LaunchError> {
        let bin: OsString =
            std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        // The log files accumulate across launches; only this launch's part
        // may decide whether it failed on an address clash.
        let marks = (file_len(&self.log_path()), file_len(&self.stdio_path()));
        let (out, err) = log_stdio(&self.stdio_path());
        let mut child = Command::new(&bin)
            .arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot spawn {bin:?} (install redis-server or set REDIS_SERVER): {e}")
            });

        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait on redis-server") {
                let log = self.log();
                let fresh = format!(
                    "{}{}",
                    read_text_from(&self.log_path(), marks.0),
                    read_text_from(&self.stdio_path(), marks.1)
                );
                return Err(if mentions_addr_in_use(&fresh) {
                    LaunchError::AddrInUse
                } else {
                    LaunchError::Fatal(format!("redis-server exited early ({status})\n{log}"))
                });
            }
            // Re-check liveness after a successful PING: if our server lost
            // the bind race, the PONG may have come from someone else.
            if ping_ok(self.port)
                && child
                    .try_wait()
                    .expect("try_wait on redis-server")
                    .is_none()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_and_reap(&mut child);
                return Err(LaunchError::Fatal(format!(
                    "redis-server on port {} did not answer PING within {DEADLINE:?}\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The part of a file after byte `from`, lossy; empty if unreadable.
fn read_text_from(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = (from as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// One readiness probe: does the port answer PING (or refuse it only for
/// lack of AUTH)? Short timeouts, since the caller polls.
fn ping_ok(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if s.write_all(&cmd(&[b"PING"])).is_err() {
        return false;
    }
    match read_frames(&mut s, 1, Duration::from_millis(500)) {
        Ok(frames) => frames[0].starts_with(b"+PONG") || frames[0].starts_with(b"-NOAUTH"),
        Err(_) => false,
    }
}

/// Send one command to 127.0.0.1:`port` on a fresh blocking connection and
/// return the raw bytes of exactly one complete reply (10 s timeout; panics
/// on connection errors or timeout). For setup and for inspecting upstream
/// state behind keyward's back.
pub fn redis_cmd(port: u16, args: &[&[u8]]) -> Vec<u8> {
    redis_pipeline(port, &[args]).pop().expect("one reply")
}

/// `redis_cmd` in database `db` (SELECT first, on the same connection).
pub fn redis_cmd_in(port: u16, db: &str, args: &[&[u8]]) -> Vec<u8> {
    redis_pipeline(port, &[&[b"SELECT", db.as_bytes()], args])
        .pop()
        .expect("two replies")
}

/// Send several commands pipelined on one fresh connection and return their
/// raw replies in order. Useful when a later command depends on connection
/// state, e.g. `AUTH` then a command on a password-protected server.
pub fn redis_pipeline(port: u16, cmds: &[&[&[u8]]]) -> Vec<Vec<u8>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, DEADLINE)
        .unwrap_or_else(|e| panic!("redis_cmd: connect to {addr}: {e}"));
    s.set_write_timeout(Some(DEADLINE))
        .expect("set_write_timeout");
    let mut out = Vec::new();
    for args in cmds {
        out.extend_from_slice(&cmd(args));
    }
    s.write_all(&out)
        .unwrap_or_else(|e| panic!("redis_cmd: write to {addr}: {e}"));
    read_frames(&mut s, cmds.len(), DEADLINE).unwrap_or_else(|e| panic!("redis_cmd to {addr}: {e}"))
}

/// `calls` of `cmdstat_<name>` in `INFO commandstats` of the server on
/// `port` (0 if absent): how many `name` commands actually reached it.
pub fn redis_calls(port: u16, name: &str) -> u64 {
    let info = redis_cmd(port, &[b"INFO", b"commandstats"]);
    let text = String::from_utf8_lossy(&info);
    let prefix = format!("cmdstat_{name}:calls=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            rest.split(',')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad commandstats line for {name}: {text}"))
        })
        .unwrap_or(0)
}

/// Read exactly `n` complete frames from a blocking stream within `timeout`.
pub(crate) fn read_frames(
    s: &mut TcpStream,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut frames = Vec::with_capacity(n);
    let mut chunk = [0u8; 16 * 1024];
    while frames.len() < n {
        if let Some(len) = frame_len(&buf)? {
            frames.push(buf.drain(..len).collect());
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "timed out after {timeout:?}; partial reply: {}",
                esc(&buf)
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("connection closed; partial reply: {}", esc(&buf))),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read failed: {e}; partial reply: {}", esc(&buf))),
        }
    }
    Ok(frames)
}

//! The keyward binary under test, run as a child process exactly as a user
//! would run it, with its output captured to a log file for diagnostics.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ports::free_port;
use super::proc::{
    self, kill_and_reap, log_stdio, mentions_addr_in_use, read_text, send_signal, tail,
};
use super::redis::Redis;
use super::{DEADLINE, POLL};

/// A running `keyward` process listening on 127.0.0.1:`port()` with its
/// admin HTTP endpoint on 127.0.0.1:`admin_port()`. Killed on drop; if the
/// test is panicking at that point, the tail of keyward's log is printed (the
/// test harness shows it with the failure).
///
/// `RUST_LOG` is inherited from the test's environment, so
/// `RUST_LOG=debug cargo test` gives verbose proxy logs in failures.
/// Starting blocks the calling thread until the ports accept (at most 10 s).
pub struct Keyward {
    child: Child,
    port: u16,
    admin_port: u16,
    dir: TempDir,
    config_path: Option<PathBuf>,
}

impl Keyward {
    /// `keyward --listen 127.0.0.1:P --upstream <upstream> --admin-listen 127.0.0.1:A`.
    pub fn start(upstream: &str) -> Keyward {
        Keyward::start_with(upstream, &[])
    }

    /// Like [`Keyward::start`] with `extra` arguments appended.
    pub fn start_with(upstream: &str, extra: &[&str]) -> Keyward {
        Keyward::launch(Some(upstream), None, extra, true)
    }

    /// Write `toml` to `keyward.toml` in a temp dir and run
    /// `keyward --listen 127.0.0.1:P --admin-listen 127.0.0.1:A --config FILE`
    /// plus `extra`. The listen flags are always passed because the kit must
    /// know where to reach the proxy; keyward's CLI flags are expected to take
    /// precedence over addresses in the file.
    pub fn start_config(toml: &str, extra: &[&str]) -> Keyward {
        Keyward::launch(None, Some(toml), extra, true)
    }

    /// [`Keyward::start_config`] with a config file whose first lines are
    /// an `[upstream]` section naming `redis`, then `toml`: right after the
    /// address line, so `toml` may add upstream settings (`password = ...`)
    /// before sections of its own.
    pub fn start_for(redis: &Redis, toml: &str, extra: &[&str]) -> Keyward {
        Keyward::start_config(
            &format!("[upstream]\naddress = \"{}\"\n{toml}", redis.addr()),
            extra,
        )
    }

    /// The general form behind the `start*` constructors. `upstream` adds
    /// `--upstream`, `config` adds `--config FILE`; `--listen` and
    /// `--admin-listen` are always passed. With `wait_admin` false only the
    /// proxy port must come up (for tests that break or disable the admin
    /// endpoint through `extra`).
    pub fn launch(
        upstream: Option<&str>,
        config: Option<&str>,
        extra: &[&str],
        wait_admin: bool,
    ) -> Keyward {
        let dir = tempfile::Builder::new()
            .prefix("keyward-proxy-")
            .tempdir()
            .expect("create temp dir for keyward");
        let config_path = config.map(|text| {
            let p = dir.path().join("keyward.toml");
            std::fs::write(&p, text).expect("write keyward.toml");
            p
        });
        let log_path = dir.path().join("keyward.log");

        let mut tail_args: Vec<String> = Vec::new();
        if let Some(u) = upstream {
            tail_args.extend(["--upstream".to_string(), u.to_string()]);
        }
        if let Some(p) = &config_path {
            tail_args.extend(["--config".to_string(), p.display().to_string()]);
        }
        tail_args.extend(extra.iter().map(|s| s.to_string()));

        // Retry on fresh ports if another process grabbed one of ours
        // between free_port() and keyward's bind.
        let mut last_log = String::new();
        for _ in 0..5 {
            let (port, admin_port) = (free_port(), free_port());
            // One log per attempt so a stale "address in use" from an earlier
            // attempt cannot be mistaken for this one's.
            let _ = std::fs::remove_file(&log_path);
            let (out, err) = log_stdio(&log_path);
            let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--admin-listen")
                .arg(format!("127.0.0.1:{admin_port}"))
                .args(&tail_args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn keyward binary");
            let mut ports = vec![port];
            if wait_admin {
                ports.push(admin_port);
            }
            match wait_accepting(&mut child, &ports) {
                Ok(()) => {
                    return Keyward {
                        child,
                        port,
                        admin_port,
                        dir,
                        config_path,
                    }
                }
                Err(fail) => {
                    kill_and_reap(&mut child);
                    last_log = read_text(&log_path);
                    let why = match fail {
                        StartFail::Exited(_) if mentions_addr_in_use(&last_log) => continue,
                        StartFail::Exited(status) => format!("exited during startup ({status})"),
                        StartFail::Timeout(pending) => {
                            format!("did not accept on port(s) {pending:?} within {DEADLINE:?}")
                        }
                    };
                    panic!(
                        "keyward {why} (listen 127.0.0.1:{port}, admin 127.0.0.1:{admin_port}, args {tail_args:?})\n\
                         --- keyward log ---\n{last_log}\n--- end keyward log ---"
                    );
                }
            }
        }
        panic!(
            "keyward: every port pair tried was already in use\n--- keyward log ---\n{last_log}"
        );
    }

    /// Proxy port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `"127.0.0.1:<port>"`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Admin HTTP port (use with [`super::http_get`]).
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// `"127.0.0.1:<admin_port>"`.
    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    /// OS pid of the keyward process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file written by [`Keyward::start_config`], so reload tests
    /// can rewrite it before signalling.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// The process's temp dir (holds `keyward.log`, `keyward.toml`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Resident set size of the keyward process in KiB, from
    /// `/proc/<pid>/status` (Linux).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
    }

    /// Everything keyward wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_text(&self.dir.path().join("keyward.log"))
    }

    /// Poll the log until it contains `needle`; panic (showing the log) after
    /// `timeout`. Blocks the thread: from async tests prefer
    /// `wait_until(.., || async { kw.log().contains(..) })`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("keyward log did not mention {needle:?} within {timeout:?}\n--- keyward log ---\n{}", self.log());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Send SIGTERM (graceful shutdown request).
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Send any signal by name ("HUP", "INT", …) or number.
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("try_wait on keyward")
            .is_none()
    }

    /// Poll until the process exits; `None` if it is still running after
    /// `timeout`. Returns the same status again if already reaped.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        proc::wait_exit(&mut self.child, timeout)
    }

    /// SIGKILL and reap now (Drop does the same).
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// How a start attempt failed.
enum StartFail {
    /// The process ended; its log says why (maybe a retryable port clash).
    Exited(ExitStatus),
    /// Still running at the deadline, but these ports never accepted.
    Timeout(Vec<u16>),
}

/// Poll until every port in `ports` accepts a TCP connection.
fn wait_accepting(child: &mut Child, ports: &[u16]) -> Result<(), StartFail> {
    let deadline = Instant::now() + DEADLINE;
    let mut pending: Vec<u16> = ports.to_vec();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on keyward") {
            return Err(StartFail::Exited(status));
        }
        pending.retain(|&p| {
            let addr = SocketAddr::from(([127, 0, 0, 1], p));
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
        });
        // Liveness re-check: the connects that succeeded must have reached
        // our process, not one that beat it to the port.
        if pending.is_empty() && child.try_wait().expect("try_wait on keyward").is_none() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StartFail::Timeout(pending));
        }
        std::thread::sleep(POLL);
    }
}

impl Drop for Keyward {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if std::thread::panicking() {
            let log = self.log();
            eprintln!(
                "--- keyward log (127.0.0.1:{}, pid {}; last 64 KiB) ---\n{}\n--- end keyward log ---",
                self.port,
                self.child.id(),
                tail(&log, 64 * 1024)
            );
        }
    }
}

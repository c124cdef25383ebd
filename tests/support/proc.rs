//! Child-process plumbing shared by `Redis` and `Keyward`: signals, log
//! files, bounded waits for exit.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::POLL;

/// Send signal `sig` (a name such as "TERM", "HUP", "INT", or a number) to
/// `pid`. Uses the `kill` command because the test crate has no libc binding.
/// Panics if `kill` fails (e.g. the process no longer exists).
pub fn send_signal(pid: u32, sig: &str) {
    let out = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run the `kill` command");
    assert!(
        out.status.success(),
        "kill -{sig} {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Poll `child` until it exits or `timeout` passes.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// SIGKILL and reap, ignoring "already gone": used on teardown paths where
/// the process may have exited by itself.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Open (appending) a log file and return two handles to it for a child's
/// stdout and stderr. Append mode makes the two streams interleave line by
/// line instead of overwriting each other's offsets.
pub(crate) fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let f: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log file {}: {e}", path.display()));
    let f2 = f.try_clone().expect("clone log file handle");
    (Stdio::from(f), Stdio::from(f2))
}

/// Whole file as (lossy) text, or a note saying why it could not be read;
/// only used to build diagnostics, so it never fails.
pub(crate) fn read_text(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The last `max` bytes of `s` (on a char boundary), so a panic message with a
/// runaway log stays readable.
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Bind failures look different in redis ("Address already in use") and in
/// Rust programs ("AddrInUse" / "Address in use"); match them all.
pub(crate) fn mentions_addr_in_use(log: &str) -> bool {
    let l = log.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("addrinuse") || l.contains("address in use")
}

//! The built-in dashboard (`GET /ui`) in a real browser. Headless Chromium
//! loads the page from keyward's admin port while a skewed workload runs
//! through the proxy, and the DOM it renders must show live data: several
//! successful `/stats` polls, throughput and latency charts with points, the
//! hot key in the hot-key table and the `string` family in the families
//! table. A screenshot is kept under `target/tmp/dashboard/` for a human.
//!
//! Chromium is required: scripts/test installs it. Without it this test
//! fails with a message saying so; it never skips silently.
//!
//! Why `--virtual-time-budget`: headless `--dump-dom` and `--screenshot` act
//! as soon as the page has loaded, before its first poll has finished, and
//! `--timeout` only cuts a slow load short (it does not wait). With a
//! virtual-time budget the page's timers run on a virtual clock that
//! Chromium advances only while no fetch is in flight, so 8000 ms of budget
//! is eight 1-second poll cycles however slow the machine is; the fetches
//! themselves are real and see the real workload. (The page computes rates
//! from the server's `uptime_s`, so they stay right although the browser's
//! own clock runs fast.)

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The key the workload hammers; it must show up in the hot-key table.
const HOT_KEY: &str = "dash:hot";

/// Where the dumped DOM and the screenshot are kept after the run.
const OUT_DIR: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/dashboard");

/// A browser run taking longer than this is killed (with its children).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags for both browser runs; only the output flag differs.
const BROWSER_FLAGS: &[&str] = &[
    "--headless",
    // CI runs as root, where Chromium's sandbox cannot start.
    "--no-sandbox",
    "--disable-gpu",
    // Containers often have a tiny /dev/shm; Chromium then crashes without this.
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    // Let the screenshot show the last frame, not one drawn mid-update.
    "--run-all-compositor-stages-before-draw",
    // Eight 1-second poll cycles on the page's virtual clock (see the top).
    "--virtual-time-budget=8000",
    "--window-size=1280,900",
];

#[test]
fn dashboard_shows_live_data_in_a_browser() {
    // Fail first, and clearly, if there is no browser to run.
    let browser = find_browser();

    let redis = Redis::start();
    let kw = Keyward::start_with(&redis.addr(), &["--cache-mb", "16"]);
    let admin = kw.admin_port();
    wait_until_sync("keyward's /ready answers 200", DEADLINE, || {
        http_get(admin, "/ready").0 == 200
    });

    // The page itself: HTML, embedded, nothing fetched from elsewhere.
    let (status, content_type) = status_and_content_type(admin, "/ui");
    assert_eq!(status, 200, "GET /ui answered {status}");
    assert!(
        content_type.to_ascii_lowercase().starts_with("text/html"),
        "GET /ui has content-type {content_type:?}, want text/html"
    );
    let (_, page) = http_get(admin, "/ui");
    for id in [
        "chart-throughput",
        "chart-latency",
        "hotkeys",
        "families",
        "clients",
    ] {
        assert!(
            page.contains(&format!("id=\"{id}\"")),
            "GET /ui has no element with id {id:?}"
        );
    }
    let outside: Vec<&str> = page
        .match_indices("http")
        .map(|(i, _)| &page[i..page.len().min(i + 40)])
        .filter(|s| !s.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    assert!(
        outside.is_empty(),
        "the dashboard must be self-contained (no CDN or external URL), found {outside:?}"
    );

    // Traffic keeps running until both browser runs are done, so the page
    // sees requests move between polls and the hot key stays hot.
    let traffic = Traffic::start(kw.port());
    // A key turns hot after two 1-second windows above the threshold.
    wait_for(
        &format!("/hotkeys lists {HOT_KEY} flagged hot"),
        Duration::from_secs(30),
        || hot_key_listed(admin),
    );
    wait_for("/stats counts the workload", DEADLINE, || {
        stats_counting(admin)
    });

    let out = PathBuf::from(OUT_DIR);
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("create {}: {e}", out.display()));
    println!("dashboard DOM and screenshot: {}", out.display());
    let scratch = tempfile::Builder::new()
        .prefix("keyward-chromium-")
        .tempdir()
        .expect("create temp dir for chromium");
    let url = format!("http://127.0.0.1:{admin}/ui");

    // 1. The DOM after eight poll cycles.
    let run = run_browser(&browser, scratch.path(), "dom", &["--dump-dom"], &url);
    let dom = run.stdout;
    let dom_path = out.join("dashboard.html");
    std::fs::write(&dom_path, &dom).unwrap_or_else(|e| panic!("write {}: {e}", dom_path.display()));
    let context = || {
        format!(
            "\n--- what the page showed ---\n{}\n(full DOM in {}; chromium stderr tail:\n{})",
            summary(&dom),
            dom_path.display(),
            tail(&run.stderr, 2000)
        )
    };

    let polls = start_tag(&dom, "<body")
        .and_then(|t| attr(t, "data-polls"))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        polls.is_some_and(|n| n >= 2),
        "want at least 2 successful /stats polls, body data-polls is {polls:?}{}",
        context()
    );
    for chart in ["chart-throughput", "chart-latency"] {
        let points = chart_points(&dom, chart);
        assert!(
            points.is_some_and(|n| n >= 2),
            "want at least 2 points in {chart}, data-points is {points:?}{}",
            context()
        );
    }
    let hot_rows = body_rows(&dom, "hotkeys");
    let hot_row = hot_rows
        .iter()
        .find(|r| r.contains(&format!(">{HOT_KEY}<")));
    let Some(hot_row) = hot_row else {
        panic!("no row for {HOT_KEY} in the hot-key table{}", context());
    };
    assert!(
        hot_row.contains(">hot<"),
        "the {HOT_KEY} row is not flagged hot: {}{}",
        text_of(hot_row),
        context()
    );
    assert!(
        body_rows(&dom, "families")
            .iter()
            .any(|r| r.contains(">string<")),
        "no `string` row in the families table{}",
        context()
    );

    // 2. A screenshot of the same thing, for people.
    let png = out.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let shot = run_browser(
        &browser,
        scratch.path(),
        "screenshot",
        &[&format!("--screenshot={}", png.display())],
        &url,
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); chromium stderr tail:\n{}",
            png.display(),
            tail(&shot.stderr, 2000)
        )
    });
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        png.display()
    );
    assert!(
        bytes.len() > 10 * 1024,
        "{} is only {} bytes: a blank page?",
        png.display(),
        bytes.len()
    );
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());

    let sent = traffic.finish();
    assert!(sent > 0, "the workload sent nothing");
}

// ------------------------------------------------------------------ browser

/// `chromium` or `chromium-browser` from `PATH`; panics (failing the test)
/// if neither is there.
fn find_browser() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            let executable = std::fs::metadata(&candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if executable {
                return candidate;
            }
        }
    }
    panic!(
        "this test needs headless Chromium, but neither `chromium` nor `chromium-browser` \
         is on PATH; scripts/test installs it (Debian: apt-get install chromium)"
    );
}

struct BrowserRun {
    stdout: String,
    stderr: String,
}

/// Run `browser` with [`BROWSER_FLAGS`], `mode` (the output flag) and `url`,
/// with a fresh profile under `scratch`. Panics if it fails or takes longer
/// than [`BROWSER_TIMEOUT`]; then its whole process group is killed, since
/// Chromium's renderer and helper processes would outlive the main one.
fn run_browser(browser: &Path, scratch: &Path, name: &str, mode: &[&str], url: &str) -> BrowserRun {
    let profile = scratch.join(format!("profile-{name}"));
    let out_path = scratch.join(format!("{name}.stdout"));
    let err_path = scratch.join(format!("{name}.stderr"));
    let file = |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    let mut child = Command::new(browser)
        .args(BROWSER_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(mode)
        .arg(url)
        // Keep Chromium's config and cache writes inside the scratch dir.
        .env("XDG_CONFIG_HOME", scratch.join("xdg-config"))
        .env("XDG_CACHE_HOME", scratch.join("xdg-cache"))
        .stdin(Stdio::null())
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        // Its own process group, so a timeout can kill every process it started.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", browser.display()));
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on chromium") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {mode:?} did not finish within {BROWSER_TIMEOUT:?}; stderr tail:\n{}",
                browser.display(),
                tail(&read_lossy(&err_path), 4000)
            );
        }
        std::thread::sleep(POLL);
    };
    let run = BrowserRun {
        stdout: read_lossy(&out_path),
        stderr: read_lossy(&err_path),
    };
    assert!(
        status.success(),
        "{} {mode:?} exited with {status}; stderr tail:\n{}",
        browser.display(),
        tail(&run.stderr, 4000)
    );
    run
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", p.display()))
}

// ---------------------------------------------------------------------- DOM

/// The start tag beginning with `open` (`"<body"`), or holding ` id="..."`
/// when `open` is an id (`<svg id="chart-latency" ... data-points="9">`),
/// and the offset where it ends. Chromium's serializer escapes `>` inside
/// attribute values, so the first `>` ends the tag.
fn find_tag<'a>(dom: &'a str, open: &str) -> Option<(&'a str, usize)> {
    let begin = if open.starts_with('<') {
        dom.find(&format!("{open} "))
            .or_else(|| dom.find(&format!("{open}>")))?
    } else {
        let at = dom.find(&format!(" id=\"{open}\""))?;
        dom[..at].rfind('<')?
    };
    let end = begin + dom[begin..].find('>')? + 1;
    Some((&dom[begin..end], end))
}

fn start_tag<'a>(dom: &'a str, open: &str) -> Option<&'a str> {
    find_tag(dom, open).map(|(tag, _)| tag)
}

/// The value of attribute `name` in a start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = start + tag[start..].find('"')?;
    Some(&tag[start..end])
}

fn chart_points(dom: &str, id: &str) -> Option<u64> {
    attr(start_tag(dom, id)?, "data-points")?.parse().ok()
}

/// The markup of each `<tr>` in the `<tbody>` of table `id`.
fn body_rows<'a>(dom: &'a str, id: &str) -> Vec<&'a str> {
    let Some((_, begin)) = find_tag(dom, id) else {
        return Vec::new();
    };
    let Some(len) = dom[begin..].find("</table>") else {
        return Vec::new();
    };
    let table = &dom[begin..begin + len];
    let Some(tbody) = table.find("<tbody") else {
        return Vec::new();
    };
    let tbody_end = table.find("</tbody>").unwrap_or(table.len());
    table[tbody..tbody_end]
        .split("<tr")
        .skip(1)
        .map(|r| r.split("</tr>").next().unwrap_or(r))
        .collect()
}

/// Markup reduced to its text, cells separated by " | ".
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                if !out.is_empty() && !out.ends_with(" | ") {
                    out.push_str(" | ");
                }
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.trim_matches(|c| c == ' ' || c == '|')
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// What a failure message shows of the page: polls, chart points, rows.
fn summary(dom: &str) -> String {
    let mut s = String::new();
    let body = start_tag(dom, "<body").unwrap_or("<no body tag>");
    s.push_str(&format!("body: {body}\n"));
    for id in ["chart-throughput", "chart-latency"] {
        s.push_str(&format!("{id}: data-points={:?}\n", chart_points(dom, id)));
    }
    for id in ["updated", "hotkeys-empty", "hotkeys-note", "families-empty"] {
        if let Some((_, begin)) = find_tag(dom, id) {
            let text = dom[begin..].split("</").next().unwrap_or("");
            s.push_str(&format!("#{id}: {}\n", text_of(text)));
        }
    }
    for id in ["hotkeys", "families"] {
        let rows = body_rows(dom, id);
        s.push_str(&format!("table {id}: {} rows\n", rows.len()));
        for r in rows.iter().take(8) {
            s.push_str(&format!("  {}\n", text_of(r)));
        }
    }
    s
}

// ------------------------------------------------------------------ admin

/// Status code and `Content-Type` of `GET path` (the kit's `http_get`
/// returns only status and body).
fn status_and_content_type(port: u16, path: &str) -> (u16, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, DEADLINE)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE))
        .expect("set_read_timeout");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap_or_else(|e| panic!("write GET {path}: {e}"));
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .unwrap_or_else(|e| panic!("read GET {path}: {e}"));
    let text = String::from_utf8_lossy(&resp);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: bad response head {head:?}"));
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (status, content_type)
}

/// Poll `check` every [`POLL`] until it returns `Ok`; at the deadline,
/// panic with `what` and the last `Err` (what the endpoint said).
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let last_chance = Instant::now() >= deadline;
        match check() {
            Ok(()) => return,
            Err(e) if last_chance => {
                panic!("timed out after {timeout:?} waiting until {what}: {e}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// `GET path` as JSON, or why not.
fn get_json(admin: u16, path: &str) -> Result<Value, String> {
    let (status, body) = http_get(admin, path);
    if status != 200 {
        return Err(format!("{path} answered {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{path} is not JSON ({e}): {body}"))
}

/// `Ok` once `/hotkeys` lists [`HOT_KEY`] with `"hot": true`.
fn hot_key_listed(admin: u16) -> Result<(), String> {
    let json = get_json(admin, "/hotkeys?count=20")?;
    let listed = json["keys"].as_array().is_some_and(|keys| {
        keys.iter()
            .any(|k| k["key"] == HOT_KEY && k["hot"] == Value::Bool(true))
    });
    if listed {
        Ok(())
    } else {
        Err(format!("last answer: {json}"))
    }
}

/// `Ok` once `/stats` counts requests in the `string` family.
fn stats_counting(admin: u16) -> Result<(), String> {
    let json = get_json(admin, "/stats")?;
    let string = json["families"].as_array().and_then(|fams| {
        fams.iter()
            .find(|f| f["family"] == "string")
            .and_then(|f| f["requests"].as_u64())
    });
    match (json["requests"].as_u64(), string) {
        (Some(n), Some(s)) if n > 0 && s > 0 => Ok(()),
        _ => Err(format!("last answer: {json}")),
    }
}

// ---------------------------------------------------------------- workload

/// Commands per pipelined batch, and the least time between batch starts:
/// up to 5,000 requests/s, 80% of them on [`HOT_KEY`]. That is far above the
/// default hot threshold (1,000 ops/s) yet light enough for a 2-core box
/// that also runs Redis, keyward and Chromium.
const BATCH: usize = 50;
const PACE: Duration = Duration::from_millis(10);

/// One pipelined batch: 35 GETs and 5 SETs of [`HOT_KEY`], and 5 GETs and
/// 5 SETs spread over 100 colder keys.
fn batch(round: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..BATCH as u64 {
        let cold = format!("dash:cold:{}", (round * 7 + i) % 100);
        let value = format!("v{round}");
        let args: Vec<&[u8]> = match i % 10 {
            0 => vec![b"SET", HOT_KEY.as_bytes(), value.as_bytes()],
            8 => vec![b"GET", cold.as_bytes()],
            9 => vec![b"SET", cold.as_bytes(), value.as_bytes()],
            _ => vec![b"GET", HOT_KEY.as_bytes()],
        };
        out.extend(cmd(&args));
    }
    out
}

/// The background workload: one connection through keyward on a thread,
/// sending [`batch`]es every [`PACE`] until [`Traffic::finish`]. Any error
/// reply or I/O failure ends it and fails the test at `finish`.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, String>>>,
}

impl Traffic {
    fn start(port: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || -> Result<u64, String> {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let mut s = TcpStream::connect_timeout(&addr, DEADLINE)
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(DEADLINE))
                    .map_err(|e| e.to_string())?;
                let mut buf = Vec::new();
                let (mut round, mut sent) = (0u64, 0u64);
                while !stop.load(Ordering::Acquire) {
                    let started = Instant::now();
                    s.write_all(&batch(round))
                        .map_err(|e| format!("write: {e}"))?;
                    read_replies(&mut s, &mut buf, BATCH)?;
                    sent += BATCH as u64;
                    round += 1;
                    if let Some(rest) = PACE.checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
                Ok(sent)
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop and return how many requests were answered; panics if the
    /// workload failed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(sent))) => sent,
            Some(Ok(Err(e))) => panic!("the dashboard workload failed: {e}"),
            Some(Err(_)) => panic!("the dashboard workload thread panicked"),
            None => 0,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // On a panicking test path: stop the thread, don't wait for it.
        self.stop.store(true, Ordering::Release);
    }
}

/// Read exactly `n` replies (no error replies allowed) into and out of `buf`.
fn read_replies(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Result<(), String> {
    let mut chunk = [0u8; 16 * 1024];
    let mut got = 0;
    loop {
        while got < n {
            let Some(len) = frame_len(buf)? else { break };
            if buf.first() == Some(&b'-') {
                return Err(format!("error reply: {}", esc(&buf[..len])));
            }
            buf.drain(..len);
            got += 1;
        }
        if got == n {
            return Ok(());
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "keyward closed the connection after {got} of {n} replies"
                ))
            }
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {got} of {n} replies: {e}")),
        }
    }
}

//! keyward's admin endpoint read from tests: waiting until `/ready`
//! answers 200, and the Prometheus text of `/metrics` with its samples.

use std::time::Duration;

use super::http::http_get;
use super::keyward::Keyward;
use super::wait::wait_until;

/// Poll `/ready` until it answers 200 (keyward is connected upstream, or
/// found and verified a master, and has its command table); panic after
/// `timeout`. The blocking HTTP getter runs off the runtime's threads.
pub async fn wait_ready(kw: &Keyward, timeout: Duration) {
    let admin = kw.admin_port();
    wait_until("keyward /ready answers 200", timeout, move || async move {
        tokio::task::spawn_blocking(move || http_get(admin, "/ready").0 == 200)
            .await
            .expect("http_get task")
    })
    .await;
}

/// `GET /metrics` on `admin_port` (blocking): the Prometheus text, which
/// must come with status 200.
pub fn get_metrics(admin_port: u16) -> String {
    let (status, body) = http_get(admin_port, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// [`get_metrics`] of `kw`, off the runtime's threads.
pub async fn metrics(kw: &Keyward) -> String {
    let port = kw.admin_port();
    tokio::task::spawn_blocking(move || get_metrics(port))
        .await
        .expect("http_get task")
}

/// The value of one sample in Prometheus text: `series` is the metric name
/// with its labels exactly as rendered (`keyward_errors_total{kind="x"}`),
/// or a bare name for an unlabelled metric. `None` if absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

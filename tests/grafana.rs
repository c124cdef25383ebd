//! The Grafana dashboard shipped in `config/grafana/keyward.json` queries
//! only metrics keyward actually exports: every metric name in every panel
//! query (and in the template variables) must show up in the `/metrics` text
//! of a keyward that has served traffic. A renamed metric, or a typo in the
//! dashboard, fails here instead of as an empty panel in production.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana/keyward.json");

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD)
        .unwrap_or_else(|e| panic!("cannot read the dashboard {DASHBOARD}: {e}"));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the dashboard {DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel of the dashboard, depth first: rows' nested `panels` (a
/// collapsed row keeps its panels there) are included after their row.
fn all_panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        if let Some(panels) = v.get("panels").and_then(Value::as_array) {
            for p in panels {
                out.push(p);
                walk(p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

fn panel_title(p: &Value) -> String {
    p.get("title")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "<untitled panel id {}>",
                p.get("id").unwrap_or(&Value::Null)
            )
        })
}

/// (where, PromQL) for every panel target's `expr` and every template
/// variable's query.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dash) {
        for t in p
            .get("targets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(expr) = t.get("expr").and_then(Value::as_str) {
                out.push((format!("panel {:?}", panel_title(p)), expr.to_string()));
            }
        }
    }
    let vars = dash
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for v in vars {
        let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
        let texts = [
            v.get("definition"),
            v.get("query"),
            v.get("query").and_then(|q| q.get("query")),
        ];
        for text in texts.into_iter().flatten().filter_map(Value::as_str) {
            out.push((format!("variable ${name}"), text.to_string()));
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// The `keyward_*` identifiers in a PromQL expression. Quoted strings (label
/// values, e.g. `family="keyward"`) are skipped; a name is taken whole, so a
/// typo such as `keyward_Clients` is reported as written.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' && q != b'`' { 2 } else { 1 };
                }
                i += 1;
            }
            c if is_ident(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                if word.starts_with("keyward_") {
                    out.push(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Every metric name the dashboard uses, with where it is used.
fn dashboard_metrics(dash: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (place, expr) in queries(dash) {
        for name in metric_names(&expr) {
            used.entry(name).or_default().insert(place.clone());
        }
    }
    used
}

/// What a Prometheus text exposition declares: the names on sample lines
/// (`name{labels} value` or `name value`) and the `# TYPE` of each family.
struct Exposition {
    samples: BTreeSet<String>,
    types: HashMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut samples = BTreeSet::new();
        let mut types = HashMap::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
            } else if !line.is_empty() && !line.starts_with('#') {
                let end = line
                    .find(|c: char| c == '{' || c.is_whitespace())
                    .unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Exposition { samples, types }
    }

    /// The family a series name belongs to: `x_bucket`, `x_sum` and
    /// `x_count` belong to `x` when `x` is a histogram; anything else is its
    /// own family.
    fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return base;
                }
            }
        }
        name
    }

    /// Why the series `name` a query selects is absent, or `None` if at
    /// least one sample line carries exactly that name.
    fn missing(&self, name: &str) -> Option<String> {
        if self.samples.contains(name) {
            return None;
        }
        let family = self.family(name);
        let mut why = if family != name {
            format!("{name} (histogram family {family})")
        } else {
            name.to_string()
        };
        // A histogram recorded without buckets renders as a summary, which
        // histogram_quantile() cannot use.
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some(kind) = self.types.get(base).filter(|k| *k != "histogram") {
                    why.push_str(&format!(
                        " [{base} is exported as a {kind}, not a histogram]"
                    ));
                }
            }
        }
        Some(why)
    }
}

/// Pipelines `pairs` SET/GET pairs on `raw` and checks every reply.
async fn set_get(raw: &mut Raw, round: usize, pairs: usize) {
    let mut batch = Vec::new();
    for i in 0..pairs {
        let key = format!("grafana:{round}:{i}");
        let val = format!("v{i}");
        batch.extend(cmd(&[b"SET", key.as_bytes(), val.as_bytes()]));
        batch.extend(cmd(&[b"GET", key.as_bytes()]));
    }
    raw.send(&batch).await;
    let replies = raw.read_replies(2 * pairs).await;
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(
            pair[0],
            b"+OK\r\n",
            "SET grafana:{round}:{i}: {}",
            esc(&pair[0])
        );
        let want = format!("${}\r\nv{i}\r\n", format!("v{i}").len());
        assert_eq!(
            pair[1],
            want.as_bytes(),
            "GET grafana:{round}:{i}: {}",
            esc(&pair[1])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported() {
    let dash = dashboard();
    assert_eq!(
        dash.get("title").and_then(Value::as_str),
        Some("keyward"),
        "dashboard title"
    );
    let top = dash.get("panels").and_then(Value::as_array);
    assert!(
        top.is_some_and(|p| !p.is_empty()),
        "the dashboard has no panels"
    );
    let used = dashboard_metrics(&dash);
    assert!(
        !used.is_empty(),
        "no keyward_* metric found in any panel query"
    );

    let redis = Redis::start();
    let kw = Keyward::start_with(&redis.addr(), &["--cache-mb", "16"]);

    // Traffic so the labelled series exist: a few hundred SET/GET (repeated
    // GETs of one key too, so hot-key sampling and the cache see reads), an
    // error Redis makes (wrong arity) and one keyward makes itself (SYNC).
    let mut raw = Raw::connect(kw.port()).await;
    for round in 0..4 {
        set_get(&mut raw, round, 50).await;
    }
    let mut batch = Vec::new();
    for _ in 0..200 {
        batch.extend(cmd(&[b"GET", b"grafana:0:0"]));
    }
    raw.send(&batch).await;
    for r in raw.read_replies(200).await {
        assert_eq!(r, b"$2\r\nv0\r\n", "GET grafana:0:0: {}", esc(&r));
    }
    let r = raw.call(&[b"GET"]).await;
    assert!(r.starts_with(b"-"), "GET without a key: {}", esc(&r));
    let r = raw.call(&[b"SYNC"]).await;
    assert!(r.starts_with(b"-"), "SYNC through keyward: {}", esc(&r));
    let r = raw.call(&[b"PING"]).await;
    assert_eq!(r, b"+PONG\r\n", "PING after the errors: {}", esc(&r));

    // Counters may be bumped just after the reply went out; poll briefly.
    let deadline = Instant::now() + DEADLINE;
    let (text, missing) = loop {
        let text = metrics(&kw).await;
        let exp = Exposition::parse(&text);
        let missing: Vec<String> = used
            .iter()
            .filter_map(|(name, places)| {
                exp.missing(name).map(|why| {
                    let places: Vec<&str> = places.iter().map(String::as_str).collect();
                    format!("{why}, used by {}", places.join(", "))
                })
            })
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break (text, missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !missing.is_empty() {
        let exported: BTreeSet<String> = Exposition::parse(&text)
            .samples
            .into_iter()
            .filter(|n| n.starts_with("keyward_"))
            .collect();
        panic!(
            "{} metric(s) in {DASHBOARD} missing from keyward's /metrics:\n  {}\n\
             keyward exports: {}\n--- /metrics ---\n{text}",
            missing.len(),
            missing.join("\n  "),
            exported.into_iter().collect::<Vec<_>>().join(" ")
        );
    }
}

#[test]
fn panels_have_unique_ids_and_titles() {
    let dash = dashboard();
    let panels = all_panels(&dash);
    assert!(!panels.is_empty(), "the dashboard has no panels");
    let mut seen: HashMap<i64, String> = HashMap::new();
    let mut problems = Vec::new();
    for p in &panels {
        let title = p.get("title").and_then(Value::as_str).unwrap_or("");
        if title.trim().is_empty() {
            problems.push(format!(
                "panel id {} has no title",
                p.get("id").unwrap_or(&Value::Null)
            ));
        }
        match p.get("id").and_then(Value::as_i64) {
            None => problems.push(format!("panel {title:?} has no integer id")),
            Some(id) => {
                if let Some(other) = seen.insert(id, title.to_string()) {
                    problems.push(format!("panels {other:?} and {title:?} share id {id}"));
                }
            }
        }
        // Rows only group; every other panel must query something.
        if p.get("type").and_then(Value::as_str) != Some("row") {
            let exprs: Vec<&str> = p
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("expr").and_then(Value::as_str))
                .filter(|e| !e.trim().is_empty())
                .collect();
            if exprs.is_empty() {
                problems.push(format!("panel {title:?} has no target with an expr"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD}:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn metric_names_are_found_whole_and_outside_strings() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, family) (rate(keyward_request_duration_seconds_bucket{family="keyward_x",instance=~"$instance"}[1m])))"#
        ),
        ["keyward_request_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("rate(keyward_cache_hits_total[1m])/(rate(keyward_cache_hits_total[1m])+rate(not_keyward_x[1m]))"),
        ["keyward_cache_hits_total", "keyward_cache_hits_total"]
    );
    assert_eq!(
        metric_names("label_values(keyward_build_info, instance)"),
        ["keyward_build_info"]
    );
}

#[test]
fn exposition_resolves_histogram_series_to_their_family() {
    let exp = Exposition::parse(
        "# HELP keyward_request_duration_seconds Request latency.\n\
         # TYPE keyward_request_duration_seconds histogram\n\
         keyward_request_duration_seconds_bucket{family=\"string\",le=\"0.001\"} 3\n\
         keyward_request_duration_seconds_sum{family=\"string\"} 0.002\n\
         keyward_request_duration_seconds_count{family=\"string\"} 3\n\
         # TYPE keyward_odd_count gauge\n\
         keyward_odd_count 1\n\
         # TYPE keyward_lat summary\n\
         keyward_lat{quantile=\"0.5\"} 0.1\n\
         keyward_lat_sum 1\n\
         keyward_lat_count 10\n\
         keyward_clients 2\n",
    );
    assert_eq!(
        exp.family("keyward_request_duration_seconds_bucket"),
        "keyward_request_duration_seconds"
    );
    assert_eq!(exp.family("keyward_odd_count"), "keyward_odd_count");
    for present in [
        "keyward_request_duration_seconds_bucket",
        "keyward_request_duration_seconds_sum",
        "keyward_request_duration_seconds_count",
        "keyward_odd_count",
        "keyward_clients",
    ] {
        assert_eq!(exp.missing(present), None, "{present}");
    }
    // A histogram family selected by its bare name matches no series.
    assert!(exp.missing("keyward_request_duration_seconds").is_some());
    // Buckets of a summary do not exist, and the message says why.
    let why = exp
        .missing("keyward_lat_bucket")
        .expect("summary has no buckets");
    assert!(why.contains("exported as a summary"), "{why}");
    assert!(exp.missing("keyward_nope_total").is_some());
}

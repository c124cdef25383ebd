//! What logging costs a request at the default level (info, JSON lines).
//!
//! - `disabled_debug_callsite`: a `debug!` with connection and request ids
//!   on a path a request takes, with keyward's subscriber installed at
//!   `info`: the price of every debug/trace line on the data path.
//! - `error_reply_line_suppressed`: an error-reply line once the per-second
//!   budget (`log.max_error_lines_per_sec`) is spent.
//! - `error_reply_line_json`: an error-reply line written as JSON (to a
//!   sink), the cost of each of the first lines of a second.
//!
//! A plain request logs nothing at `info`; `scripts/bench logging`
//! measures the whole proxy with logging at info against logging off.
//! Run with `cargo bench --bench logging`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use keyward::logging::{self, ErrorLines};

fn bench(c: &mut Criterion) {
    logging::init_with("info", "json", std::io::sink);
    let mut g = c.benchmark_group("logging");
    let mut req = 0u64;
    g.bench_function("disabled_debug_callsite", |b| {
        b.iter(|| {
            req += 1;
            tracing::debug!(conn = black_box(7u64), req, "request routed");
        })
    });
    let spent = ErrorLines::new(0);
    g.bench_function("error_reply_line_suppressed", |b| {
        b.iter(|| spent.log(black_box(7), black_box(9), "limit", "ERR limit reached"))
    });
    let open = ErrorLines::new(u32::MAX);
    g.bench_function("error_reply_line_json", |b| {
        b.iter(|| {
            open.log(
                black_box(7),
                black_box(9),
                "unavailable",
                "ERR upstream 127.0.0.1:6379 unavailable",
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

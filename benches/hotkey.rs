//! Hot-key sampling costs on the data path (DESIGN.md decision 6).
//!
//! `sampled_insert` is what one sampled request pays: hash the key, a
//! conservative update of the sketch, an offer to the top-K set.
//! `data_path_amortised_1_in_8` is what every request pays: a counter check,
//! plus that insert for one request in eight. `window_merge_report` is the
//! background task's per-thread cost at the end of a window. Keys follow
//! Zipf(1.0) over 1,000,000 keys; windows hold 2^20 samples and are cleared
//! when the stream wraps. Run with `cargo bench --bench hotkey`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use keyward::hotkey::sketch::{key_hash, HeavyHitters};

#[path = "support/zipf.rs"]
mod zipf;

use zipf::{XorShift, Zipf};

const KEYS: usize = 1_000_000;
const STREAM: usize = 1 << 20;
const K: usize = 100;

/// The sampled keys laid out back to back, as they would sit in request
/// buffers: reading the next key is a sequential read, not a pointer chase
/// into a million separate allocations.
struct Stream {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Stream {
    fn zipf(s: f64) -> Stream {
        let zipf = Zipf::new(KEYS, s);
        let mut rng = XorShift::new(42);
        let mut bytes = Vec::new();
        let ends = (0..STREAM)
            .map(|_| {
                bytes.extend_from_slice(format!("key:{}", zipf.sample(&mut rng)).as_bytes());
                bytes.len()
            })
            .collect();
        Stream { bytes, ends }
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

fn hotkey(c: &mut Criterion) {
    let stream = Stream::zipf(1.0);
    let mut g = c.benchmark_group("hotkey");
    g.throughput(Throughput::Elements(1));

    g.bench_function("key_hash", |b| {
        let mut i = 0;
        b.iter(|| {
            let h = key_hash(black_box(stream.key(i)));
            i = (i + 1) % STREAM;
            h
        })
    });

    g.bench_function("sampled_insert", |b| {
        let mut hh = HeavyHitters::new(K);
        let mut i = 0;
        b.iter(|| {
            hh.add(black_box(stream.key(i)), 1);
            i += 1;
            if i == STREAM {
                i = 0;
                hh.clear();
            }
        })
    });

    g.bench_function("data_path_amortised_1_in_8", |b| {
        let mut hh = HeavyHitters::new(K);
        let mut requests: u64 = 0;
        let mut i = 0;
        b.iter(|| {
            // The data path's whole cost when not sampled: bump and test.
            requests = requests.wrapping_add(1);
            if black_box(requests).is_multiple_of(8) {
                hh.add(black_box(stream.key(i)), 1);
                i += 1;
                if i == STREAM {
                    i = 0;
                    hh.clear();
                }
            }
        })
    });

    // One full window from one thread, folded into the merged view and
    // reported: clear, merge, sort the top K.
    let mut thread = HeavyHitters::new(K);
    (0..STREAM).for_each(|i| thread.add(stream.key(i), 1));
    g.bench_function("window_merge_report", |b| {
        let mut merged = HeavyHitters::new(K);
        b.iter(|| {
            merged.clear();
            merged.merge(&thread);
            merged.top.sorted()
        })
    });
    g.finish();
}

criterion_group!(benches, hotkey);
criterion_main!(benches);

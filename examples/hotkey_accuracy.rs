//! Accuracy of the hot-key heavy-hitter structure against exact counts.
//!
//! Replays Zipf(s) request streams (s = 0.8, 1.0, 1.2) over `--keys` keys,
//! samples 1 in `--sample` requests the way the data path does (a counter,
//! not a coin), feeds the sampled keys to a [`HeavyHitters`] with weight 1,
//! scales its counts back up by the sampling rate, and compares the reported
//! top K with the exact per-key counts of the whole stream. With
//! `--threads T` the requests are dealt round-robin to T structures (one per
//! worker thread, each with its own sampling counter) that are merged at the
//! end, the way the detector merges threads each window.
//!
//! ```text
//! cargo run --release --example hotkey_accuracy [-- --requests N --keys M --sample R
//!     --k K --width W --depth D --candidates C --threads T --s 0.8,1.0,1.2 --seed X]
//! ```
//!
//! Columns: precision (reported keys that are truly top K, ties counted),
//! recall (true top K that were reported), ARE (average relative error of
//! the reported rate of the true top-K keys that were reported), max RE,
//! ARE from the sketch estimate alone (what the counts would be without
//! exact counting after admission), and the floor: precision and ARE of an
//! oracle that counts every sampled hit exactly, i.e. the error the 1-in-R
//! sampling alone causes.

use keyward::hotkey::sketch::{HeavyHitters, Sketch, TopK, DEFAULT_DEPTH, DEFAULT_WIDTH};

#[path = "../benches/support/zipf.rs"]
mod zipf;

use zipf::{XorShift, Zipf};

struct Args {
    requests: u64,
    keys: usize,
    sample: u64,
    k: usize,
    width: usize,
    depth: usize,
    candidates: Option<usize>,
    threads: usize,
    exponents: Vec<f64>,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        requests: 10_000_000,
        keys: 1_000_000,
        sample: 8,
        k: 100,
        width: DEFAULT_WIDTH,
        depth: DEFAULT_DEPTH,
        candidates: None,
        threads: 1,
        exponents: vec![0.8, 1.0, 1.2],
        seed: 0x5eed,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--requests" => args.requests = value.parse().map_err(|e| bad(&e))?,
            "--keys" => args.keys = value.parse().map_err(|e| bad(&e))?,
            "--sample" => args.sample = value.parse().map_err(|e| bad(&e))?,
            "--k" => args.k = value.parse().map_err(|e| bad(&e))?,
            "--width" => args.width = value.parse().map_err(|e| bad(&e))?,
            "--depth" => args.depth = value.parse().map_err(|e| bad(&e))?,
            "--candidates" => args.candidates = Some(value.parse().map_err(|e| bad(&e))?),
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--s" => {
                args.exponents = value
                    .split(',')
                    .map(|s| s.parse::<f64>().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.keys == 0 || args.sample == 0 || args.k == 0 || args.threads == 0 {
        return Err("--keys, --sample, --k and --threads must be positive".into());
    }
    if args.k > args.keys {
        return Err("--k must be at most --keys".into());
    }
    Ok(args)
}

/// Key numbers of the `k` largest counts, largest first (ties by number).
fn top_by_count(counts: &[u32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..counts.len()).collect();
    let by_count = |a: &usize, b: &usize| counts[*b].cmp(&counts[*a]).then(a.cmp(b));
    order.select_nth_unstable_by(k - 1, by_count);
    order.truncate(k);
    order.sort_by(by_count);
    order
}

struct Row {
    precision: f64,
    recall: f64,
    are: f64,
    max_re: f64,
    sketch_are: f64,
    floor_precision: f64,
    floor_are: f64,
    memory: usize,
}

fn structure(args: &Args) -> HeavyHitters {
    HeavyHitters {
        sketch: Sketch::new(args.width, args.depth),
        top: args
            .candidates
            .map_or_else(|| TopK::new(args.k), |c| TopK::with_capacity(args.k, c)),
    }
}

fn run(args: &Args, keys: &[String], s: f64) -> Row {
    let zipf = Zipf::new(args.keys, s);
    let mut rng = XorShift::new(args.seed);
    let mut exact = vec![0u32; args.keys];
    let mut sampled = vec![0u32; args.keys];
    let mut threads: Vec<HeavyHitters> = (0..args.threads).map(|_| structure(args)).collect();
    let mut counters = vec![0u64; args.threads];
    for i in 0..args.requests {
        let n = zipf.sample(&mut rng);
        exact[n] += 1;
        let t = (i % args.threads as u64) as usize;
        if counters[t].is_multiple_of(args.sample) {
            sampled[n] += 1;
            threads[t].add(keys[n].as_bytes(), 1);
        }
        counters[t] += 1;
    }
    let mut hh = threads.swap_remove(0);
    threads.iter().for_each(|other| hh.merge(other));

    let rate = args.sample as f64;
    let truth = top_by_count(&exact, args.k);
    let threshold = exact[truth[args.k - 1]];
    let reported: Vec<(usize, f64, f64)> = hh
        .top
        .sorted()
        .into_iter()
        .map(|e| {
            let n: usize = std::str::from_utf8(&e.key[4..])
                .ok()
                .and_then(|s| s.parse().ok())
                .expect("keys are key:N");
            let from_sketch = f64::from(hh.sketch.estimate(e.hash)) * rate;
            (n, f64::from(e.count) * rate, from_sketch)
        })
        .collect();

    let mut is_true = vec![false; args.keys];
    truth.iter().for_each(|&n| is_true[n] = true);
    let hits = reported.iter().filter(|r| exact[r.0] >= threshold).count();
    let found: Vec<&(usize, f64, f64)> = reported.iter().filter(|r| is_true[r.0]).collect();
    let rel =
        |n: usize, estimate: f64| (estimate - f64::from(exact[n])).abs() / f64::from(exact[n]);
    let errors: Vec<f64> = found.iter().map(|r| rel(r.0, r.1)).collect();
    let sketch_errors: Vec<f64> = found.iter().map(|r| rel(r.0, r.2)).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;

    // The oracle: exact counts of the sampled stream.
    let oracle = top_by_count(&sampled, args.k);
    let oracle_hits = oracle.iter().filter(|&&n| exact[n] >= threshold).count();
    let oracle_errors: Vec<f64> = truth
        .iter()
        .map(|&n| rel(n, f64::from(sampled[n]) * rate))
        .collect();

    Row {
        precision: hits as f64 / reported.len().max(1) as f64,
        recall: found.len() as f64 / args.k as f64,
        are: mean(&errors),
        max_re: errors.iter().copied().fold(0.0, f64::max),
        sketch_are: mean(&sketch_errors),
        floor_precision: oracle_hits as f64 / args.k as f64,
        floor_are: mean(&oracle_errors),
        memory: hh.memory_bytes(),
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hotkey_accuracy: {e}");
            std::process::exit(2);
        }
    };
    let keys: Vec<String> = (0..args.keys).map(|n| format!("key:{n}")).collect();
    let probe = structure(&args);
    println!(
        "requests {} keys {} sample 1/{} threads {} k {} sketch {}x{} candidates {}",
        args.requests,
        args.keys,
        args.sample,
        args.threads,
        args.k,
        probe.sketch.width(),
        probe.sketch.depth(),
        probe.top.capacity(),
    );
    println!(
        "{:>5} {:>9} {:>7} {:>7} {:>7} {:>10} | {:>10} {:>9} | {:>9}",
        "s",
        "precision",
        "recall",
        "ARE",
        "max RE",
        "sketch ARE",
        "floor prec",
        "floor ARE",
        "bytes"
    );
    for &s in &args.exponents {
        let started = std::time::Instant::now();
        let r = run(&args, &keys, s);
        println!(
            "{:>5.2} {:>9.3} {:>7.3} {:>6.2}% {:>6.2}% {:>9.2}% | {:>10.3} {:>8.2}% | {:>9}   ({:.1}s)",
            s,
            r.precision,
            r.recall,
            100.0 * r.are,
            100.0 * r.max_re,
            100.0 * r.sketch_are,
            r.floor_precision,
            100.0 * r.floor_are,
            r.memory,
            started.elapsed().as_secs_f64(),
        );
    }
}

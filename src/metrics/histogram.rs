//! A fixed-bucket latency histogram in atomics.
//!
//! The data path records into it with two relaxed atomic adds; scrapes
//! (`/metrics`, `/stats`, the dashboard) read a snapshot. The buckets are
//! fixed so they can be exported as Prometheus `le` buckets and diffed
//! between two snapshots (the dashboard's per-second percentiles).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the buckets, in microseconds; one more bucket holds
/// everything above the last.
pub const BOUNDS_US: [u64; 22] = [
    10, 25, 50, 75, 100, 150, 250, 500, 750, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Count `n` observations of `us` microseconds each (a batch of
    /// requests answered together shares one latency).
    #[inline]
    pub fn record(&self, us: u64, n: u64) {
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(n, Relaxed);
        self.sum_us.fetch_add(us.saturating_mul(n), Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for (o, c) in s.counts.iter_mut().zip(&self.counts) {
            *o = c.load(Relaxed);
        }
        s.sum_us = self.sum_us.load(Relaxed);
        s
    }
}

/// Counts per bucket (not cumulative) and the sum of all observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub counts: [u64; BUCKETS],
    pub sum_us: u64,
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// The `q` quantile in microseconds, interpolated linearly inside its
    /// bucket (the top bucket reports its lower bound); 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let lo = if i == 0 { 0 } else { BOUNDS_US[i - 1] } as f64;
                let Some(&hi) = BOUNDS_US.get(i) else {
                    return lo;
                };
                let within = (rank - seen as f64) / c as f64;
                return lo + (hi as f64 - lo) * within;
            }
            seen += c;
        }
        BOUNDS_US[BOUNDS_US.len() - 1] as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_by_upper_bound() {
        let h = Histogram::default();
        h.record(0, 1);
        h.record(10, 1);
        h.record(11, 2);
        h.record(20_000_000, 1);
        let s = h.snapshot();
        assert_eq!(s.counts[0], 2, "0 and 10 us are <= 10");
        assert_eq!(s.counts[1], 2, "11 us is in (10, 25]");
        assert_eq!(s.counts[BUCKETS - 1], 1);
        assert_eq!(s.count(), 5);
        assert_eq!(s.sum_us, 10 + 22 + 20_000_000);
    }

    #[test]
    fn quantiles_interpolate() {
        let h = Histogram::default();
        // 100 observations in (100, 150] and 1 in (5000, 10000].
        h.record(120, 99);
        h.record(7_000, 1);
        let s = h.snapshot();
        let p50 = s.quantile(0.5);
        assert!((100.0..=150.0).contains(&p50), "{p50}");
        let p999 = s.quantile(0.999);
        assert!((5_000.0..=10_000.0).contains(&p999), "{p999}");
        assert_eq!(Snapshot::default().quantile(0.5), 0.0);
    }

    #[test]
    fn merge_adds() {
        let a = Histogram::default();
        a.record(30, 2);
        let mut s = a.snapshot();
        s.merge(&a.snapshot());
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_us, 120);
    }
}

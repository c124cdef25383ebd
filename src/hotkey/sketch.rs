//! Heavy-hitter counting for hot-key detection (DESIGN.md decision 6): a
//! count-min sketch with conservative update, a top-K candidate set, and
//! [`HeavyHitters`], the pair of them that one worker thread fills per window.
//!
//! Why this shape rather than Space-Saving or HeavyKeeper: the sketch is a
//! plain array of counters, so merging threads (and, later, proxies in a
//! fleet) is a counter-wise add that stays an upper bound for every key, and
//! it can be shipped as bytes ([`Sketch::counters`], [`Sketch::from_counters`]).
//! The top-K set only has to *find* the heavy keys; their counts come from the
//! sketch and, once a key is a candidate, from exact increments (see
//! [`HeavyHitters::add`]), which removes most of the sketch's overestimate for
//! the keys that matter.
//!
//! Nothing here is thread-safe on purpose: each worker owns one
//! [`HeavyHitters`] and the detector merges them off the data path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Seed and multipliers of [`key_hash`]. They are part of the wire contract
/// between proxies (sketches from different processes are merged counter by
/// counter), so changing any of them is a breaking change.
const SEED: u64 = 0x6b65_7977_6172_6421; // "keyward!"
const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;
const P3: u64 = 0x5899_65cc_7537_4cc3;

/// Seed for the per-row multipliers that turn one key hash into `depth`
/// column indexes. Also part of the wire contract.
const ROW_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Widest and deepest sketch accepted: bounds what a peer can make us
/// allocate through [`Sketch::from_counters`] (1 GiB of counters).
const MAX_WIDTH: usize = 1 << 26;
const MAX_DEPTH: usize = 64;

/// Default sketch shape: 4096 x 4 u32 counters = 64 KiB, which keeps the
/// sketch in L2 while every row still spreads keys over thousands of cells.
pub const DEFAULT_WIDTH: usize = 4096;
pub const DEFAULT_DEPTH: usize = 4;

/// Candidates kept per reported key. On stationary Zipf traffic K
/// candidates already match an exact count of the sampled stream
/// (`examples/hotkey_accuracy.rs`); the second K is a margin, about 10 KiB at
/// K = 100, for keys trading places near the K-th and for merging threads
/// whose traffic differs, where a key can be top K overall while just below
/// it on every thread.
pub const CANDIDATES_PER_K: usize = 2;

/// 64x64 -> 128-bit multiply folded back to 64 bits: one instruction on
/// x86-64 and aarch64, and it mixes every input bit into the result.
#[inline]
fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Little-endian read of up to 8 bytes, zero-padded.
#[inline]
fn read_le(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(buf)
}

/// Fixed-seed 64-bit hash of a key, identical across processes, runs,
/// builds and CPUs, because proxies merge each other's sketches.
///
/// This is a small wyhash-style hash written out here rather than
/// `ahash::RandomState::with_seeds`: ahash documents no stability across
/// versions, and picks a different algorithm when AES instructions are
/// compiled in, so two proxies built differently would disagree on every
/// column. The seed is public, so the hash gives no protection against keys
/// crafted to collide; that only lets a client inflate estimates, which the
/// detector already has to tolerate.
pub fn key_hash(key: &[u8]) -> u64 {
    let len = key.len() as u64;
    let mut h = SEED ^ mum(len ^ P0, P1);
    let mut chunks = key.chunks_exact(16);
    for chunk in &mut chunks {
        h = mum(read_le(&chunk[..8]) ^ P1, read_le(&chunk[8..]) ^ h);
    }
    let tail = chunks.remainder();
    let (a, b) = if tail.len() > 8 {
        (read_le(&tail[..8]), read_le(&tail[8..]))
    } else {
        (read_le(tail), 0)
    };
    h = mum(a ^ P2, b ^ h);
    mum(h ^ P3, len ^ P0)
}

/// SplitMix64 finaliser, used to derive the row multipliers from [`ROW_SEED`].
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Count-min sketch with conservative update.
///
/// Every estimate is an upper bound on the true count. With width `w` and
/// depth `d`, an estimate exceeds the true count by more than
/// `e / w * total` (see [`Sketch::error_bound`]) with probability at most
/// `e^-d`; conservative update (raise only the counters that are below the
/// new estimate) usually does far better than that bound on skewed traffic.
///
/// Counters saturate at `u32::MAX` instead of wrapping, so a saturated
/// estimate is still an upper bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sketch {
    width: usize,
    depth: usize,
    /// `depth` rows of `width` counters, row after row.
    counters: Vec<u32>,
    /// One odd multiplier per row; derived from the depth, never shipped.
    rows: Vec<u64>,
    total: u64,
}

impl Sketch {
    /// A zeroed sketch. `width` is rounded up to a power of two and both
    /// dimensions are clamped to at least 1 and at most 2^26 columns and 64
    /// rows.
    pub fn new(width: usize, depth: usize) -> Sketch {
        let width = width.clamp(1, MAX_WIDTH).next_power_of_two();
        let depth = depth.clamp(1, MAX_DEPTH);
        Sketch {
            width,
            depth,
            counters: vec![0; width * depth],
            rows: row_multipliers(depth),
            total: 0,
        }
    }

    /// 4096 x 4 (64 KiB). The additive error bound is `e / 4096` of the
    /// total, about 0.066%, exceeded by a given estimate with probability at
    /// most `e^-4`, about 1.8%. For example, a thread sampling 1 in 8 of
    /// 100k requests/s has 12,500 samples in a 1 s window: a bound of 9
    /// samples, or 72 requests/s once scaled back up.
    pub fn with_defaults() -> Sketch {
        Sketch::new(DEFAULT_WIDTH, DEFAULT_DEPTH)
    }

    /// Index into `counters` of `hash`'s cell in `row`. Multiply-shift with a
    /// per-row odd multiplier gives each row an independent-looking column
    /// from one 64-bit hash; the high bits of the product are the well mixed
    /// ones, and `width` is a power of two so this is `product >> (64 - log2 w)`.
    #[inline]
    fn cell(&self, row: usize, multiplier: u64, hash: u64) -> usize {
        let mixed = hash.wrapping_mul(multiplier);
        let column = ((u128::from(mixed) * self.width as u128) >> 64) as usize;
        row * self.width + column
    }

    /// Conservative update: the new estimate is the old minimum plus
    /// `weight`, and only counters below it are raised. Returns the new
    /// estimate (saturating).
    #[inline]
    pub fn add(&mut self, hash: u64, weight: u32) -> u32 {
        self.total = self.total.saturating_add(u64::from(weight));
        let estimate = self.estimate(hash).saturating_add(weight);
        for (row, &m) in self.rows.iter().enumerate() {
            let i = self.cell(row, m, hash);
            let c = &mut self.counters[i];
            if *c < estimate {
                *c = estimate;
            }
        }
        estimate
    }

    /// Upper bound on the weight added for `hash` since the last clear.
    #[inline]
    pub fn estimate(&self, hash: u64) -> u32 {
        let mut min = u32::MAX;
        for (row, &m) in self.rows.iter().enumerate() {
            min = min.min(self.counters[self.cell(row, m, hash)]);
        }
        min
    }

    /// Sum of all weights added (saturating).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The count-min additive error bound `ceil(e / width * total)`: an
    /// estimate exceeds the true count by more than this with probability
    /// at most `e^-depth`.
    pub fn error_bound(&self) -> u64 {
        (std::f64::consts::E * self.total as f64 / self.width as f64).ceil() as u64
    }

    /// Add `other`'s counters into this sketch. Returns false and changes
    /// nothing if the shapes differ, since cells would not line up. The
    /// result is an upper bound for every key over both streams, though not
    /// bit-identical to one sketch fed both streams (conservative update
    /// depends on arrival order).
    pub fn merge(&mut self, other: &Sketch) -> bool {
        if self.width != other.width || self.depth != other.depth {
            return false;
        }
        for (a, &b) in self.counters.iter_mut().zip(&other.counters) {
            *a = a.saturating_add(b);
        }
        self.total = self.total.saturating_add(other.total);
        true
    }

    /// Zero every counter and the total, keeping the allocation.
    pub fn clear(&mut self) {
        self.counters.fill(0);
        self.total = 0;
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The counters, `depth` rows of `width`, for shipping to another proxy.
    pub fn counters(&self) -> &[u32] {
        &self.counters
    }

    /// Rebuild a sketch from [`Sketch::counters`] and [`Sketch::total`] as
    /// sent by a peer. `None` unless `width` is a power of two, both
    /// dimensions are within limits and `counters` has `width * depth` cells;
    /// the input is untrusted, so this never panics.
    pub fn from_counters(
        width: usize,
        depth: usize,
        counters: Vec<u32>,
        total: u64,
    ) -> Option<Sketch> {
        let shape_ok = width.is_power_of_two()
            && width <= MAX_WIDTH
            && (1..=MAX_DEPTH).contains(&depth)
            && width.checked_mul(depth) == Some(counters.len());
        shape_ok.then(|| Sketch {
            width,
            depth,
            counters,
            rows: row_multipliers(depth),
            total,
        })
    }

    /// Bytes owned by this sketch (counters and row multipliers).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.counters.capacity() * std::mem::size_of::<u32>()
            + self.rows.capacity() * std::mem::size_of::<u64>()
    }
}

fn row_multipliers(depth: usize) -> Vec<u64> {
    (0..depth as u64)
        .map(|row| splitmix64(ROW_SEED ^ row) | 1)
        .collect()
}

/// One key reported by [`TopK::sorted`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Box<[u8]>,
    /// [`key_hash`] of `key`.
    pub hash: u64,
    /// Estimated count: an upper bound on the weight added for this key.
    pub count: u32,
}

/// Hasher for maps keyed by a [`key_hash`]: the key is already a good hash,
/// so hashing it again would only cost time on the data path.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if the map's key type changes; stay correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type HashIndex = HashMap<u64, u32, BuildHasherDefault<PassThrough>>;

/// A candidate's identity. Slots stay put while their heap entries move, so
/// sifting only rewrites the small `pos` array, and a slot's key buffer is
/// reused when it takes in a new key (no allocation once warm).
#[derive(Debug)]
struct Slot {
    hash: u64,
    key: Vec<u8>,
}

/// The top-K keys by estimated count.
///
/// Internally it holds up to `capacity` candidates (by default
/// [`CANDIDATES_PER_K`] x K) in a min-heap, and reports the K largest. A key
/// is identified by its [`key_hash`]; the bytes are compared too, so a
/// 64-bit collision keeps the incumbent instead of mixing two keys.
#[derive(Debug)]
pub struct TopK {
    k: usize,
    capacity: usize,
    /// Min-heap of (count, slot), smallest count at 0.
    heap: Vec<(u32, u32)>,
    /// Heap position of each slot.
    pos: Vec<u32>,
    slots: Vec<Slot>,
    index: HashIndex,
}

impl TopK {
    /// Report the top `k`, tracking [`CANDIDATES_PER_K`] x `k` candidates.
    pub fn new(k: usize) -> TopK {
        TopK::with_capacity(k, k.saturating_mul(CANDIDATES_PER_K))
    }

    /// Report the top `k`, tracking `capacity` candidates (at least `k`).
    pub fn with_capacity(k: usize, capacity: usize) -> TopK {
        // Slot numbers are u32 to keep heap entries at 8 bytes.
        let capacity = capacity.max(k).min(u32::MAX as usize);
        TopK {
            k: k.min(capacity),
            capacity,
            heap: Vec::new(),
            pos: Vec::new(),
            slots: Vec::new(),
            index: HashIndex::default(),
        }
    }

    /// Offer a key with its current estimate; keeps the largest. A key
    /// already held takes the new estimate. O(1) when the set is full and
    /// `estimate` is not above its minimum, O(log capacity) otherwise; the key
    /// is copied only when it enters the set.
    #[inline]
    pub fn offer(&mut self, key: &[u8], hash: u64, estimate: u32) {
        self.upsert(key, hash, estimate, |_| estimate);
    }

    /// Shared body of [`TopK::offer`] and [`HeavyHitters::add`]: a held key
    /// gets `held(old count)`, a new one enters with `estimate` if it beats
    /// the minimum of a full set.
    #[inline]
    fn upsert(&mut self, key: &[u8], hash: u64, estimate: u32, held: impl FnOnce(u32) -> u32) {
        // A held key's count never exceeds its estimate, and the minimum
        // never exceeds a held count, so this also skips held keys whose
        // count could not change: the common case for a tail key costs no
        // hash lookup.
        let full = self.heap.len() >= self.capacity;
        if self.capacity == 0 || (full && estimate <= self.heap[0].0) {
            return;
        }
        if let Some(&slot) = self.index.get(&hash) {
            let slot = slot as usize;
            if self.slots[slot].key != key {
                return;
            }
            let at = self.pos[slot] as usize;
            self.set_count(at, held(self.heap[at].0));
            return;
        }
        if !full {
            let slot = self.slots.len() as u32;
            self.slots.push(Slot {
                hash,
                key: key.to_vec(),
            });
            self.pos.push(self.heap.len() as u32);
            self.heap.push((estimate, slot));
            self.index.insert(hash, slot);
            self.sift_up(self.heap.len() - 1);
            return;
        }
        // Evict the minimum and reuse its slot and key buffer.
        let slot = self.heap[0].1;
        let entry = &mut self.slots[slot as usize];
        self.index.remove(&entry.hash);
        entry.hash = hash;
        entry.key.clear();
        entry.key.extend_from_slice(key);
        self.index.insert(hash, slot);
        self.heap[0].0 = estimate;
        self.sift_down(0);
    }

    /// The count held for `hash`, if it is a candidate.
    pub fn get(&self, hash: u64) -> Option<u32> {
        let slot = *self.index.get(&hash)?;
        Some(self.heap[self.pos[slot as usize] as usize].0)
    }

    /// Number of entries [`TopK::sorted`] returns: held candidates, at most K.
    pub fn len(&self) -> usize {
        self.heap.len().min(self.k)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// K, the number of keys reported.
    pub fn k(&self) -> usize {
        self.k
    }

    /// How many candidates are tracked.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The admission threshold: the smallest count among the candidates
    /// once all `capacity` places are taken, 0 before that.
    pub fn min(&self) -> u32 {
        if self.heap.len() < self.capacity {
            0
        } else {
            self.heap.first().map_or(0, |e| e.0)
        }
    }

    /// The top K entries, largest count first (ties by hash, so the order
    /// is deterministic). Allocates; meant for once per window.
    pub fn sorted(&self) -> Vec<Entry> {
        let mut all: Vec<(u32, u32)> = self.heap.clone();
        all.sort_unstable_by(|a, b| {
            b.0.cmp(&a.0).then_with(|| {
                self.slots[a.1 as usize]
                    .hash
                    .cmp(&self.slots[b.1 as usize].hash)
            })
        });
        all.truncate(self.k);
        all.into_iter()
            .map(|(count, slot)| {
                let s = &self.slots[slot as usize];
                Entry {
                    key: s.key.clone().into_boxed_slice(),
                    hash: s.hash,
                    count,
                }
            })
            .collect()
    }

    /// Every candidate as (key, hash, count), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64, u32)> + '_ {
        self.heap.iter().map(|&(count, slot)| {
            let s = &self.slots[slot as usize];
            (s.key.as_slice(), s.hash, count)
        })
    }

    pub fn clear(&mut self) {
        self.heap.clear();
        self.pos.clear();
        self.slots.clear();
        self.index.clear();
    }

    /// Approximate bytes owned: heap, slots with their key buffers, index.
    pub fn memory_bytes(&self) -> usize {
        let keys: usize = self.slots.iter().map(|s| s.key.capacity()).sum();
        std::mem::size_of::<Self>()
            + self.heap.capacity() * std::mem::size_of::<(u32, u32)>()
            + self.pos.capacity() * std::mem::size_of::<u32>()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + keys
            // hashbrown: one (key, value) pair and one control byte per bucket.
            + self.index.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
    }

    /// Replace the count at heap position `at` and restore the heap.
    fn set_count(&mut self, at: usize, count: u32) {
        let old = self.heap[at].0;
        self.heap[at].0 = count;
        if count > old {
            self.sift_down(at);
        } else if count < old {
            self.sift_up(at);
        }
    }

    /// Recompute every candidate's count (after a merge) and re-heapify.
    fn rescore(&mut self, mut score: impl FnMut(u64, u32) -> u32) {
        for entry in &mut self.heap {
            entry.0 = score(self.slots[entry.1 as usize].hash, entry.0);
        }
        for at in (0..self.heap.len() / 2).rev() {
            self.sift_down(at);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].1 as usize] = a as u32;
        self.pos[self.heap[b].1 as usize] = b as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[parent].0 <= self.heap[at].0 {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
        self.pos[self.heap[at].1 as usize] = at as u32;
    }

    fn sift_down(&mut self, mut at: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * at + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.heap[right].0 < self.heap[left].0 {
                right
            } else {
                left
            };
            if self.heap[at].0 <= self.heap[child].0 {
                break;
            }
            self.swap(at, child);
            at = child;
        }
        self.pos[self.heap[at].1 as usize] = at as u32;
    }
}

/// Sketch + top-K: what one worker thread keeps per window.
#[derive(Debug)]
pub struct HeavyHitters {
    pub sketch: Sketch,
    pub top: TopK,
}

impl HeavyHitters {
    /// Report the top `k` keys using the default sketch
    /// ([`Sketch::with_defaults`]) and [`TopK::new`].
    pub fn new(k: usize) -> HeavyHitters {
        HeavyHitters {
            sketch: Sketch::with_defaults(),
            top: TopK::new(k),
        }
    }

    /// Count `weight` hits of `key`.
    #[inline]
    pub fn add(&mut self, key: &[u8], weight: u32) {
        self.add_hashed(key, key_hash(key), weight);
    }

    /// [`HeavyHitters::add`] for a caller that already has `key_hash(key)`.
    ///
    /// A candidate's count is the smaller of its sketch estimate and its
    /// previous count plus `weight`. Both are upper bounds on the true
    /// count, and the second grows exactly from the moment the key became a
    /// candidate, so the counts of hot keys (which become candidates early,
    /// while the sketch is nearly empty) carry almost none of the sketch's
    /// collision error.
    #[inline]
    pub fn add_hashed(&mut self, key: &[u8], hash: u64, weight: u32) {
        let estimate = self.sketch.add(hash, weight);
        self.top.upsert(key, hash, estimate, |held| {
            held.saturating_add(weight).min(estimate)
        });
    }

    /// Fold `other` (another thread's window) into this one: sketches are
    /// added, and every candidate of either side is rescored with the
    /// tighter of the merged sketch estimate and the sum of its two sides'
    /// counts. If the sketch shapes differ the sketches are left alone and
    /// the per-side sums alone are used (still upper bounds).
    pub fn merge(&mut self, other: &HeavyHitters) {
        // Per-side bounds must be read before the sketches are combined.
        let (mine, my_sketch) = (&self.top, &self.sketch);
        let theirs: Vec<(&[u8], u64, u64)> = other
            .top
            .iter()
            .map(|(key, hash, count)| {
                let here = mine.get(hash).unwrap_or_else(|| my_sketch.estimate(hash));
                (key, hash, u64::from(count) + u64::from(here))
            })
            .collect();
        let merged = self.sketch.merge(&other.sketch);
        let sketch = &self.sketch;
        let tighten = |hash: u64, bound: u64| -> u32 {
            let bound = u32::try_from(bound).unwrap_or(u32::MAX);
            if merged {
                bound.min(sketch.estimate(hash))
            } else {
                bound
            }
        };
        self.top.rescore(|hash, count| {
            let there = other
                .top
                .get(hash)
                .unwrap_or_else(|| other.sketch.estimate(hash));
            tighten(hash, u64::from(count) + u64::from(there))
        });
        // Candidates both sides hold were rescored above to the same value,
        // so offering them again changes nothing.
        for (key, hash, bound) in theirs {
            let count = tighten(hash, bound);
            self.top.upsert(key, hash, count, |_| count);
        }
    }

    /// Start a new window, keeping allocations.
    pub fn clear(&mut self) {
        self.sketch.clear();
        self.top.clear();
    }

    /// Approximate bytes owned by the sketch and the candidate set.
    pub fn memory_bytes(&self) -> usize {
        self.sketch.memory_bytes() + self.top.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic streams without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn key(n: u64) -> Vec<u8> {
        format!("key:{n}").into_bytes()
    }

    /// A skewed stream: key `n` (for n < keys) drawn with weight ~ 1/(n+1),
    /// by rejection from a log-uniform draw. Returns the stream and the
    /// exact counts.
    fn skewed(keys: u64, len: usize, seed: u64) -> (Vec<u64>, Vec<u32>) {
        let mut rng = Rng(seed);
        let mut counts = vec![0u32; keys as usize];
        let stream: Vec<u64> = (0..len)
            .map(|_| {
                // exp(U * ln keys) is log-uniform on [1, keys): P(n) ~ 1/n.
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                let n = ((u * (keys as f64).ln()).exp() as u64 - 1).min(keys - 1);
                counts[n as usize] += 1;
                n
            })
            .collect();
        (stream, counts)
    }

    /// Plain count-min update, for comparison with conservative update.
    fn plain_add(s: &mut Sketch, hash: u64, weight: u32) {
        s.total += u64::from(weight);
        for (row, &m) in s.rows.clone().iter().enumerate() {
            let i = s.cell(row, m, hash);
            s.counters[i] = s.counters[i].saturating_add(weight);
        }
    }

    #[test]
    fn key_hash_is_pinned() {
        // These values are the cross-process contract: sketches from other
        // proxies are merged cell by cell. Every branch of the hash (empty,
        // short tail, long tail, full 16-byte blocks) is covered.
        let cases: &[(&[u8], u64)] = &[
            (b"", 0xcb9d_aa31_dfc6_f349),
            (b"a", 0x6caf_9e2c_747d_834e),
            (b"key:42", 0x42b6_4467_e65a_8097),
            (b"12345678", 0x8f82_3481_32a1_e79f),
            (b"user:1000:profile", 0x10bf_3642_16a8_4292),
            (b"0123456789abcdef", 0x0209_98a9_ffd8_0008),
            (
                b"session:4f1c2a9e-77b3-4e0d-9a4c-0c1b2d3e4f50",
                0xaa79_a7f0_0e22_c0fa,
            ),
        ];
        for &(input, want) in cases {
            assert_eq!(
                key_hash(input),
                want,
                "key_hash({:?}) changed",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn key_hash_spreads_similar_keys() {
        let n = 100_000u64;
        let hashes: Vec<u64> = (0..n).map(|i| key_hash(&key(i))).collect();
        let mut sorted = hashes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), n as usize, "collisions among key:N");
        // Every output bit should be set about half the time.
        for bit in 0..64 {
            let ones = hashes.iter().filter(|h| *h >> bit & 1 == 1).count() as f64;
            let share = ones / n as f64;
            assert!((share - 0.5).abs() < 0.01, "bit {bit} set {share:.3}");
        }
        // Keys differing in one byte differ in about half the bits.
        let flips: u32 = (0..1000u64)
            .map(|i| (key_hash(&key(i)) ^ key_hash(&key(i + 1000))).count_ones())
            .sum();
        let mean = f64::from(flips) / 1000.0;
        assert!((mean - 32.0).abs() < 1.5, "mean bit flips {mean}");
    }

    #[test]
    fn shape_is_rounded_and_clamped() {
        let s = Sketch::new(1000, 3);
        assert_eq!((s.width(), s.depth()), (1024, 3));
        assert_eq!(s.counters().len(), 1024 * 3);
        let s = Sketch::new(0, 0);
        assert_eq!((s.width(), s.depth()), (1, 1));
        let d = Sketch::with_defaults();
        assert_eq!((d.width(), d.depth()), (DEFAULT_WIDTH, DEFAULT_DEPTH));
        // A one-column sketch still works: every key shares the cell.
        let mut s = Sketch::new(1, 2);
        s.add(key_hash(b"a"), 2);
        s.add(key_hash(b"b"), 3);
        assert_eq!(s.estimate(key_hash(b"a")), 5);
    }

    #[test]
    fn few_keys_are_counted_exactly() {
        let mut s = Sketch::with_defaults();
        let (a, b, c) = (key_hash(b"a"), key_hash(b"b"), key_hash(b"c"));
        for _ in 0..5 {
            s.add(a, 1);
        }
        assert_eq!(s.add(b, 3), 3);
        assert_eq!(s.add(c, 1), 1);
        assert_eq!(s.add(a, 0), 5, "weight 0 reads the estimate");
        assert_eq!((s.estimate(a), s.estimate(b), s.estimate(c)), (5, 3, 1));
        assert_eq!(s.estimate(key_hash(b"never added")), 0);
        assert_eq!(s.total(), 9);
    }

    #[test]
    fn estimates_are_upper_bounds_within_the_error_bound() {
        let (stream, counts) = skewed(20_000, 200_000, 7);
        let mut s = Sketch::new(512, 4);
        for &n in &stream {
            s.add(key_hash(&key(n)), 1);
        }
        assert_eq!(s.total(), 200_000);
        let bound = s.error_bound();
        assert_eq!(
            bound,
            (std::f64::consts::E * 200_000.0 / 512.0).ceil() as u64
        );
        let mut over_bound = 0;
        for (n, &truth) in counts.iter().enumerate() {
            let est = s.estimate(key_hash(&key(n as u64)));
            assert!(est >= truth, "key {n}: estimate {est} < true {truth}");
            if u64::from(est - truth) > bound {
                over_bound += 1;
            }
        }
        // The bound may fail with probability e^-4 per key; conservative
        // update should make that far rarer.
        assert!(
            over_bound <= counts.len() / 50,
            "{over_bound} keys beyond the bound"
        );
    }

    #[test]
    fn conservative_update_overestimates_less_than_plain() {
        let (stream, counts) = skewed(20_000, 200_000, 11);
        let mut cu = Sketch::new(2048, 4);
        let mut plain = Sketch::new(2048, 4);
        for &n in &stream {
            let h = key_hash(&key(n));
            cu.add(h, 1);
            plain_add(&mut plain, h, 1);
        }
        let (mut cu_err, mut plain_err) = (0u64, 0u64);
        for (n, &truth) in counts.iter().enumerate() {
            let h = key_hash(&key(n as u64));
            let (c, p) = (cu.estimate(h), plain.estimate(h));
            assert!(truth <= c && c <= p, "key {n}: {truth} <= {c} <= {p}");
            cu_err += u64::from(c - truth);
            plain_err += u64::from(p - truth);
        }
        // About half on this stream; demand at least a third less.
        assert!(
            cu_err * 3 < plain_err * 2,
            "conservative {cu_err} vs plain {plain_err}"
        );
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let mut s = Sketch::new(16, 2);
        let h = key_hash(b"hot");
        s.add(h, u32::MAX - 1);
        assert_eq!(s.add(h, 10), u32::MAX);
        assert_eq!(s.estimate(h), u32::MAX);
        let other = s.clone();
        assert!(s.merge(&other));
        assert_eq!(s.estimate(h), u32::MAX);
    }

    #[test]
    fn merge_equals_adding_both_streams() {
        // Few keys: exact on both sides, so the merge is exact too.
        let (mut a, mut b, mut both) = (
            Sketch::with_defaults(),
            Sketch::with_defaults(),
            Sketch::with_defaults(),
        );
        let keys: Vec<u64> = (0..20).map(|n| key_hash(&key(n))).collect();
        for (i, &h) in keys.iter().enumerate() {
            let w = i as u32 + 1;
            a.add(h, w);
            b.add(h, 2 * w);
            both.add(h, 3 * w);
        }
        b.add(key_hash(b"only-b"), 4);
        both.add(key_hash(b"only-b"), 4);
        assert!(a.merge(&b));
        assert_eq!(a.total(), both.total());
        for &h in keys.iter().chain(&[key_hash(b"only-b")]) {
            assert_eq!(a.estimate(h), both.estimate(h));
        }

        // Many colliding keys: still an upper bound over both streams, and
        // within the bound of the merged total.
        let (s1, c1) = skewed(20_000, 100_000, 3);
        let (s2, c2) = skewed(20_000, 100_000, 5);
        let (mut a, mut b) = (Sketch::new(512, 4), Sketch::new(512, 4));
        s1.iter().for_each(|&n| {
            a.add(key_hash(&key(n)), 1);
        });
        s2.iter().for_each(|&n| {
            b.add(key_hash(&key(n)), 1);
        });
        assert!(a.merge(&b));
        assert_eq!(a.total(), 200_000);
        let bound = a.error_bound();
        let mut over_bound = 0;
        for n in 0..20_000 {
            let truth = c1[n] + c2[n];
            let est = a.estimate(key_hash(&key(n as u64)));
            assert!(est >= truth);
            over_bound += usize::from(u64::from(est - truth) > bound);
        }
        assert!(over_bound <= 400, "{over_bound} keys beyond the bound");
    }

    #[test]
    fn merge_refuses_other_shapes() {
        let mut a = Sketch::new(64, 4);
        a.add(1, 1);
        let before = a.clone();
        assert!(!a.merge(&Sketch::new(128, 4)));
        assert!(!a.merge(&Sketch::new(64, 3)));
        assert_eq!(a, before);
    }

    #[test]
    fn from_counters_round_trips() {
        let (stream, _) = skewed(1000, 10_000, 13);
        let mut s = Sketch::new(256, 3);
        for &n in &stream {
            s.add(key_hash(&key(n)), 1);
        }
        let copy = Sketch::from_counters(s.width(), s.depth(), s.counters().to_vec(), s.total())
            .expect("valid shape");
        assert_eq!(copy, s);
        for n in 0..1000 {
            let h = key_hash(&key(n));
            assert_eq!(copy.estimate(h), s.estimate(h));
        }
        assert_eq!(copy.error_bound(), s.error_bound());

        // Untrusted input: wrong shapes are refused, never a panic.
        assert!(Sketch::from_counters(100, 2, vec![0; 200], 0).is_none());
        assert!(Sketch::from_counters(128, 2, vec![0; 255], 0).is_none());
        assert!(Sketch::from_counters(128, 0, vec![], 0).is_none());
        assert!(Sketch::from_counters(0, 1, vec![], 0).is_none());
        assert!(Sketch::from_counters(1 << 40, 1 << 30, vec![], 0).is_none());
        assert!(Sketch::from_counters(usize::MAX / 2 + 1, 2, vec![], 0).is_none());
    }

    #[test]
    fn clear_forgets_everything() {
        let mut hh = HeavyHitters::new(10);
        for n in 0..1000 {
            hh.add(&key(n % 37), 1);
        }
        assert!(!hh.top.is_empty());
        hh.clear();
        assert_eq!(hh.sketch.total(), 0);
        assert!(hh.sketch.counters().iter().all(|&c| c == 0));
        assert!(hh.top.is_empty());
        assert_eq!(hh.top.len(), 0);
        assert!(hh.top.sorted().is_empty());
        assert_eq!(hh.sketch.estimate(key_hash(&key(0))), 0);
        // Usable again after a clear.
        hh.add(b"again", 2);
        assert_eq!(hh.top.sorted()[0].count, 2);
    }

    #[test]
    fn top_k_keeps_the_largest() {
        let mut top = TopK::with_capacity(3, 3);
        assert_eq!((top.k(), top.capacity(), top.min()), (3, 3, 0));
        for (n, est) in [(1u64, 5u32), (2, 3), (3, 9)] {
            top.offer(&key(n), key_hash(&key(n)), est);
        }
        assert_eq!(top.min(), 3);
        // Not above the minimum of a full set: rejected, nothing changes.
        top.offer(&key(4), key_hash(&key(4)), 3);
        assert_eq!(top.get(key_hash(&key(4))), None);
        // Above it: evicts the minimum.
        top.offer(&key(4), key_hash(&key(4)), 4);
        assert_eq!(top.get(key_hash(&key(2))), None);
        assert_eq!(top.min(), 4);
        // A held key takes its new estimate and moves.
        top.offer(&key(4), key_hash(&key(4)), 20);
        let got: Vec<(Vec<u8>, u32)> = top
            .sorted()
            .into_iter()
            .map(|e| {
                assert_eq!(e.hash, key_hash(&e.key));
                (e.key.into_vec(), e.count)
            })
            .collect();
        assert_eq!(got, vec![(key(4), 20), (key(3), 9), (key(1), 5)]);
        assert_eq!(top.len(), 3);
    }

    #[test]
    fn top_k_reports_k_of_its_candidates() {
        let mut top = TopK::with_capacity(2, 8);
        for n in 0..5u64 {
            top.offer(&key(n), key_hash(&key(n)), n as u32 + 1);
        }
        assert_eq!(top.len(), 2);
        assert_eq!(top.iter().count(), 5);
        assert_eq!(top.min(), 0, "not full: every key is admitted");
        let keys: Vec<Vec<u8>> = top.sorted().into_iter().map(|e| e.key.into_vec()).collect();
        assert_eq!(keys, vec![key(4), key(3)]);
        let mut none = TopK::new(0);
        none.offer(b"x", 1, 100);
        assert!(none.is_empty() && none.sorted().is_empty());
    }

    #[test]
    fn top_k_keeps_the_incumbent_on_a_hash_collision() {
        let mut top = TopK::new(4);
        top.offer(b"first", 42, 5);
        top.offer(b"second", 42, 50);
        let all = top.sorted();
        assert_eq!(all.len(), 1);
        assert_eq!((&*all[0].key, all[0].count), (&b"first"[..], 5));
    }

    #[test]
    fn top_k_heap_survives_churn() {
        // Random offers, including lower estimates for held keys (sift
        // up) and evictions; heap order and the slot/position/index
        // bookkeeping must stay consistent throughout.
        let mut rng = Rng(99);
        let mut top = TopK::with_capacity(10, 40);
        for _ in 0..20_000 {
            let n = rng.below(500);
            let est = rng.below(1000) as u32;
            top.offer(&key(n), key_hash(&key(n)), est);
            let min = top.heap[0].0;
            assert!(top.heap.iter().all(|e| e.0 >= min));
        }
        for (at, &(count, slot)) in top.heap.iter().enumerate() {
            assert_eq!(top.pos[slot as usize] as usize, at);
            let s = &top.slots[slot as usize];
            assert_eq!(top.get(s.hash), Some(count));
            assert_eq!(key_hash(&s.key), s.hash);
            for child in [2 * at + 1, 2 * at + 2] {
                if let Some(c) = top.heap.get(child) {
                    assert!(c.0 >= count, "heap order at {at}");
                }
            }
        }
        assert_eq!(top.index.len(), top.heap.len());
    }

    /// True top `k` key numbers of `counts`, largest first.
    fn true_top(counts: &[u32], k: usize) -> Vec<u64> {
        let mut order: Vec<u64> = (0..counts.len() as u64).collect();
        order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        order.truncate(k);
        order
    }

    #[test]
    fn heavy_hitters_find_the_heavy_keys() {
        let (stream, counts) = skewed(50_000, 300_000, 21);
        let mut hh = HeavyHitters::new(10);
        for &n in &stream {
            hh.add(&key(n), 1);
        }
        let want = true_top(&counts, 10);
        let got = hh.top.sorted();
        let got_keys: Vec<Vec<u8>> = got.iter().map(|e| e.key.to_vec()).collect();
        let want_keys: Vec<Vec<u8>> = want.iter().map(|&n| key(n)).collect();
        assert_eq!(got_keys, want_keys);
        for (e, &n) in got.iter().zip(&want) {
            let truth = counts[n as usize];
            assert!(e.count >= truth);
            assert!(
                f64::from(e.count - truth) <= 0.01 * f64::from(truth),
                "key {n}: {} vs {truth}",
                e.count
            );
        }
    }

    #[test]
    fn heavy_hitters_candidates_count_exactly_once_admitted() {
        // A tiny sketch where every key collides: the sketch alone would
        // report the total; counting since admission keeps the truth.
        let mut hh = HeavyHitters {
            sketch: Sketch::new(1, 1),
            top: TopK::new(4),
        };
        for _ in 0..100 {
            hh.add(b"a", 1);
            hh.add(b"b", 2);
        }
        let got: Vec<u32> = hh.top.sorted().iter().map(|e| e.count).collect();
        assert_eq!(got, vec![200 + 1, 100]);
        assert_eq!(hh.sketch.estimate(key_hash(b"a")), 300);
    }

    #[test]
    fn heavy_hitters_merge_matches_one_stream() {
        let (stream, counts) = skewed(50_000, 300_000, 31);
        let (first, second) = stream.split_at(stream.len() / 2);
        let (mut a, mut b, mut whole) = (
            HeavyHitters::new(10),
            HeavyHitters::new(10),
            HeavyHitters::new(10),
        );
        first.iter().for_each(|&n| a.add(&key(n), 1));
        second.iter().for_each(|&n| b.add(&key(n), 1));
        stream.iter().for_each(|&n| whole.add(&key(n), 1));
        a.merge(&b);
        assert_eq!(a.sketch.total(), whole.sketch.total());
        let merged: Vec<Vec<u8>> = a.top.sorted().iter().map(|e| e.key.to_vec()).collect();
        let single: Vec<Vec<u8>> = whole.top.sorted().iter().map(|e| e.key.to_vec()).collect();
        assert_eq!(merged, single);
        for e in a.top.sorted() {
            let n: u64 = std::str::from_utf8(&e.key[4..]).unwrap().parse().unwrap();
            let truth = counts[n as usize];
            assert!(e.count >= truth);
            assert!(f64::from(e.count - truth) <= 0.01 * f64::from(truth));
        }

        // Keys only one side holds are merged in with the other side's
        // estimate, and disjoint candidates all survive.
        let mut x = HeavyHitters::new(2);
        let mut y = HeavyHitters::new(2);
        x.add(b"x", 5);
        y.add(b"y", 7);
        y.add(b"x", 1);
        x.merge(&y);
        let got: Vec<(Vec<u8>, u32)> = x
            .top
            .sorted()
            .into_iter()
            .map(|e| (e.key.into_vec(), e.count))
            .collect();
        assert_eq!(got, vec![(b"y".to_vec(), 7), (b"x".to_vec(), 6)]);
    }

    #[test]
    fn heavy_hitters_merge_across_shapes_keeps_bounds() {
        let mut a = HeavyHitters::new(2);
        let mut b = HeavyHitters {
            sketch: Sketch::new(64, 2),
            top: TopK::new(2),
        };
        a.add(b"k", 3);
        b.add(b"k", 4);
        b.add(b"j", 1);
        a.merge(&b);
        assert_eq!(a.sketch.total(), 3, "sketches of other shapes stay apart");
        assert_eq!(a.top.get(key_hash(b"k")), Some(7));
        assert_eq!(a.top.get(key_hash(b"j")), Some(1));
    }

    #[test]
    fn memory_is_modest() {
        let mut hh = HeavyHitters::new(100);
        for n in 0..100_000 {
            hh.add(&key(n), 1);
        }
        let bytes = hh.memory_bytes();
        assert!(bytes > DEFAULT_WIDTH * DEFAULT_DEPTH * 4);
        assert!(bytes < 128 * 1024, "{bytes} bytes");
    }
}

//! Which requests the hot-key detector samples: one in `sample_rate` on
//! average, decided per client with a countdown (no shared state on the
//! data path).
//!
//! The gap between samples is random with mean `sample_rate`: a fixed
//! period would alias with periodic workloads (a pipeline cycling over 20
//! keys, sampled every 8th request, would only ever see 5 of them).

#[derive(Debug)]
pub struct Sampler {
    /// Requests left until the next sample.
    tick: u32,
    /// xorshift64 state: cheap, per client.
    rng: u64,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Sampler {
            tick: 0,
            // Never zero: xorshift would stay at zero.
            rng: (0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9)) | 1,
        }
    }

    /// Is this request sampled? One countdown step, plus a random draw for
    /// the next gap when it is.
    #[inline]
    pub fn due(&mut self, rate: u32) -> bool {
        if self.tick > 0 {
            self.tick -= 1;
            return false;
        }
        if rate > 1 {
            let mut x = self.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng = x;
            // Uniform in 0..=2(rate-1): the gap (tick + 1) has mean `rate`.
            self.tick = (x % (2 * rate as u64 - 1)) as u32;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_rate_and_no_aliasing() {
        let mut s = Sampler::new(7);
        let n = 80_000;
        let sampled = (0..n).filter(|_| s.due(8)).count();
        assert!(
            (9_000..11_000).contains(&sampled),
            "{sampled} samples of {n} at 1 in 8"
        );
        // A pipeline cycling over 20 keys: every key gets sampled.
        let mut s = Sampler::new(1);
        let mut seen = [false; 20];
        for i in 0..20_000 {
            if s.due(8) {
                seen[i % 20] = true;
            }
        }
        assert!(seen.iter().all(|&x| x));
        let mut s = Sampler::new(3);
        assert!((0..100).all(|_| s.due(1)), "rate 1 samples every request");
    }
}

//! The random methods' numbers: a counter-based stream, so a merge gives the same bits whatever
//! the number of threads or the order blocks run in; and torch's CPU generator (mt19937), for the
//! draws mergekit makes with it (arcee_fusion's quantile sample).

/// A reproducible uniform in [0, 1) for (seed, tensor, input, element), independent of threads.
pub(crate) fn uniform(seed: u64, tensor: usize, input: usize, element: usize) -> f64 {
    let stream = splitmix64(splitmix64(seed ^ splitmix64(tensor as u64)) ^ input as u64);
    (splitmix64(stream.wrapping_add(element as u64)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

pub(super) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// torch's CPU generator: the 32-bit Mersenne Twister as `torch.manual_seed(seed)` seeds it (with
/// the seed's low 32 bits) and `random()` draws from it.
#[derive(Clone)]
pub(crate) struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    pub(crate) fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..624 {
            state[j] =
                1_812_433_253u32.wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, next: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.next = 0;
    }

    pub(crate) fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Skips `count` draws.
    pub(crate) fn discard(&mut self, mut count: u64) {
        while count > 0 {
            if self.next >= 624 {
                self.twist();
            }
            let step = count.min((624 - self.next) as u64);
            self.next += step as usize;
            count -= step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{uniform, Mt19937};

    #[test]
    fn mt19937_is_the_reference_generator() {
        // The 10000th output of mt19937 seeded with 5489 (C++ std::mt19937's check value).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        let mut skipped = Mt19937::new(5489);
        skipped.discard(9_999);
        assert_eq!(skipped.next_u32(), 4_123_659_995);
    }

    #[test]
    fn uniforms_are_reproducible_in_range_and_differ_per_stream() {
        let draws: Vec<f64> = (0..10_000).map(|e| uniform(7, 3, 1, e)).collect();
        assert_eq!(draws, (0..10_000).map(|e| uniform(7, 3, 1, e)).collect::<Vec<_>>());
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        // Another seed, tensor or input is another stream.
        for other in [uniform(8, 3, 1, 0), uniform(7, 4, 1, 0), uniform(7, 3, 2, 0)] {
            assert_ne!(other, draws[0]);
        }
    }
}

//! The random methods' numbers: a counter-based stream, so a merge gives the same bits whatever
//! the number of threads or the order blocks run in.

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

#[cfg(test)]
mod tests {
    use super::uniform;

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

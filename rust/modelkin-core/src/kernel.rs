//! The arithmetic of one chunk: reductions over f64 slices, compiled for several SIMD levels and
//! picked at run time, so one wheel runs on any x86-64 or aarch64 and still uses AVX2/AVX-512.
//!
//! Every reduction keeps eight independent partial sums: that lets the compiler vectorise without
//! reassociating, and fixes the summation order, so results do not depend on the CPU's level.

use multiversion::multiversion;

const LANES: usize = 8;

/// Σ x.
#[multiversion(targets = "simd")]
pub fn sum(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Σ x², the diagonal of the co-moment matrix.
#[multiversion(targets = "simd")]
pub fn sum_squares(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l] * c[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// (Σ x·y, Σ (x−y)²) in one sweep over both slices.
#[multiversion(targets = "simd")]
pub fn dot_and_squared_distance(x: &[f64], y: &[f64]) -> (f64, f64) {
    debug_assert_eq!(x.len(), y.len());
    let mut dot = [0.0f64; LANES];
    let mut dist = [0.0f64; LANES];
    let xc = x.chunks_exact(LANES);
    let yc = y.chunks_exact(LANES);
    let (mut dot_tail, mut dist_tail) = (0.0, 0.0);
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        dot_tail += a * b;
        dist_tail += (a - b) * (a - b);
    }
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            dot[l] += a[l] * b[l];
            let d = a[l] - b[l];
            dist[l] += d * d;
        }
    }
    (
        dot.iter().sum::<f64>() + dot_tail,
        dist.iter().sum::<f64>() + dist_tail,
    )
}

/// x ← x − y.
#[multiversion(targets = "simd")]
pub fn subtract(x: &mut [f64], y: &[f64]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a -= b;
    }
}

/// x ← x − c.
#[multiversion(targets = "simd")]
pub fn subtract_scalar(x: &mut [f64], c: f64) {
    for a in x.iter_mut() {
        *a -= c;
    }
}

/// max |x| (NaN propagates as NaN).
#[multiversion(targets = "simd")]
pub fn max_abs(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut tail = 0.0f64;
    for v in chunks.remainder() {
        tail = if v.is_nan() {
            f64::NAN
        } else {
            tail.max(v.abs())
        };
    }
    for c in chunks {
        for l in 0..LANES {
            // `f64::max` ignores NaN; a NaN must survive so the caller can report it.
            let a = c[l].abs();
            acc[l] = if a > acc[l] || a.is_nan() { a } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &v| {
        if v.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(v)
        }
    })
}

/// The original kinship tool's int8 quantisation: round(127·x/max), ties to even, clamped to ±127.
#[multiversion(targets = "simd")]
pub fn quantize_int8(x: &mut [f64], max_abs: f64) {
    for v in x.iter_mut() {
        *v = (127.0 * (*v / max_abs))
            .round_ties_even()
            .clamp(-127.0, 127.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_naive_sums() {
        let x: Vec<f64> = (0..37).map(|i| (i as f64 * 0.37).sin()).collect();
        let y: Vec<f64> = (0..37).map(|i| (i as f64 * 0.11).cos()).collect();
        let naive_dot: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        let naive_dist: f64 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        let (dot, dist) = dot_and_squared_distance(&x, &y);
        assert!((dot - naive_dot).abs() < 1e-12);
        assert!((dist - naive_dist).abs() < 1e-12);
        assert!((sum(&x) - x.iter().sum::<f64>()).abs() < 1e-12);
        assert!((sum_squares(&x) - x.iter().map(|v| v * v).sum::<f64>()).abs() < 1e-12);
        assert_eq!(max_abs(&[1.0, -3.0, 2.0]), 3.0);
        assert!(max_abs(&[1.0, f64::NAN, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).is_nan());
    }

    #[test]
    fn quantisation_rounds_half_to_even() {
        // 127 · (127/254) = 63.5 and 127 · (-381/254) = -190.5: a tie, and a value past the clamp.
        let mut x = vec![127.0, -381.0, 254.0, 0.0];
        quantize_int8(&mut x, 254.0);
        assert_eq!(x, vec![64.0, -127.0, 127.0, 0.0]);
    }
}

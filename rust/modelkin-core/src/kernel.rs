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

/// Σ (x − m)², a diagonal entry of the co-moment matrix.
#[multiversion(targets = "simd")]
pub fn centred_sum_squares(x: &[f64], m: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|v| (v - m) * (v - m)).sum();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - m;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// (Σ (x − mx)(y − my), Σ ((x − mx) − (y − my))²) in one sweep over both slices: the centred
/// co-moment and the centred squared distance, without a separate centring pass.
#[multiversion(targets = "simd")]
pub fn centred_dot_and_squared_distance(x: &[f64], y: &[f64], mx: f64, my: f64) -> (f64, f64) {
    debug_assert_eq!(x.len(), y.len());
    let mut dot = [0.0f64; LANES];
    let mut dist = [0.0f64; LANES];
    let xc = x.chunks_exact(LANES);
    let yc = y.chunks_exact(LANES);
    let (mut dot_tail, mut dist_tail) = (0.0, 0.0);
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        let (a, b) = (a - mx, b - my);
        dot_tail += a * b;
        dist_tail += (a - b) * (a - b);
    }
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            let (u, v) = (a[l] - mx, b[l] - my);
            dot[l] += u * v;
            let d = u - v;
            dist[l] += d * d;
        }
    }
    (
        dot.iter().sum::<f64>() + dot_tail,
        dist.iter().sum::<f64>() + dist_tail,
    )
}

/// x ← x − y, returning Σ x (after the subtraction).
#[multiversion(targets = "simd")]
pub fn subtract_and_sum(x: &mut [f64], y: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut xc = x.chunks_exact_mut(LANES);
    let mut yc = y.chunks_exact(LANES);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for l in 0..LANES {
            a[l] -= b[l];
            acc[l] += a[l];
        }
    }
    let mut tail = 0.0;
    for (a, b) in xc.into_remainder().iter_mut().zip(yc.remainder()) {
        *a -= b;
        tail += *a;
    }
    acc.iter().sum::<f64>() + tail
}

/// For the deltas a = x − z and b = y − z of one chunk:
/// [Σa, Σb, Σa², Σb², Σab, Σ(a − b)²], in a single sweep that never stores the deltas.
/// The common two-model case; sums are raw but only over one chunk, and chunks are merged centred.
#[multiversion(targets = "simd")]
pub fn pair_delta_sums(x: &[f64], y: &[f64], z: &[f64]) -> [f64; 6] {
    pair_sums_widened(x, y, z, |v| v)
}

/// [`pair_delta_sums`] over stored bf16 words, widened in registers: no f64 buffers to write and
/// read back, which is what bounds the two-model pass.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn pair_delta_sums_bf16(x: &[u16], y: &[u16], z: &[u16]) -> [f64; 6] {
    pair_sums_widened(x, y, z, |b| f64::from(f32::from_bits(u32::from(b) << 16)))
}

/// [`pair_delta_sums`] over stored f32 values, widened in registers.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn pair_delta_sums_f32(x: &[f32], y: &[f32], z: &[f32]) -> [f64; 6] {
    pair_sums_widened(x, y, z, f64::from)
}

#[inline(always)]
fn pair_sums_widened<T: Copy>(x: &[T], y: &[T], z: &[T], widen: impl Fn(T) -> f64) -> [f64; 6] {
    let mut acc = [[0.0f64; LANES]; 6];
    let (xc, yc, zc) = (
        x.chunks_exact(LANES),
        y.chunks_exact(LANES),
        z.chunks_exact(LANES),
    );
    let mut tail = [0.0f64; 6];
    for ((&x, &y), &z) in xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .zip(zc.remainder())
    {
        let z = widen(z);
        accumulate_pair(&mut tail, widen(x) - z, widen(y) - z);
    }
    for ((x, y), z) in xc.zip(yc).zip(zc) {
        for l in 0..LANES {
            let w = widen(z[l]);
            let (a, b) = (widen(x[l]) - w, widen(y[l]) - w);
            let d = a - b;
            acc[0][l] += a;
            acc[1][l] += b;
            acc[2][l] += a * a;
            acc[3][l] += b * b;
            acc[4][l] += a * b;
            acc[5][l] += d * d;
        }
    }
    std::array::from_fn(|s| acc[s].iter().sum::<f64>() + tail[s])
}

#[inline(always)]
fn accumulate_pair(acc: &mut [f64; 6], a: f64, b: f64) {
    acc[0] += a;
    acc[1] += b;
    acc[2] += a * a;
    acc[3] += b * b;
    acc[4] += a * b;
    acc[5] += (a - b) * (a - b);
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
        let (dot, dist) = centred_dot_and_squared_distance(&x, &y, 0.0, 0.0);
        assert!((dot - naive_dot).abs() < 1e-12);
        assert!((dist - naive_dist).abs() < 1e-12);
        assert!((sum(&x) - x.iter().sum::<f64>()).abs() < 1e-12);
        let m = 0.25;
        let naive_centred: f64 = x.iter().map(|v| (v - m) * (v - m)).sum();
        assert!((centred_sum_squares(&x, m) - naive_centred).abs() < 1e-12);
        let mut z = x.clone();
        let total = subtract_and_sum(&mut z, &y);
        assert!((total - (x.iter().sum::<f64>() - y.iter().sum::<f64>())).abs() < 1e-12);
        assert_eq!(z[36], x[36] - y[36]);
        let w: Vec<f64> = (0..37).map(|i| i as f64 * 1e-3).collect();
        let sums = pair_delta_sums(&x, &y, &w);
        let (a, b): (Vec<f64>, Vec<f64>) = x
            .iter()
            .zip(&y)
            .zip(&w)
            .map(|((x, y), w)| (x - w, y - w))
            .unzip();
        let (dot, dist) = centred_dot_and_squared_distance(&a, &b, 0.0, 0.0);
        assert!((sums[0] - a.iter().sum::<f64>()).abs() < 1e-12);
        assert!((sums[4] - dot).abs() < 1e-12 && (sums[5] - dist).abs() < 1e-12);
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

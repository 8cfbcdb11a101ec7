//! The arithmetic of one chunk: reductions over f64 slices, compiled for several SIMD levels and
//! picked at run time, so one wheel runs on any x86-64 or aarch64 and still uses AVX2/AVX-512.
//!
//! Every reduction keeps independent partial sums in a fixed order (32 for one statistic, two sets
//! of eight for the centred pair, 32 per statistic in the two-model kernel, `pair`): that lets the
//! compiler vectorise without reassociating, keeps consecutive adds from waiting on each other,
//! and fixes the summation order, so results do not depend on the CPU's level.

mod pair;

use multiversion::multiversion;

pub use pair::{pair_delta_sums, pair_delta_sums_stored, PAIR_LANES};

use crate::kinship::simd::{Accumulator, Lanes, LANES};

/// Partial sums of the one-statistic reductions: four AVX-512 registers or eight AVX2 ones, enough
/// that no add waits on the one before.
const SUM_LANES: usize = 32;

/// Σ x.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn sum(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; SUM_LANES];
    let chunks = x.chunks_exact(SUM_LANES);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..SUM_LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// (Σ (x − mx)(y − my), Σ ((x − mx) − (y − my))²) in one sweep over both slices: the centred
/// co-moment and the centred squared distance, without a separate centring pass.
pub fn centred_dot_and_squared_distance(x: &[f64], y: &[f64], mx: f64, my: f64) -> (f64, f64) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { x86::centred_dot_and_squared_distance_avx512(x, y, mx, my) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::centred_dot_and_squared_distance_avx2(x, y, mx, my) };
        }
    }
    // SAFETY: plain arrays need no CPU feature.
    unsafe { centred_dot_and_squared_distance_with::<Lanes>(x, y, mx, my) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kinship::simd::x86::{Avx2, Avx512};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn centred_dot_and_squared_distance_avx512(
        x: &[f64],
        y: &[f64],
        mx: f64,
        my: f64,
    ) -> (f64, f64) {
        // SAFETY: the CPU has AVX-512F.
        unsafe { super::centred_dot_and_squared_distance_with::<Avx512>(x, y, mx, my) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn centred_dot_and_squared_distance_avx2(
        x: &[f64],
        y: &[f64],
        mx: f64,
        my: f64,
    ) -> (f64, f64) {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { super::centred_dot_and_squared_distance_with::<Avx2>(x, y, mx, my) }
    }
}

/// [`centred_dot_and_squared_distance`] with two accumulators per sum, so consecutive steps do
/// not wait on each other.
///
/// # Safety
/// The CPU must have `A`'s features.
#[inline(always)]
unsafe fn centred_dot_and_squared_distance_with<A: Accumulator>(
    x: &[f64],
    y: &[f64],
    mx: f64,
    my: f64,
) -> (f64, f64) {
    const { assert!(A::WIDTH == LANES) };
    let n = x.len().min(y.len());
    // SAFETY (every block below): the caller guarantees A's CPU features, and loads stay below
    // i + 2·LANES <= n.
    let (mxv, myv, zero) = unsafe { (A::splat(mx), A::splat(my), A::splat(0.0)) };
    let (mut dot, mut dist) = ([zero; 2], [zero; 2]);
    let mut i = 0;
    while i + 2 * LANES <= n {
        for h in 0..2 {
            unsafe {
                let u = A::load(x.as_ptr().add(i + h * LANES)).sub(mxv);
                let v = A::load(y.as_ptr().add(i + h * LANES)).sub(myv);
                dot[h] = dot[h].add_product(u, v);
                let d = u.sub(v);
                dist[h] = dist[h].add_product(d, d);
            }
        }
        i += 2 * LANES;
    }
    let mut lanes = [[0.0; LANES]; 4];
    for (out, acc) in lanes.iter_mut().zip([dot[0], dot[1], dist[0], dist[1]]) {
        unsafe { acc.store(out.as_mut_ptr()) };
    }
    let (mut dot, mut dist): (f64, f64) = (
        (0..LANES).map(|l| lanes[0][l] + lanes[1][l]).sum(),
        (0..LANES).map(|l| lanes[2][l] + lanes[3][l]).sum(),
    );
    for (a, b) in x[i..n].iter().zip(&y[i..n]) {
        let (u, v) = (a - mx, b - my);
        dot += u * v;
        dist += (u - v) * (u - v);
    }
    (dot, dist)
}

/// out ← widen(x) − z for stored bf16 words x (little-endian bytes, any alignment), returning
/// Σ out: a fine-tune's block of deltas made in one sweep, without staging or a second pass.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn bf16_delta_and_sum(x: &[u8], z: &[f64], out: &mut [f64]) -> f64 {
    delta_and_sum::<u16>(x, z, out, |b| f64::from(f32::from_bits(u32::from(b) << 16)))
}

/// [`bf16_delta_and_sum`] for stored f32 values.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn f32_delta_and_sum(x: &[u8], z: &[f64], out: &mut [f64]) -> f64 {
    delta_and_sum::<f32>(x, z, out, f64::from)
}

#[inline(always)]
fn delta_and_sum<T: bytemuck::Pod>(x: &[u8], z: &[f64], out: &mut [f64], widen: impl Fn(T) -> f64) -> f64 {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(x.len(), out.len() * size);
    const STEP: usize = SUM_LANES;
    let mut acc = [0.0f64; STEP];
    let mut tail = 0.0;
    let (xc, zc, mut oc) = (x.chunks_exact(STEP * size), z.chunks_exact(STEP), out.chunks_exact_mut(STEP));
    let (x_tail, z_tail) = (xc.remainder(), zc.remainder());
    for ((x, z), o) in xc.zip(zc).zip(&mut oc) {
        // Unaligned loads of whole vectors of words; the target is little-endian (see `dtype`).
        let words: [T; STEP] =
            std::array::from_fn(|l| bytemuck::pod_read_unaligned(&x[l * size..(l + 1) * size]));
        for l in 0..STEP {
            o[l] = widen(words[l]) - z[l];
            acc[l] += o[l];
        }
    }
    for ((x, z), o) in x_tail.chunks_exact(size).zip(z_tail).zip(oc.into_remainder()) {
        *o = widen(bytemuck::pod_read_unaligned(x)) - z;
        tail += *o;
    }
    acc.iter().sum::<f64>() + tail
}

/// out ← (the elements stored in `bytes` as `dtype`) − `base`, returning Σ out. bf16 and f32 are
/// widened and subtracted in one sweep; other dtypes are decoded first.
pub fn stored_delta_and_sum(
    dtype: crate::io::dtype::FloatDtype,
    bytes: &[u8],
    base: &[f64],
    out: &mut [f64],
) -> f64 {
    use crate::io::dtype::FloatDtype;
    match dtype {
        FloatDtype::BF16 => bf16_delta_and_sum(bytes, base, out),
        FloatDtype::F32 => f32_delta_and_sum(bytes, base, out),
        _ => {
            crate::io::dtype::decode(dtype, bytes, out);
            subtract_and_sum(out, base)
        }
    }
}

/// x ← x − y, returning Σ x (after the subtraction).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn subtract_and_sum(x: &mut [f64], y: &[f64]) -> f64 {
    let mut acc = [0.0f64; SUM_LANES];
    let mut xc = x.chunks_exact_mut(SUM_LANES);
    let mut yc = y.chunks_exact(SUM_LANES);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for l in 0..SUM_LANES {
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

/// max |x| (NaN propagates as NaN).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn max_abs(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut tail = 0.0f64;
    for v in chunks.remainder() {
        tail = if v.is_nan() { f64::NAN } else { tail.max(v.abs()) };
    }
    for c in chunks {
        for l in 0..LANES {
            // `f64::max` ignores NaN; a NaN must survive so the caller can report it.
            let a = c[l].abs();
            acc[l] = if a > acc[l] || a.is_nan() { a } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v.is_nan() || m.is_nan() { f64::NAN } else { m.max(v) })
}

/// The original kinship tool's int8 quantisation: round(127·x/max), ties to even, clamped to ±127.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn quantize_int8(x: &mut [f64], max_abs: f64) {
    for v in x.iter_mut() {
        *v = (127.0 * (*v / max_abs)).round_ties_even().clamp(-127.0, 127.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The centred pair reduction the CPU runs and the scalar fallback give the same bits.
    #[test]
    fn centred_pair_is_the_same_on_every_level() {
        let x: Vec<f64> = (0..1003).map(|i| (i as f64 * 0.731).sin() * 1e-3).collect();
        let y: Vec<f64> = (0..1003).map(|i| (i as f64 * 0.277).cos() * 1e-3).collect();
        for n in [0, 5, 16, 17, 1003] {
            let (x, y) = (&x[..n], &y[..n]);
            // SAFETY: plain arrays need no CPU feature.
            let scalar = unsafe { centred_dot_and_squared_distance_with::<Lanes>(x, y, 1e-4, -2e-4) };
            assert_eq!(centred_dot_and_squared_distance(x, y, 1e-4, -2e-4), scalar, "n={n}");
        }
    }

    #[test]
    fn reductions_match_naive_sums() {
        let x: Vec<f64> = (0..37).map(|i| (i as f64 * 0.37).sin()).collect();
        let y: Vec<f64> = (0..37).map(|i| (i as f64 * 0.11).cos()).collect();
        let naive_dot: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        let naive_dist: f64 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        let (dot, dist) = centred_dot_and_squared_distance(&x, &y, 0.0, 0.0);
        let (pdot, pdist) = unsafe { centred_dot_and_squared_distance_with::<Lanes>(&x, &y, 0.3, -0.2) };
        let (vdot, vdist) = centred_dot_and_squared_distance(&x, &y, 0.3, -0.2);
        assert!((pdot - vdot).abs() < 1e-12 && (pdist - vdist).abs() < 1e-12);
        assert!((dot - naive_dot).abs() < 1e-12);
        assert!((dist - naive_dist).abs() < 1e-12);
        assert!((sum(&x) - x.iter().sum::<f64>()).abs() < 1e-12);
        let mut z = x.clone();
        let total = subtract_and_sum(&mut z, &y);
        assert!((total - (x.iter().sum::<f64>() - y.iter().sum::<f64>())).abs() < 1e-12);
        assert_eq!(z[36], x[36] - y[36]);
        let w: Vec<f64> = (0..37).map(|i| i as f64 * 1e-3).collect();
        let sums = pair_delta_sums(&x, &y, &w);
        let (a, b): (Vec<f64>, Vec<f64>) = x.iter().zip(&y).zip(&w).map(|((x, y), w)| (x - w, y - w)).unzip();
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

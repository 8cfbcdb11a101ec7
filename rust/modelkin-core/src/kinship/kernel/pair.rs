//! The two-model kernel: for the deltas a = x − z and b = y − z of one chunk, the six raw sums
//! [Σa, Σb, Σa², Σb², Σab, Σ(a − b)²], read straight from the stored (mapped) bytes of x, y and z
//! in one sweep that never writes the deltas anywhere. It is what bounds `modelkin kinship`, so it
//! must keep up with the page cache: no staging copy (unaligned loads of the mapped words), and
//! enough independent partial sums that the adds and fused multiply-adds never wait on each other.
//!
//! # The summation order
//! The order is fixed by the element's position alone, never by the CPU level, so AVX-512, AVX2,
//! NEON and the scalar fallback give the same bits:
//! - every statistic keeps [`PAIR_LANES`] (32) partial sums, in four groups of [`LANES`] (8);
//! - the chunk is cut into runs of [`RUN`] elements; run r feeds group r mod 4, and its element e
//!   feeds lane e mod 8 of the group: element i goes to lane 8·((i / RUN) mod 4) + i mod 8;
//! - each lane adds its elements in increasing i, from +0.0: Σa and Σb with a plain add, the
//!   products with a fused multiply-add (a·a + s rounded once), d = a − b;
//! - the 32 lanes are then combined by a fixed pairwise tree: lane l += lane l + w for
//!   w = 16, 8, 4, 2, 1.
//!
//! Lanes are independent, so any level may visit them in any grouping as long as each lane sees
//! its own elements in order: AVX-512 holds all four groups (four registers per statistic) and
//! sweeps four runs side by side; AVX2 sweeps run by run, lanes 0–3 of the run's group and then
//! lanes 4–7 (one register per statistic: with the step's temporaries, what fits its sixteen);
//! the scalar fallback runs the same code on plain arrays.

use crate::io::dtype::FloatDtype;
use crate::kinship::simd::{Accumulator, Bf16, Lanes, Widen, F16, F32, F64, F8E4M3, F8E5M2, LANES};

/// Partial sums per statistic.
pub const PAIR_LANES: usize = 32;

/// Groups of [`LANES`] partial sums per statistic.
const GROUPS: usize = PAIR_LANES / LANES;

/// Elements per run. Four runs side by side (AVX-512) stay within a few cache lines of each
/// other, so the reads still stream; one run (AVX2) is long enough that loading and storing its
/// group's sums around it costs little.
const RUN: usize = 128;

/// Statistics per pair: Σa, Σb, Σa², Σb², Σab, Σ(a − b)².
const STATS: usize = 6;

/// Every partial sum: `[group][statistic][lane]`.
type PairLanes = [[Lanes; STATS]; GROUPS];

/// A storage format every level of the kernel widens.
#[cfg(target_arch = "x86_64")]
trait Format:
    Widen<Lanes> + Widen<crate::kinship::simd::x86::Avx512> + Widen<crate::kinship::simd::x86::Ymm>
{
}
#[cfg(target_arch = "x86_64")]
impl<F> Format for F where
    F: Widen<Lanes> + Widen<crate::kinship::simd::x86::Avx512> + Widen<crate::kinship::simd::x86::Ymm>
{
}

/// A storage format every level of the kernel widens.
#[cfg(not(target_arch = "x86_64"))]
trait Format: Widen<Lanes> {}
#[cfg(not(target_arch = "x86_64"))]
impl<F: Widen<Lanes>> Format for F {}

/// [Σa, Σb, Σa², Σb², Σab, Σ(a − b)²] for a = x − z and b = y − z over `x`, `y` and `z`, three
/// runs of elements stored as `dtype` (little-endian bytes, any alignment, equal lengths).
pub fn pair_delta_sums_stored(dtype: FloatDtype, x: &[u8], y: &[u8], z: &[u8]) -> [f64; 6] {
    let n = z.len() / dtype.size();
    assert!(x.len() == z.len() && y.len() == z.len() && z.len() == n * dtype.size());
    let sources = [x.as_ptr(), y.as_ptr(), z.as_ptr()];
    // SAFETY: each source holds n elements of the format (asserted above).
    unsafe {
        match dtype {
            FloatDtype::BF16 => pair_sums::<Bf16>(sources, n),
            FloatDtype::F16 => pair_sums::<F16>(sources, n),
            FloatDtype::F32 => pair_sums::<F32>(sources, n),
            FloatDtype::F64 => pair_sums::<F64>(sources, n),
            FloatDtype::F8E4M3 => pair_sums::<F8E4M3>(sources, n),
            FloatDtype::F8E5M2 => pair_sums::<F8E5M2>(sources, n),
        }
    }
}

/// [`pair_delta_sums_stored`] over values already widened to f64 (the chunks of a family whose
/// models differ in dtype), in the same order.
pub fn pair_delta_sums(x: &[f64], y: &[f64], z: &[f64]) -> [f64; 6] {
    pair_delta_sums_stored(
        FloatDtype::F64,
        bytemuck::cast_slice(x),
        bytemuck::cast_slice(y),
        bytemuck::cast_slice(z),
    )
}

/// The dispatch: the widest level the CPU has.
///
/// # Safety
/// Each of `sources` must be valid for reading `n · F::SIZE` bytes.
unsafe fn pair_sums<F: Format>(sources: [*const u8; 3], n: usize) -> [f64; 6] {
    let mut lanes: PairLanes = [[[0.0; LANES]; STATS]; GROUPS];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: the CPU has the features; the caller guarantees the bytes.
            unsafe { x86::sums_avx512::<F>(sources, n, &mut lanes) };
            return combine(&lanes, F::SCALE);
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: as above.
            unsafe { x86::sums_avx2::<F>(sources, n, &mut lanes) };
            return combine(&lanes, F::SCALE);
        }
    }
    // SAFETY: plain arrays need no CPU feature; the caller guarantees the bytes.
    unsafe { sweep::<Lanes, F, 1>(sources, n, &mut lanes) };
    combine(&lanes, F::SCALE)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{sweep, Format, PairLanes, GROUPS};
    use crate::kinship::simd::x86::{Avx512, Ymm};

    /// Four groups held: 24 accumulators, one register per statistic and group, and the step's
    /// temporaries fit AVX-512's 32 registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2, FMA and F16C; the sources as [`super::pair_sums`].
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn sums_avx512<F: Format>(sources: [*const u8; 3], n: usize, lanes: &mut PairLanes) {
        // SAFETY: the caller's guarantees.
        unsafe { sweep::<Avx512, F, GROUPS>(sources, n, lanes) }
    }

    /// One group held, half of it at a time: six accumulators and the step's temporaries fit
    /// AVX2's 16 registers with room to spare.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; the sources as [`super::pair_sums`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn sums_avx2<F: Format>(sources: [*const u8; 3], n: usize, lanes: &mut PairLanes) {
        // SAFETY: the caller's guarantees.
        unsafe { sweep::<Ymm, F, 1>(sources, n, lanes) }
    }
}

/// One register of partial sums per statistic: lanes `part · A::WIDTH ..` of one group.
type Part<A> = [A; STATS];

/// Adds `n` elements from `sources` (x, y, z) to `lanes` in the order of the module docs. With
/// `HELD` = 4 (and `A` a whole group wide), the four groups' registers are held together and four
/// runs swept side by side; with `HELD` = 1, run by run, one part (`A::WIDTH` lanes of the group)
/// at a time: the run's bytes, read again for each part, are still in L1, and six registers of
/// sums leave room for the step's temporaries.
///
/// # Safety
/// The CPU must have `A`'s features (and F16C on x86); each source must be valid for reading
/// `n · F::SIZE` bytes.
#[inline(always)]
unsafe fn sweep<A: Accumulator, F: Widen<A>, const HELD: usize>(
    sources: [*const u8; 3],
    n: usize,
    lanes: &mut PairLanes,
) {
    const { assert!(LANES.is_multiple_of(A::WIDTH) && (HELD == 1 || (HELD == GROUPS && A::WIDTH == LANES))) };
    let block = GROUPS * RUN;
    let mut start = 0;
    if HELD == GROUPS {
        // SAFETY (whole block): the caller guarantees the features; every step reads the LANES
        // elements from `at`, and at + LANES <= whole <= n.
        unsafe {
            let mut acc: [Part<A>; GROUPS] = std::array::from_fn(|g| load::<A>(&lanes[g], 0));
            let whole = n / block * block;
            while start < whole {
                for e in (0..RUN).step_by(LANES) {
                    for (g, acc) in acc.iter_mut().enumerate() {
                        step::<A, F>(acc, sources, start + g * RUN + e, 0);
                    }
                }
                start += block;
            }
            for (g, acc) in acc.iter().enumerate() {
                store::<A>(acc, &mut lanes[g], 0);
            }
        }
    }
    // Run by run: all of it with one group held, else the runs after the last whole block.
    while start < n {
        let len = RUN.min(n - start);
        let group = &mut lanes[start / RUN % GROUPS];
        let whole = len / LANES * LANES;
        for part in 0..LANES / A::WIDTH {
            // SAFETY: as above, with at + LANES <= start + whole <= n.
            unsafe {
                let mut acc = load::<A>(group, part);
                for e in (0..whole).step_by(LANES) {
                    step::<A, F>(&mut acc, sources, start + e, part);
                }
                store::<A>(&acc, group, part);
            }
        }
        // The last few elements, one at a time, with the same operations a lane does.
        for i in start + whole..start + len {
            let l = i % LANES;
            // SAFETY: i < n.
            let [x, y, z] = sources.map(|p| unsafe { F::scalar(p.add(i * F::SIZE)) });
            let (a, b) = (x - z, y - z);
            let d = a - b;
            group[0][l] += a;
            group[1][l] += b;
            group[2][l] = a.mul_add(a, group[2][l]);
            group[3][l] = b.mul_add(b, group[3][l]);
            group[4][l] = a.mul_add(b, group[4][l]);
            group[5][l] = d.mul_add(d, group[5][l]);
        }
        start += len;
    }
}

/// One part of one group's sums in registers.
///
/// # Safety
/// The CPU must have `A`'s features, and (part + 1) · `A::WIDTH` <= [`LANES`].
#[inline(always)]
unsafe fn load<A: Accumulator>(group: &[Lanes; STATS], part: usize) -> Part<A> {
    // SAFETY: the caller guarantees the features and that the part lies within the lanes.
    std::array::from_fn(|s| unsafe { A::load(group[s].as_ptr().add(part * A::WIDTH)) })
}

/// Stores what [`load`] loaded.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn store<A: Accumulator>(acc: &Part<A>, group: &mut [Lanes; STATS], part: usize) {
    for (sum, lanes) in acc.iter().zip(group.iter_mut()) {
        // SAFETY: as in `load`.
        unsafe { sum.store(lanes.as_mut_ptr().add(part * A::WIDTH)) };
    }
}

/// Adds one part of the group of [`LANES`] elements from element `at` of each source.
///
/// # Safety
/// The CPU must have `A`'s features; the sources must hold `at + LANES` elements.
#[inline(always)]
unsafe fn step<A: Accumulator, F: Widen<A>>(
    acc: &mut Part<A>,
    [x, y, z]: [*const u8; 3],
    at: usize,
    part: usize,
) {
    let offset = at * F::SIZE;
    // SAFETY: the caller's guarantees: the LANES elements from `at` are there.
    unsafe {
        // Made in this order, a register's worth of temporaries at a time stays live.
        let z = F::widen(z.add(offset), part);
        let a = F::widen(x.add(offset), part).sub(z);
        let b = F::widen(y.add(offset), part).sub(z);
        let d = a.sub(b);
        acc[0] = acc[0].add(a);
        acc[1] = acc[1].add(b);
        acc[2] = acc[2].add_product(a, a);
        acc[3] = acc[3].add_product(b, b);
        acc[4] = acc[4].add_product(a, b);
        acc[5] = acc[5].add_product(d, d);
    }
}

/// The fixed tree over each statistic's 32 lanes, and the format's scale taken off (exactly: a
/// power of two, see `Stored::SCALE`).
fn combine(lanes: &PairLanes, scale: f64) -> [f64; 6] {
    let sums: [f64; STATS] = std::array::from_fn(|s| {
        let mut v: [f64; PAIR_LANES] = std::array::from_fn(|l| lanes[l / LANES][s][l % LANES]);
        let mut width = PAIR_LANES / 2;
        while width > 0 {
            for l in 0..width {
                v[l] += v[l + width];
            }
            width /= 2;
        }
        v[0]
    });
    std::array::from_fn(|s| if s < 2 { sums[s] / scale } else { sums[s] / (scale * scale) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no crate.
    struct Bits(u64);

    impl Bits {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// A value like a weight: ±(0.001..1)·2^(−8..2), now and then a zero or a subnormal-ish one.
        fn weight(&mut self) -> f32 {
            let r = self.next();
            let magnitude = ((r >> 11) % 1000 + 1) as f32 / 1000.0 * 2f32.powi((r >> 40) as i32 % 11 - 8);
            let value = match r % 61 {
                0 => 0.0,
                1 => 1e-6,
                _ => magnitude,
            };
            if r >> 63 == 1 {
                -value
            } else {
                value
            }
        }
    }

    /// `n` values stored as `dtype`: a base and two models near it.
    fn family(dtype: FloatDtype, n: usize, seed: u64) -> [Vec<u8>; 3] {
        use crate::io::encode::{encode, OutDtype};
        let mut bits = Bits(seed | 1);
        let base: Vec<f32> = (0..n).map(|_| bits.weight()).collect();
        let models: [Vec<f64>; 3] = std::array::from_fn(|m| {
            base.iter().map(|&z| f64::from(if m == 2 { z } else { z + 0.05 * bits.weight() })).collect()
        });
        models.map(|values| match dtype {
            FloatDtype::F8E4M3 | FloatDtype::F8E5M2 => {
                // Every byte but NaN (and E5M2's infinities): the whole format is exercised.
                (0..n)
                    .map(|_| loop {
                        let b = bits.next() as u8;
                        if !crate::io::dtype::f8_value(dtype, b).is_nan()
                            && crate::io::dtype::f8_value(dtype, b).is_finite()
                        {
                            break b;
                        }
                    })
                    .collect()
            }
            _ => {
                let out_dtype = match dtype {
                    FloatDtype::BF16 => OutDtype::BF16,
                    FloatDtype::F16 => OutDtype::F16,
                    FloatDtype::F32 => OutDtype::F32,
                    _ => OutDtype::F64,
                };
                let mut out = Vec::new();
                encode(out_dtype, &values, &mut out);
                out
            }
        })
    }

    /// The order of the module docs, written out directly.
    fn reference(dtype: FloatDtype, [x, y, z]: &[Vec<u8>; 3]) -> [f64; 6] {
        let size = dtype.size();
        let n = z.len() / size;
        let value = |bytes: &[u8], i: usize| {
            let mut out = [0.0];
            crate::io::dtype::decode(dtype, &bytes[i * size..(i + 1) * size], &mut out);
            out[0]
        };
        let mut lanes = [[0.0f64; PAIR_LANES]; STATS];
        for i in 0..n {
            let l = LANES * (i / RUN % GROUPS) + i % LANES;
            let (a, b) = (value(x, i) - value(z, i), value(y, i) - value(z, i));
            let d = a - b;
            lanes[0][l] += a;
            lanes[1][l] += b;
            lanes[2][l] = a.mul_add(a, lanes[2][l]);
            lanes[3][l] = b.mul_add(b, lanes[3][l]);
            lanes[4][l] = a.mul_add(b, lanes[4][l]);
            lanes[5][l] = d.mul_add(d, lanes[5][l]);
        }
        lanes.map(|mut v| {
            for width in [16, 8, 4, 2, 1] {
                for l in 0..width {
                    v[l] += v[l + width];
                }
            }
            v[0]
        })
    }

    const DTYPES: [FloatDtype; 6] = [
        FloatDtype::BF16,
        FloatDtype::F16,
        FloatDtype::F32,
        FloatDtype::F64,
        FloatDtype::F8E4M3,
        FloatDtype::F8E5M2,
    ];

    /// Lengths around every boundary: a vector, a run, a block of four runs, a chunk.
    const LENGTHS: [usize; 12] = [0, 1, 7, 8, 13, 127, 128, 131, 511, 512, 1000, 16384 + 517];

    /// The dispatched kernel (the widest level this CPU has), the scalar fallback, and the
    /// four-groups-held sweep AVX-512 runs (emulated with plain arrays) all give the reference's
    /// bits.
    #[test]
    fn every_level_sums_in_the_same_order() {
        for dtype in DTYPES {
            for (t, n) in LENGTHS.into_iter().enumerate() {
                let sources = family(dtype, n, 0x9E37_79B9 + t as u64);
                let expected = reference(dtype, &sources);
                let [x, y, z] = &sources;
                assert_eq!(pair_delta_sums_stored(dtype, x, y, z), expected, "{dtype:?} n={n} dispatched");
                let pointers = [x.as_ptr(), y.as_ptr(), z.as_ptr()];
                macro_rules! emulated {
                    ($f:ty, $held:literal) => {{
                        let mut lanes: PairLanes = [[[0.0; LANES]; STATS]; GROUPS];
                        // SAFETY: plain arrays need no CPU feature; each source holds n elements.
                        unsafe { sweep::<Lanes, $f, $held>(pointers, n, &mut lanes) };
                        combine(&lanes, <$f as crate::kinship::simd::Stored>::SCALE)
                    }};
                }
                macro_rules! by_format {
                    ($held:literal) => {
                        match dtype {
                            FloatDtype::BF16 => emulated!(Bf16, $held),
                            FloatDtype::F16 => emulated!(F16, $held),
                            FloatDtype::F32 => emulated!(F32, $held),
                            FloatDtype::F64 => emulated!(F64, $held),
                            FloatDtype::F8E4M3 => emulated!(F8E4M3, $held),
                            FloatDtype::F8E5M2 => emulated!(F8E5M2, $held),
                        }
                    };
                }
                assert_eq!(by_format!(1), expected, "{dtype:?} n={n} scalar");
                assert_eq!(by_format!(4), expected, "{dtype:?} n={n} four groups held");
            }
        }
    }

    /// The sums agree with a plain float64 loop to rounding, for every format.
    #[test]
    fn sums_match_a_float64_loop() {
        for dtype in DTYPES {
            let n = 3 * 16384 + 77;
            let sources = family(dtype, n, 7);
            let [x, y, z] = &sources;
            let mut wide: [Vec<f64>; 3] = std::array::from_fn(|_| vec![0.0; n]);
            for (w, s) in wide.iter_mut().zip(&sources) {
                crate::io::dtype::decode(dtype, s, w);
            }
            let (mut plain, mut scale) = ([0.0f64; 6], [0.0f64; 6]);
            for ((x, y), z) in wide[0].iter().zip(&wide[1]).zip(&wide[2]) {
                let (a, b) = (x - z, y - z);
                let terms = [a, b, a * a, b * b, a * b, (a - b) * (a - b)];
                for s in 0..6 {
                    plain[s] += terms[s];
                    scale[s] += terms[s].abs();
                }
            }
            let sums = pair_delta_sums_stored(dtype, x, y, z);
            for s in 0..6 {
                assert!((sums[s] - plain[s]).abs() <= 1e-12 * scale[s], "{dtype:?} sum {s}");
            }
            // Widened first, the values take the same lanes, so the sums are the same bits.
            assert_eq!(pair_delta_sums(&wide[0], &wide[1], &wide[2]), sums, "{dtype:?} from f64");
        }
    }

    /// A NaN in any source reaches the sums, on every level and format.
    #[test]
    fn nan_propagates() {
        for dtype in DTYPES {
            let n = 1000;
            for source in 0..3 {
                let mut sources = family(dtype, n, 11);
                let size = dtype.size();
                let nan: Vec<u8> = match dtype {
                    FloatDtype::BF16 => vec![0xC0, 0x7F],
                    FloatDtype::F16 => vec![0x00, 0x7E],
                    FloatDtype::F32 => f32::NAN.to_le_bytes().to_vec(),
                    FloatDtype::F64 => f64::NAN.to_le_bytes().to_vec(),
                    FloatDtype::F8E4M3 => vec![0x7F],
                    FloatDtype::F8E5M2 => vec![0x7E],
                };
                let at = 517 * size;
                sources[source][at..at + size].copy_from_slice(&nan);
                let [x, y, z] = &sources;
                let sums = pair_delta_sums_stored(dtype, x, y, z);
                assert!(sums.iter().any(|s| s.is_nan()), "{dtype:?} source {source}");
            }
        }
    }
}

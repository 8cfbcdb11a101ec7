//! The all-pairs sweep fused with decoding, for up to [`MAX_MODELS`] fine-tunes stored as bf16,
//! f16 or f32: each stored word is widened in registers, turned into a delta and multiplied
//! against the others before it is ever written out.
//!
//! Decoding costs as much as the products: a separate decode pass stores k rows of f64 only for
//! the tiles to load them back. Here the first `R0` rows' products ride along with the decode
//! (their deltas are already in registers), and only the other rows are stored, for a second
//! sweep over L1 that also sums them (summed during the decode, they spilled its registers).
//! Each product's lanes add in the tiles' order, so the products are theirs bit for bit. An 8×8
//! matrix pass runs ~1.4x faster than decode-then-tiles on AVX-512. AVX2 has half the registers
//! of half the width: its sweep (`avx2.rs`) decodes each step in two halves and leaves the
//! stored rows to a second sweep; a 4×4 matrix pass runs ~2x faster than decode-then-tiles there.

use crate::io::dtype::FloatDtype;
use crate::kinship::simd::LANES;

use super::Gram;

/// The most fine-tunes the fused sweep takes; more go through the tiles.
pub(crate) const MAX_MODELS: usize = 8;

/// Elements per step of the second sweep: the stored rows of a step stay in L1.
pub(crate) const STEP: usize = 256;

/// The stored format of every source of a block of k fine-tunes, when the fused sweep takes it.
pub(crate) fn fused_format(k: usize, dtypes: impl IntoIterator<Item = FloatDtype>) -> Option<FloatDtype> {
    if k > MAX_MODELS {
        return None;
    }
    let mut dtypes = dtypes.into_iter();
    let first = dtypes.next()?;
    let widened = matches!(first, FloatDtype::BF16 | FloatDtype::F16 | FloatDtype::F32);
    (widened && dtypes.all(|d| d == first) && level().is_some()).then_some(first)
}

/// The instruction sets a fused sweep is written for.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
enum Level {
    Avx512,
    Avx2,
}

/// The widest [`Level`] this CPU has, if any.
fn level() -> Option<Level> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx2") && has!("f16c") {
            return Some(Level::Avx512);
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            return Some(Level::Avx2);
        }
    }
    None
}

impl Gram {
    /// Adds the sums and products of the first `count / LANES * LANES` elements of a run and
    /// returns how many elements that is (0 when k is above [`MAX_MODELS`] or the CPU has neither
    /// AVX-512 nor AVX2); the caller decodes the rest. `sources` holds each source's stored bytes from the
    /// run's first element, the base first, all in `format` (from [`fused_format`]); `scratch`
    /// holds (k − 1)·[`STEP`] + [`LANES`] values.
    pub(crate) fn add_stored(
        &mut self,
        format: FloatDtype,
        sources: &[&[u8]],
        count: usize,
        scratch: &mut [f64],
    ) -> usize {
        let k = self.k;
        let whole = count / LANES * LANES;
        assert!(sources.len() == k + 1 && scratch.len() >= k.saturating_sub(1) * STEP + LANES);
        assert!(sources.iter().all(|s| s.len() >= whole * format.size()));
        #[cfg(target_arch = "x86_64")]
        {
            let level = match level() {
                Some(level) if k <= MAX_MODELS && whole > 0 => level,
                _ => return 0,
            };
            let mut pointers = [std::ptr::null::<u8>(); MAX_MODELS + 1];
            for (p, s) in pointers.iter_mut().zip(sources) {
                *p = s.as_ptr();
            }
            let (sums, products) = (&mut self.sums, &mut self.products);
            // SAFETY: the CPU has the level's features, and the asserts bound every access.
            unsafe {
                match level {
                    Level::Avx512 => x86::dispatch(format, k, &pointers, whole, scratch, sums, products),
                    Level::Avx2 => avx2::dispatch(format, k, &pointers, whole, scratch, sums, products),
                }
            };
            whole
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (format, sources, scratch);
            0
        }
    }
}

/// `sweep::<W, K, R0>(args…)` for a block's stored format (bf16, f16, f32: the types given in
/// that order) and its k, with the R0 each k takes on the calling level: the one dispatch table
/// of every level's fused sweep.
macro_rules! sweep_for {
    ($format:expr, $k:expr, $sweep:ident::<[$bf16:ty, $f16:ty, $f32:ty]>, $r0:tt, $args:tt) => {
        match $format {
            FloatDtype::BF16 => sweep_for!(@k $k, $sweep, $bf16, $r0, $args),
            FloatDtype::F16 => sweep_for!(@k $k, $sweep, $f16, $r0, $args),
            FloatDtype::F32 => sweep_for!(@k $k, $sweep, $f32, $r0, $args),
            _ => unreachable!("fused_format admits bf16, f16 and f32 only"),
        }
    };
    (@k $k:expr, $sweep:ident, $w:ty, [$($kk:literal => $r0:literal),*], $args:tt) => {
        match $k {
            $($kk => $sweep::<$w, $kk, $r0> $args,)*
            _ => unreachable!("k is at most MAX_MODELS"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, MAX_MODELS, STEP};
    use crate::io::dtype::FloatDtype;
    use crate::kinship::simd::Lanes;

    /// Eight stored values widened exactly to f64.
    trait Widen {
        const SIZE: usize;
        /// # Safety
        /// `p` must be valid for reading `8 · SIZE` bytes; the CPU must have AVX-512F and F16C.
        unsafe fn widen(p: *const u8) -> __m512d;
    }

    struct Bf16;
    struct F16;
    struct F32;

    impl Widen for Bf16 {
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn widen(p: *const u8) -> __m512d {
            // SAFETY: the caller guarantees 16 readable bytes and the features.
            unsafe {
                // Both halves get all eight words (a broadcast load costs no shuffle), then one
                // byte shuffle puts word i in the upper half of f32 lane i: the bits of its value.
                // Zero-extending and shifting instead costs one more vector operation.
                let words = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
                let place = _mm256_setr_epi8(
                    -128, -128, 0, 1, -128, -128, 2, 3, -128, -128, 4, 5, -128, -128, 6, 7, -128, -128, 8, 9,
                    -128, -128, 10, 11, -128, -128, 12, 13, -128, -128, 14, 15,
                );
                _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_shuffle_epi8(words, place)))
            }
        }
    }

    impl Widen for F16 {
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn widen(p: *const u8) -> __m512d {
            // SAFETY: as above.
            unsafe { _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(p.cast()))) }
        }
    }

    impl Widen for F32 {
        const SIZE: usize = 4;
        #[inline(always)]
        unsafe fn widen(p: *const u8) -> __m512d {
            // SAFETY: the caller guarantees 32 readable bytes and the features.
            unsafe { _mm512_cvtps_pd(_mm256_loadu_ps(p.cast())) }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F/BW/VL, AVX2 and F16C; the arguments must satisfy the asserts
    /// of `Gram::add_stored`, each of the first k + 1 `sources` pointing at `len` stored values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(super) unsafe fn dispatch(
        format: FloatDtype,
        k: usize,
        sources: &[*const u8; MAX_MODELS + 1],
        len: usize,
        scratch: &mut [f64],
        sums: &mut [Lanes],
        products: &mut [Lanes],
    ) {
        // R0 rows ride along with the decode: as many as keep their accumulators and sums, the
        // base and the deltas within AVX-512's 32 registers (R0 = 4 of 8 spills).
        // SAFETY: the caller's guarantees, passed on.
        unsafe {
            sweep_for!(
                format,
                k,
                sweep::<[Bf16, F16, F32]>,
                [1 => 1, 2 => 2, 3 => 3, 4 => 4, 5 => 5, 6 => 3, 7 => 3, 8 => 3],
                (sources, len, scratch, sums, products)
            )
        }
    }

    /// Every pair (i, j ≥ i) of K rows, a [`STEP`] at a time (the whole run when no row is
    /// stored): rows below R0 during the decode, the rest from scratch.
    ///
    /// # Safety
    /// As [`dispatch`].
    #[inline(always)]
    unsafe fn sweep<W: Widen, const K: usize, const R0: usize>(
        sources: &[*const u8; MAX_MODELS + 1],
        len: usize,
        scratch: &mut [f64],
        sums: &mut [Lanes],
        products: &mut [Lanes],
    ) {
        let step = if R0 == K { len } else { STEP };
        let mut first = 0;
        while first < len {
            let from = sources.map(|p| p.wrapping_add(first * W::SIZE));
            let count = step.min(len - first);
            // SAFETY: the caller's guarantees; the step lies within the run.
            unsafe { sweep_step::<W, K, R0>(&from, count, scratch, sums, products) };
            first += count;
        }
    }

    /// One step of [`sweep`] over `len` elements from `src`.
    ///
    /// # Safety
    /// As [`dispatch`], with `len` ≤ [`STEP`] when R0 < K.
    // Kept out of line: inlined into the loop over steps, its registers spill.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn sweep_step<W: Widen, const K: usize, const R0: usize>(
        src: &[*const u8; MAX_MODELS + 1],
        len: usize,
        scratch: &mut [f64],
        sums: &mut [Lanes],
        products: &mut [Lanes],
    ) {
        // Rows start on a cache line, so no vector store or load of them spans two lines.
        let aligned = scratch.as_ptr().align_offset(64);
        let (stride, scratch) = (STEP, scratch[aligned..].as_mut_ptr());
        // SAFETY (whole body): every source holds `len` stored values, scratch (K − R0)·STEP
        // f64, `sums` K and `products` K·K lane arrays; offsets stay below those bounds.
        unsafe {
            let zero = _mm512_setzero_pd();
            // Indexed like `products` (i·K + j); only the pairs of the rows in hand are used.
            let (mut s, mut acc): (_, Registers) = ([zero; MAX_MODELS], [zero; MAX_MODELS * MAX_MODELS]);
            load_rows::<K>(0..R0, sums, products, &mut s, &mut acc);
            let mut e = 0;
            while e < len {
                let base = W::widen(src[0].add(e * W::SIZE));
                let mut d = [zero; MAX_MODELS];
                // Each delta meets the first rows as soon as it is made, so only those stay live:
                // made all first, the deltas no longer fit the registers beside the accumulators.
                for j in 0..K {
                    d[j] = _mm512_sub_pd(W::widen(src[j + 1].add(e * W::SIZE)), base);
                    if j >= R0 {
                        _mm512_storeu_pd(scratch.add((j - R0) * stride + e), d[j]);
                    } else {
                        s[j] = _mm512_add_pd(s[j], d[j]);
                    }
                    for i in 0..R0.min(j + 1) {
                        acc[i * K + j] = _mm512_fmadd_pd(d[i], d[j], acc[i * K + j]);
                    }
                }
                e += LANES;
            }
            store_rows::<K>(0..R0, &s, &acc, sums, products);
            if R0 == K {
                return;
            }
            let (mut s, mut acc): (_, Registers) = ([zero; MAX_MODELS], [zero; MAX_MODELS * MAX_MODELS]);
            load_rows::<K>(R0..K, sums, products, &mut s, &mut acc);
            let mut e = 0;
            while e < len {
                let y: [__m512d; MAX_MODELS] = std::array::from_fn(|i| {
                    if (R0..K).contains(&i) {
                        _mm512_loadu_pd(scratch.add((i - R0) * stride + e))
                    } else {
                        zero
                    }
                });
                for i in R0..K {
                    s[i] = _mm512_add_pd(s[i], y[i]);
                    for j in i..K {
                        acc[i * K + j] = _mm512_fmadd_pd(y[i], y[j], acc[i * K + j]);
                    }
                }
                e += LANES;
            }
            store_rows::<K>(R0..K, &s, &acc, sums, products);
        }
    }

    type Registers = [__m512d; MAX_MODELS * MAX_MODELS];

    /// Loads the running sums of `rows` and their products with every later row.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `sums` holds K and `products` K·K lane arrays.
    #[inline(always)]
    unsafe fn load_rows<const K: usize>(
        rows: std::ops::Range<usize>,
        sums: &[Lanes],
        products: &[Lanes],
        s: &mut [__m512d; MAX_MODELS],
        acc: &mut Registers,
    ) {
        for i in rows {
            // SAFETY: each lane array holds LANES values; the caller guarantees the features.
            unsafe {
                s[i] = _mm512_loadu_pd(sums[i].as_ptr());
                for j in i..K {
                    acc[i * K + j] = _mm512_loadu_pd(products[i * K + j].as_ptr());
                }
            }
        }
    }

    /// Stores what [`load_rows`] loaded, once the rows' sweep has added to it.
    ///
    /// # Safety
    /// As [`load_rows`].
    #[inline(always)]
    unsafe fn store_rows<const K: usize>(
        rows: std::ops::Range<usize>,
        s: &[__m512d; MAX_MODELS],
        acc: &Registers,
        sums: &mut [Lanes],
        products: &mut [Lanes],
    ) {
        for i in rows {
            // SAFETY: as in load_rows.
            unsafe {
                _mm512_storeu_pd(sums[i].as_mut_ptr(), s[i]);
                for j in i..K {
                    _mm512_storeu_pd(products[i * K + j].as_mut_ptr(), acc[i * K + j]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(format: FloatDtype, values: &[f32]) -> Vec<u8> {
        use crate::io::encode::{encode, OutDtype};
        let dtype = match format {
            FloatDtype::BF16 => OutDtype::BF16,
            FloatDtype::F16 => OutDtype::F16,
            _ => OutDtype::F32,
        };
        let mut out = Vec::new();
        encode(dtype, &values.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), &mut out);
        out
    }

    /// The fused sweep gives the tiles' products and the lane-ordered sums bit for bit, special
    /// values included, for every k it takes; above MAX_MODELS it declines.
    #[test]
    fn fused_sweep_matches_decode_then_tiles() {
        for format in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32] {
            for k in 1..=MAX_MODELS + 1 {
                for count in [2 * STEP + 40, STEP, 203, 7] {
                    let stride = count + LANES;
                    let sources: Vec<Vec<u8>> = (0..=k)
                        .map(|s| {
                            // Zeros of both signs, subnormals and extremes among ordinary values.
                            let special = [0.0, -0.0, 1e-40, -3e-39, 6e4, -1e-5];
                            let values: Vec<f32> = (0..count)
                                .map(|e| match (e * 7 + s) % 13 {
                                    r if r < special.len() => special[r],
                                    _ => ((e * 37 + s * 101) % 61) as f32 / 64.0 - 0.4,
                                })
                                .collect();
                            stored(format, &values)
                        })
                        .collect();
                    let slices: Vec<&[u8]> = sources.iter().map(Vec::as_slice).collect();
                    let mut fused = Gram::new(k);
                    let mut scratch = vec![0.0; k * STEP];
                    let done = fused.add_stored(format, &slices, count, &mut scratch);
                    if level().is_none() || k > MAX_MODELS || count < LANES {
                        assert_eq!(done, 0);
                        continue;
                    }
                    assert_eq!(done, count / LANES * LANES);
                    let mut base = vec![0.0; done];
                    crate::io::dtype::decode(format, &sources[0][..done * format.size()], &mut base);
                    let mut rows = vec![0.0; k * stride];
                    let mut tiled = Gram::new(k);
                    for i in 0..k {
                        let row = &mut rows[i * stride..i * stride + done];
                        crate::io::dtype::decode(format, &sources[i + 1][..done * format.size()], row);
                        row.iter_mut().zip(&base).for_each(|(d, z)| *d -= z);
                    }
                    tiled.add_row_sums(&rows, stride, done);
                    tiled.add_products(&rows, stride, done);
                    let ((fs, fp), (ts, tp)) = (fused.totals(), tiled.totals());
                    assert_eq!((fs, fp), (ts, tp), "{format:?} k={k} count={count}");
                }
            }
        }
    }
}

//! The all-pairs sweep fused with decoding, for up to [`MAX_MODELS`] fine-tunes stored as bf16,
//! f16 or f32: each stored word is widened in registers, turned into a delta and multiplied
//! against the others before it is ever written out.
//!
//! Decoding costs as much as the products: a separate decode pass stores k rows of f64 only for
//! the tiles to load them back. Here the first `R0` rows' products ride along with the decode
//! (their deltas are already in registers), and only the other rows are stored, for a second
//! sweep over L1 that also sums them (summed during the decode, they spilled its registers).
//! Each product's lanes add in the tiles' order, so the products are theirs bit for bit. An 8×8
//! matrix pass runs ~1.4x faster than decode-then-tiles on AVX-512.

use crate::dtype::FloatDtype;

use super::{Gram, LANES};

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
    (widened && dtypes.all(|d| d == first) && cpu_has_fused()).then_some(first)
}

fn cpu_has_fused() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Gram {
    /// Adds the sums and products of the first `count / LANES * LANES` elements of a run and
    /// returns how many elements that is (0 when k is above [`MAX_MODELS`] or the CPU lacks
    /// AVX-512); the caller decodes the rest. `sources` holds each source's stored bytes from the
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
            if k > MAX_MODELS || whole == 0 || !cpu_has_fused() {
                return 0;
            }
            let mut pointers = [std::ptr::null::<u8>(); MAX_MODELS + 1];
            for (p, s) in pointers.iter_mut().zip(sources) {
                *p = s.as_ptr();
            }
            let mut block = x86::Block { sources: pointers, len: whole, scratch };
            // SAFETY: the CPU has the features (checked above), and the asserts bound every access.
            unsafe { x86::dispatch(format, k, &mut block, &mut self.sum_lanes, &mut self.products) };
            whole
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (format, sources, scratch);
            0
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, MAX_MODELS, STEP};
    use crate::dtype::FloatDtype;
    use crate::simd::Lanes;

    pub(super) struct Block<'a> {
        pub(super) sources: [*const u8; MAX_MODELS + 1],
        pub(super) len: usize,
        pub(super) scratch: &'a mut [f64],
    }

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
    /// The CPU must have AVX-512F/BW/VL, AVX2 and F16C; `block` must satisfy the asserts of
    /// `Gram::add_stored`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(super) unsafe fn dispatch(
        format: FloatDtype,
        k: usize,
        block: &mut Block,
        sums: &mut [Lanes],
        products: &mut [Lanes],
    ) {
        macro_rules! by_k {
            ($w:ty) => {
                // R0 rows ride along with the decode: as many as keep their accumulators and sums,
                // the base and the deltas within AVX-512's 32 registers (R0 = 4 of 8 spills).
                // SAFETY: the caller's guarantees, passed on.
                unsafe {
                    match k {
                        1 => sweep::<$w, 1, 1>(block, sums, products),
                        2 => sweep::<$w, 2, 2>(block, sums, products),
                        3 => sweep::<$w, 3, 3>(block, sums, products),
                        4 => sweep::<$w, 4, 4>(block, sums, products),
                        5 => sweep::<$w, 5, 5>(block, sums, products),
                        6 => sweep::<$w, 6, 3>(block, sums, products),
                        7 => sweep::<$w, 7, 3>(block, sums, products),
                        8 => sweep::<$w, 8, 3>(block, sums, products),
                        _ => unreachable!("k is at most MAX_MODELS"),
                    }
                }
            };
        }
        match format {
            FloatDtype::BF16 => by_k!(Bf16),
            FloatDtype::F16 => by_k!(F16),
            FloatDtype::F32 => by_k!(F32),
            _ => unreachable!("fused_format admits bf16, f16 and f32 only"),
        }
    }

    /// Every pair (i, j ≥ i) of K rows, a [`STEP`] at a time (the whole run when no row is
    /// stored): rows below R0 during the decode, the rest from scratch.
    ///
    /// # Safety
    /// As [`dispatch`].
    #[inline(always)]
    unsafe fn sweep<W: Widen, const K: usize, const R0: usize>(
        block: &mut Block,
        sums: &mut [Lanes],
        products: &mut [Lanes],
    ) {
        let step = if R0 == K { block.len } else { STEP };
        let mut first = 0;
        while first < block.len {
            let sources = block.sources.map(|p| p.wrapping_add(first * W::SIZE));
            let len = step.min(block.len - first);
            // SAFETY: the caller's guarantees; the step lies within the run.
            unsafe { sweep_step::<W, K, R0>(&sources, len, block.scratch, sums, products) };
            first += len;
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
        let slot = |i: usize, j: usize| i * K + j;
        // Rows start on a cache line, so no vector store or load of them spans two lines.
        let aligned = scratch.as_ptr().align_offset(64);
        let (stride, scratch) = (STEP, scratch[aligned..].as_mut_ptr());
        // SAFETY (whole body): every source holds `len` stored values, scratch (K − R0)·STEP
        // f64, `sums` K and `products` K·K lane arrays; offsets stay below those bounds.
        unsafe {
            let zero = _mm512_setzero_pd();
            let mut s = [zero; MAX_MODELS];
            let mut acc = [zero; MAX_MODELS * MAX_MODELS];
            for i in 0..R0 {
                s[i] = _mm512_loadu_pd(sums[i].as_ptr());
            }
            let mut q = 0;
            for i in 0..R0 {
                for j in i..K {
                    acc[q] = _mm512_loadu_pd(products[slot(i, j)].as_ptr());
                    q += 1;
                }
            }
            // Pair (i < R0, j ≥ i)'s accumulator, in the order of the loads above.
            let index = |i: usize, j: usize| i * K - i * (i + 1) / 2 + j;
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
                        acc[index(i, j)] = _mm512_fmadd_pd(d[i], d[j], acc[index(i, j)]);
                    }
                }
                e += LANES;
            }
            for i in 0..R0 {
                _mm512_storeu_pd(sums[i].as_mut_ptr(), s[i]);
            }
            let mut q = 0;
            for i in 0..R0 {
                for j in i..K {
                    _mm512_storeu_pd(products[slot(i, j)].as_mut_ptr(), acc[q]);
                    q += 1;
                }
            }
            if R0 == K {
                return;
            }
            let (mut s, mut acc) = ([zero; MAX_MODELS], [zero; MAX_MODELS * MAX_MODELS]);
            let mut q = 0;
            for i in R0..K {
                for j in i..K {
                    acc[q] = _mm512_loadu_pd(products[slot(i, j)].as_ptr());
                    q += 1;
                }
            }
            for i in R0..K {
                s[i] = _mm512_loadu_pd(sums[i].as_ptr());
            }
            let mut e = 0;
            while e < len {
                let y: [__m512d; MAX_MODELS] = std::array::from_fn(|r| {
                    if r < K - R0 {
                        _mm512_loadu_pd(scratch.add(r * stride + e))
                    } else {
                        zero
                    }
                });
                let mut q = 0;
                for i in 0..K - R0 {
                    s[R0 + i] = _mm512_add_pd(s[R0 + i], y[i]);
                    for j in i..K - R0 {
                        acc[q] = _mm512_fmadd_pd(y[i], y[j], acc[q]);
                        q += 1;
                    }
                }
                e += LANES;
            }
            for i in R0..K {
                _mm512_storeu_pd(sums[i].as_mut_ptr(), s[i]);
            }
            let mut q = 0;
            for i in R0..K {
                for j in i..K {
                    _mm512_storeu_pd(products[slot(i, j)].as_mut_ptr(), acc[q]);
                    q += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Lanes;

    fn stored(format: FloatDtype, values: &[f32]) -> Vec<u8> {
        match format {
            FloatDtype::BF16 => {
                values.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect()
            }
            FloatDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
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
                    if !cpu_has_fused() || k > MAX_MODELS || count < LANES {
                        assert_eq!(done, 0);
                        continue;
                    }
                    assert_eq!(done, count / LANES * LANES);
                    let mut base = vec![0.0; done];
                    crate::dtype::decode(format, &sources[0][..done * format.size()], &mut base);
                    let mut rows = vec![0.0; k * stride];
                    let mut tiled = Gram::new(k);
                    for i in 0..k {
                        let row = &mut rows[i * stride..i * stride + done];
                        crate::dtype::decode(format, &sources[i + 1][..done * format.size()], row);
                        row.iter_mut().zip(&base).for_each(|(d, z)| *d -= z);
                        // Lane l sums the elements l, l + 8, ... in turn, as the sweep does.
                        let lanes: Lanes = std::array::from_fn(|l| row.iter().skip(l).step_by(LANES).sum());
                        tiled.add_sum(i, lanes.iter().sum());
                    }
                    tiled.add_products(&rows, stride, done);
                    let ((fs, fp), (ts, tp)) = (fused.totals(), tiled.totals());
                    assert_eq!((fs, fp), (ts, tp), "{format:?} k={k} count={count}");
                }
            }
        }
    }
}

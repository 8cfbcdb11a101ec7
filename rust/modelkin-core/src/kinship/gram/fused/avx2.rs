//! The fused sweep on CPUs with AVX2 but not AVX-512: sixteen registers of four lanes each.
//!
//! An accumulator of eight lanes takes two AVX2 registers, and the k(k+1)/2 products of even
//! four fine-tunes would not fit. So each [`STEP`] is decoded twice, once per half of every
//! eight-element group (lanes 0–3, then 4–7, the second time from L1), with one register per
//! accumulator. Each lane still adds its elements in order, so the products and sums are the
//! tiles' bit for bit. The first `R0` rows' products ride along with the decode; the other rows
//! are stored and swept by the tiles, as the unfused path does.

use super::{MAX_MODELS, STEP};
use crate::io::dtype::FloatDtype;
use crate::kinship::gram::{add_lanes, add_products, Rows};
use crate::kinship::simd::x86::{Avx2, Ymm};
use crate::kinship::simd::{Accumulator, Bf16, Lanes, Widen, F16, F32, LANES};

/// # Safety
/// The CPU must have AVX2, FMA and F16C; the arguments must satisfy the asserts of
/// `Gram::add_stored`, each of the first k + 1 `sources` pointing at `len` stored values, `len` a
/// multiple of [`LANES`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dispatch(
    format: FloatDtype,
    k: usize,
    sources: &[*const u8; MAX_MODELS + 1],
    len: usize,
    scratch: &mut [f64],
    sums: &mut [Lanes],
    products: &mut [Lanes],
) {
    // R0 rows ride along with the decode: as many as keep their accumulators and sums, the base,
    // their deltas and the delta in hand within AVX2's 16 registers.
    // SAFETY: the caller's guarantees, passed on.
    unsafe {
        sweep_for!(
            format,
            k,
            sweep::<[Bf16, F16, F32]>,
            [1 => 1, 2 => 2, 3 => 3, 4 => 2, 5 => 2, 6 => 1, 7 => 1, 8 => 1],
            (sources, len, scratch, sums, products)
        )
    }
}

/// Every pair (i, j ≥ i) of K rows, a [`STEP`] at a time: rows below R0 during the decode, the
/// rest stored, then swept: two together with their sums (`stored_rows`), more by the tiles.
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn sweep<W: Widen<Ymm>, const K: usize, const R0: usize>(
    sources: &[*const u8; MAX_MODELS + 1],
    len: usize,
    scratch: &mut [f64],
    sums: &mut [Lanes],
    products: &mut [Lanes],
) {
    // Rows start on a cache line, so no vector store or load of them spans two lines.
    let aligned = scratch.as_ptr().align_offset(64);
    let scratch = &mut scratch[aligned..];
    let mut first = 0;
    while first < len {
        let from = sources.map(|p| p.wrapping_add(first * W::SIZE));
        let count = STEP.min(len - first);
        for part in 0..LANES / Ymm::WIDTH {
            // SAFETY: the caller's guarantees; the step lies within the run, and scratch holds
            // (K − R0)·STEP values from its aligned start.
            unsafe { decode_part::<W, K, R0>(&from, count, part, scratch.as_mut_ptr(), sums, products) };
        }
        let rows = Rows { data: scratch, stride: STEP, len: count, first: R0 };
        if K - R0 <= 2 {
            // SAFETY: the caller guarantees the features; the rows hold `count` values each.
            unsafe { stored_rows::<K, R0>(&rows, sums, products) };
        } else {
            for (i, sum) in sums.iter_mut().enumerate().take(K).skip(R0) {
                add_lanes(sum, rows.row(i));
            }
            add_products(&rows, K, products);
        }
        first += count;
    }
}

/// Lanes `part · 4 ..` of every group of one step of `len` elements from `src`: the first R0
/// rows' sums and products, and the other rows' deltas stored to `scratch` (row i at
/// (i − R0)·[`STEP`]).
///
/// # Safety
/// As [`dispatch`], with `len` ≤ [`STEP`] and `scratch` valid for (K − R0)·STEP values.
// Kept out of line: inlined into the loop over steps, its registers spill.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_part<W: Widen<Ymm>, const K: usize, const R0: usize>(
    src: &[*const u8; MAX_MODELS + 1],
    len: usize,
    part: usize,
    scratch: *mut f64,
    sums: &mut [Lanes],
    products: &mut [Lanes],
) {
    let lane = part * Ymm::WIDTH;
    // SAFETY (whole body): every source holds `len` stored values, `sums` K and `products` K·K
    // lane arrays of which lanes `lane..lane + 4` are read and written; scratch offsets stay
    // below (K − R0)·STEP.
    unsafe {
        let zero = Ymm::splat(0.0);
        // Indexed like `products` (i·K + j); only the pairs of the first R0 rows are used.
        let (mut s, mut acc) = ([zero; MAX_MODELS], [zero; MAX_MODELS * MAX_MODELS]);
        for i in 0..R0 {
            s[i] = Ymm::load(sums[i].as_ptr().add(lane));
            for j in i..K {
                acc[i * K + j] = Ymm::load(products[i * K + j].as_ptr().add(lane));
            }
        }
        let mut e = 0;
        while e < len {
            let base = W::widen(src[0].add(e * W::SIZE), part);
            let mut d = [zero; MAX_MODELS];
            // Each delta meets the first rows as soon as it is made, so only those stay live.
            for j in 0..K {
                d[j] = W::widen(src[j + 1].add(e * W::SIZE), part).sub(base);
                if j >= R0 {
                    d[j].store(scratch.add((j - R0) * STEP + e + lane));
                } else {
                    s[j] = s[j].add(d[j]);
                }
                for i in 0..R0.min(j + 1) {
                    acc[i * K + j] = acc[i * K + j].add_product(d[i], d[j]);
                }
            }
            e += LANES;
        }
        for i in 0..R0 {
            s[i].store(sums[i].as_mut_ptr().add(lane));
            for j in i..K {
                acc[i * K + j].store(products[i * K + j].as_mut_ptr().add(lane));
            }
        }
    }
}

/// The sums and products of the stored rows R0..K, when there are at most two: all of them held
/// in registers in one sweep, eight lanes (two registers) each, so twice as many additions are in
/// flight as the tiles' and the sums cost no second sweep.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `rows` holds rows R0..K, `sums` K and `products` K·K lane arrays.
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn stored_rows<const K: usize, const R0: usize>(
    rows: &Rows,
    sums: &mut [Lanes],
    products: &mut [Lanes],
) {
    debug_assert!(K - R0 <= 2);
    let starts: [*const f64; MAX_MODELS] =
        std::array::from_fn(|i| if (R0..K).contains(&i) { rows.row(i).as_ptr() } else { std::ptr::null() });
    // SAFETY (whole body): every row holds `rows.len` values, a multiple of LANES; the lane arrays
    // are whole.
    unsafe {
        let zero = Avx2::splat(0.0);
        let (mut s, mut acc) = ([zero; MAX_MODELS], [zero; MAX_MODELS * MAX_MODELS]);
        for i in R0..K {
            s[i] = Avx2::load(sums[i].as_ptr());
            for j in i..K {
                acc[i * K + j] = Avx2::load(products[i * K + j].as_ptr());
            }
        }
        let mut y = [zero; MAX_MODELS];
        let mut e = 0;
        while e < rows.len {
            for i in R0..K {
                y[i] = Avx2::load(starts[i].add(e));
            }
            for i in R0..K {
                s[i] = s[i].add(y[i]);
                for j in i..K {
                    acc[i * K + j] = acc[i * K + j].add_product(y[i], y[j]);
                }
            }
            e += LANES;
        }
        for i in R0..K {
            s[i].store(sums[i].as_mut_ptr());
            for j in i..K {
                acc[i * K + j].store(products[i * K + j].as_mut_ptr());
            }
        }
    }
}

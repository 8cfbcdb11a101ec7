//! Raw all-pairs sums of k delta vectors (Σxᵢ and Σxᵢxⱼ) over blocks that sit in L1: the hot loop
//! of `kinship_matrix`.
//!
//! The pairs are swept in register tiles (4×4 with AVX-512, 2×2 elsewhere), so each vector loaded
//! from L1 feeds several pairs. One pair costs one fused multiply-add per element; that is what
//! lets an all-pairs pass over eight fine-tunes stay near the cost of reading them. Every sum keeps
//! `LANES` partial sums in a fixed order, so results do not depend on the thread count, and are
//! the same on every CPU level that has FMA.

// The pass imports the fused sweep from its own file: a re-export here would make this file and
// `fused.rs` (which adds to `Gram`) import each other.
pub(super) mod fused;

use multiversion::multiversion;

use crate::io::dtype::FloatDtype;
use crate::kinship::kernel;
use crate::kinship::simd::{Accumulator, Lanes, LANES};

/// Elements per block of the all-pairs sweep: the base's and k deltas' blocks stay in L1.
pub(crate) const BLOCK: usize = 256;

/// Raw all-pairs sums of the deltas of one chunk of stored sources (the base first, each slice
/// holding `len` elements of its dtype): (Σxᵢ, Σxᵢxⱼ as a full k×k matrix). With no `scales`
/// and formats the fused sweep takes, the fine-tunes are widened and multiplied in registers;
/// otherwise, and for the chunk's last few (under eight) elements, each block of every source is
/// decoded, turned into deltas (quantised to int8 with `scales`) and fed to the tiles. `buffer`
/// holds (k + 1)·[`BLOCK`] values. The sums do not depend on which path made them.
pub(crate) fn stored_chunk_sums(
    sources: &[(FloatDtype, &[u8])],
    len: usize,
    scales: Option<&[f64]>,
    buffer: &mut [f64],
) -> (Vec<f64>, Vec<f64>) {
    let k = sources.len() - 1;
    let mut gram = Gram::new(k);
    let (base, rows) = buffer[..(k + 1) * BLOCK].split_at_mut(BLOCK);
    let mut widened = 0;
    let format = if scales.is_none() { fused::fused_format(k, sources.iter().map(|s| s.0)) } else { None };
    if let Some(format) = format {
        let mut stored: [&[u8]; fused::MAX_MODELS + 1] = [&[]; fused::MAX_MODELS + 1];
        for (bytes, source) in stored.iter_mut().zip(sources) {
            *bytes = source.1;
        }
        widened = gram.add_stored(format, &stored[..=k], len, rows);
    }
    for start in (widened..len).step_by(BLOCK) {
        let count = BLOCK.min(len - start);
        let padded = count.next_multiple_of(LANES);
        let (dtype, stored) = sources[0];
        crate::io::dtype::decode(dtype, elements(dtype, stored, start, count), &mut base[..count]);
        for (i, (&(dtype, stored), delta)) in sources[1..].iter().zip(rows.chunks_mut(BLOCK)).enumerate() {
            kernel::stored_delta_and_sum(
                dtype,
                elements(dtype, stored, start, count),
                &base[..count],
                &mut delta[..count],
            );
            if let Some(scales) = scales {
                kernel::quantize_int8(&mut delta[..count], scales[i]);
            }
            delta[count..padded].fill(0.0);
        }
        // Summed lane by lane from the rows, in the fused sweep's order: the sums do not depend on
        // which path (or CPU level) made the chunk.
        gram.add_row_sums(rows, BLOCK, padded);
        gram.add_products(rows, BLOCK, padded);
    }
    gram.totals()
}

/// The bytes of `count` elements of a stored slice from element `start`.
fn elements(dtype: FloatDtype, bytes: &[u8], start: usize, count: usize) -> &[u8] {
    &bytes[start * dtype.size()..(start + count) * dtype.size()]
}

/// Raw sums of k vectors over the blocks added so far.
#[derive(Debug, Clone)]
pub(crate) struct Gram {
    k: usize,
    /// Σxᵢ as `LANES` partial sums, added lane by lane (element e to lane e mod 8).
    sums: Vec<Lanes>,
    /// k×k, row-major; only i ≤ j is filled.
    products: Vec<Lanes>,
}

impl Gram {
    pub(crate) fn new(k: usize) -> Self {
        Gram { k, sums: vec![[0.0; LANES]; k], products: vec![[0.0; LANES]; k * k] }
    }

    /// Adds one block's Σxᵢ: row i holds `len` elements at `rows[i * stride..]`, `len` a multiple
    /// of [`LANES`]. Lane l adds the elements l, l + 8, ... in turn, as the fused sweep does, so
    /// the sums do not depend on which of them made the block (nor on the CPU level).
    pub(crate) fn add_row_sums(&mut self, rows: &[f64], stride: usize, len: usize) {
        assert!(len.is_multiple_of(LANES) && len <= stride);
        for (i, sums) in self.sums.iter_mut().enumerate() {
            add_lanes(sums, &rows[i * stride..i * stride + len]);
        }
    }

    /// Adds one block's products: row i holds `len` elements at `rows[i * stride..]`. `len` must
    /// be a multiple of [`LANES`]; zero padding adds nothing.
    pub(crate) fn add_products(&mut self, rows: &[f64], stride: usize, len: usize) {
        assert!(
            len.is_multiple_of(LANES) && len <= stride && rows.len() >= (self.k.max(1) - 1) * stride + len
        );
        add_products(&Rows { data: rows, stride, len, first: 0 }, self.k, &mut self.products);
    }

    /// (Σxᵢ, Σxᵢxⱼ as a full symmetric k×k matrix).
    pub(crate) fn totals(&self) -> (Vec<f64>, Vec<f64>) {
        let k = self.k;
        let total = |lanes: &Lanes| lanes.iter().sum::<f64>();
        let sums = self.sums.iter().map(total).collect();
        let mut products = vec![0.0; k * k];
        for i in 0..k {
            for j in i..k {
                let p = total(&self.products[i * k + j]);
                products[i * k + j] = p;
                products[j * k + i] = p;
            }
        }
        (sums, products)
    }
}

/// Adds each element e of `row` to `sums` lane e mod 8, in order.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn add_lanes(sums: &mut Lanes, row: &[f64]) {
    for values in row.chunks_exact(LANES) {
        for (sum, value) in sums.iter_mut().zip(values) {
            *sum += value;
        }
    }
}

fn add_products(rows: &Rows, k: usize, products: &mut [Lanes]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { x86::tiles_avx512(rows, k, products) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::tiles_avx2(rows, k, products) };
        }
    }
    // SAFETY: plain arrays need no CPU feature.
    unsafe { tiles::<Lanes, 2>(rows, k, products) }
}

/// Rows `first..k` of the k×k pair matrix, row i at `data[(i − first) · stride..]`: the pairs of
/// rows below `first` are someone else's (the fused AVX2 sweep makes them while decoding).
struct Rows<'a> {
    data: &'a [f64],
    stride: usize,
    len: usize,
    first: usize,
}

impl Rows<'_> {
    #[inline(always)]
    fn row(&self, i: usize) -> &[f64] {
        let at = (i - self.first) * self.stride;
        &self.data[at..at + self.len]
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{tiles, Lanes, Rows};
    use crate::kinship::simd::x86::{Avx2, Avx512};

    /// 4×4 tiles: sixteen accumulators and eight operands fit AVX-512's 32 registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tiles_avx512(rows: &Rows, k: usize, products: &mut [Lanes]) {
        // SAFETY: the CPU has AVX-512F.
        unsafe { tiles::<Avx512, 4>(rows, k, products) }
    }

    /// 2×2 tiles: four two-register accumulators and four operands fit AVX2's 16 registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiles_avx2(rows: &Rows, k: usize, products: &mut [Lanes]) {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { tiles::<Avx2, 2>(rows, k, products) }
    }
}

/// Covers the upper triangle of the k×k pair matrix from row `rows.first` with tiles of at most
/// T×T.
///
/// # Safety
/// The CPU must have `A`'s features.
#[inline(always)]
unsafe fn tiles<A: Accumulator, const T: usize>(rows: &Rows, k: usize, products: &mut [Lanes]) {
    for i0 in (rows.first..k).step_by(T) {
        for j0 in (i0..k).step_by(T) {
            let (r, c) = (T.min(k - i0), T.min(k - j0));
            let diagonal = i0 == j0;
            // Monomorphise every tile shape that can occur, so accumulators stay in registers.
            macro_rules! go {
                ($($r:literal, $c:literal);*) => {
                    match (r, c, diagonal) {
                        $(
                            // SAFETY: the caller guarantees the CPU features.
                            ($r, $c, true) => unsafe { tile::<A, $r, $c, true>(rows, i0, j0, k, products) },
                            // SAFETY: as above.
                            ($r, $c, false) => unsafe { tile::<A, $r, $c, false>(rows, i0, j0, k, products) },
                        )*
                        _ => unreachable!("tile shapes are at most T×T"),
                    }
                };
            }
            if T == 4 {
                go!(4, 4; 4, 3; 4, 2; 4, 1; 3, 3; 2, 2; 1, 1);
            } else {
                go!(2, 2; 2, 1; 1, 1);
            }
        }
    }
}

/// Accumulates Σ xᵢxⱼ for rows i0..i0+R against rows j0..j0+C; on a diagonal tile only j ≥ i.
///
/// # Safety
/// The CPU must have `A`'s features.
#[inline(always)]
unsafe fn tile<A: Accumulator, const R: usize, const C: usize, const DIAGONAL: bool>(
    rows: &Rows,
    i0: usize,
    j0: usize,
    k: usize,
    products: &mut [Lanes],
) {
    const { assert!(A::WIDTH == LANES) };
    let wanted = |r: usize, c: usize| !DIAGONAL || c >= r;
    let xs: [&[f64]; R] = std::array::from_fn(|r| rows.row(i0 + r));
    let ys: [&[f64]; C] = std::array::from_fn(|c| rows.row(j0 + c));
    let slot = |r: usize, c: usize| (i0 + r) * k + j0 + c;
    // Plain loops rather than closures: a closure does not inherit the CPU features, so the
    // intrinsics in it would not be inlined.
    // SAFETY (loads and stores below): every slot is a whole `Lanes` array of `products`, and
    // every row holds `rows.len` values, a multiple of LANES, so e + LANES <= rows.len.
    let mut acc = [[unsafe { A::load(products[slot(0, 0)].as_ptr()) }; C]; R];
    for r in 0..R {
        for c in 0..C {
            acc[r][c] = unsafe { A::load(products[slot(r, c)].as_ptr()) };
        }
    }
    let (mut x, mut y) = ([acc[0][0]; R], [acc[0][0]; C]);
    for e in (0..rows.len).step_by(LANES) {
        for r in 0..R {
            x[r] = unsafe { A::load(xs[r].as_ptr().add(e)) };
        }
        for c in 0..C {
            y[c] = unsafe { A::load(ys[c].as_ptr().add(e)) };
        }
        for r in 0..R {
            for c in 0..C {
                if wanted(r, c) {
                    acc[r][c] = unsafe { acc[r][c].add_product(x[r], y[c]) };
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            if wanted(r, c) {
                unsafe { acc[r][c].store(products[slot(r, c)].as_mut_ptr()) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiles this CPU runs (AVX-512 or AVX2) and the plain-array tiles of the scalar fallback
    /// give the same bits on values whose products round, for every k and tile shape.
    #[test]
    fn every_level_gives_the_same_products() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut value = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for k in 1..=9 {
            let (stride, len) = (72, 64);
            let rows: Vec<f64> = (0..k * stride).map(|_| value()).collect();
            let rows = Rows { data: &rows, stride, len, first: 0 };
            let mut dispatched = vec![[0.0; LANES]; k * k];
            let mut scalar = vec![[0.0; LANES]; k * k];
            add_products(&rows, k, &mut dispatched);
            // SAFETY: plain arrays need no CPU feature.
            unsafe { tiles::<Lanes, 2>(&rows, k, &mut scalar) };
            assert_eq!(dispatched, scalar, "k={k}");
        }
    }

    #[test]
    fn sums_match_naive_for_every_tile_shape() {
        for k in 1..=9 {
            let (stride, len) = (40, 32);
            let rows: Vec<f64> = (0..k * stride).map(|v| ((v * 7919) % 101) as f64 / 8.0 - 6.0).collect();
            let mut gram = Gram::new(k);
            for block_len in [len, 16] {
                gram.add_row_sums(&rows, stride, block_len);
                gram.add_products(&rows, stride, block_len);
            }
            let (sums, products) = gram.totals();
            let row = |i: usize, n: usize| &rows[i * stride..i * stride + n];
            for i in 0..k {
                let expected: f64 = row(i, len).iter().sum::<f64>() + row(i, 16).iter().sum::<f64>();
                assert_eq!(sums[i], expected, "k={k} sum {i}");
                for j in 0..k {
                    let dot = |n| row(i, n).iter().zip(row(j, n)).map(|(a, b)| a * b).sum::<f64>();
                    // Values are multiples of 1/8 below 7, so every sum here is exact.
                    assert_eq!(products[i * k + j], dot(len) + dot(16), "k={k} pair {i},{j}");
                }
            }
        }
    }
}

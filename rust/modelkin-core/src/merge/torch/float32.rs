//! The norms and sums mergekit takes in float32, reproduced bit for bit.
//!
//! With `dtype: float32`, mergekit's slerp and model_stock derive their factors from torch float32
//! norms and sums. torch sums the squares of a norm in eight f32 lanes, one after another, and a
//! `sum` in eight lanes with a cascade of partial sums, split over its threads.
//! Over millions of elements that drifts: on a 32000×256 tensor torch's norm is 57.240738 where the
//! exact one is 57.238481 (4e-5 apart), which moves the factors, and so the bf16 outputs, of a few
//! tenths of a percent of the elements. modelkin follows the same order so that its outputs match.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::source::{with_block, Source, BLOCK};
use crate::merge::torch::half_ops::Half;
use crate::merge::torch::threads::torch_threads;

const LANES: usize = 8;

/// torch's float32 2-norm of a contiguous run (`torch.linalg.vector_norm` on CPU, runs of 64 or
/// more values): squares (each rounded, then added: torch's vector step is not fused) accumulated
/// in eight f32 lanes over the whole groups of eight, the lanes then added in order, and the last
/// `len % 8` squares fused-multiply-added one by one.
#[derive(Debug, Clone)]
pub(crate) struct LaneNorm {
    lanes: [f32; LANES],
    grouped: usize,
    seen: usize,
    tail: Vec<f32>,
}

impl LaneNorm {
    /// A norm over a run of `len` float32 values.
    pub(crate) fn new(len: usize) -> Self {
        Self::for_dtype(len, None)
    }

    /// The norm torch takes of a run stored in a half type (`half`: its vectors hold 16 values,
    /// each fed to the lanes as two f32 vectors, before the fused tail), or in float32.
    ///
    /// torch's fast path covers float32 and bfloat16 only; float16 norms take torch's generic
    /// reduction, whose order this does not follow.
    pub(crate) fn for_dtype(len: usize, half: Option<Half>) -> Self {
        let vector = if half.is_some() { 2 * LANES } else { LANES };
        LaneNorm { lanes: [0.0; LANES], grouped: len - len % vector, seen: 0, tail: Vec::new() }
    }

    /// Adds the next values of the run, in order.
    pub(crate) fn add(&mut self, values: impl IntoIterator<Item = f32>) {
        for v in values {
            if self.seen < self.grouped {
                self.lanes[self.seen % LANES] += v * v;
            } else {
                self.tail.push(v);
            }
            self.seen += 1;
        }
    }

    pub(crate) fn finish(&self) -> f32 {
        let mut sum = self.lanes[0];
        for lane in &self.lanes[1..] {
            sum += lane;
        }
        for v in &self.tail {
            sum = v.mul_add(*v, sum);
        }
        sum.sqrt()
    }
}

/// torch's float32 `sum` of a contiguous run of `len` values on the CPU, fed in order.
///
/// torch splits a run of at least 32768 values into one contiguous range per thread (when it has
/// more than one), sums each range with its vectorised cascade ([`InnerSum`]) and adds the
/// per-thread results in thread order; the result depends on torch's thread count as torch's does.
#[derive(Debug, Clone)]
pub(crate) struct TorchSum {
    range_len: usize,
    len: usize,
    seen: usize,
    current: InnerSum,
    finished: Vec<f32>,
    threads: usize,
}

/// The grain below which torch reduces serially (`at::internal::GRAIN_SIZE`).
const GRAIN: usize = 32768;

impl TorchSum {
    pub(crate) fn new(len: usize, threads: usize) -> Self {
        let threads = threads.max(1);
        let (threads, range_len) = if len < GRAIN || threads == 1 {
            (1, len.max(1))
        } else {
            let used = threads.min(len.div_ceil(GRAIN));
            (threads, len.div_ceil(used))
        };
        TorchSum {
            range_len,
            len,
            seen: 0,
            current: InnerSum::new(range_len.min(len)),
            finished: Vec::new(),
            threads,
        }
    }

    pub(crate) fn add(&mut self, values: impl IntoIterator<Item = f32>) {
        for v in values {
            if self.seen > 0 && self.seen.is_multiple_of(self.range_len) {
                let next = InnerSum::new(self.range_len.min(self.len - self.seen));
                self.finished.push(std::mem::replace(&mut self.current, next).finish());
            }
            self.current.add(v);
            self.seen += 1;
        }
    }

    pub(crate) fn finish(&self) -> f32 {
        let mut parts = self.finished.clone();
        parts.push(self.current.finish());
        if self.threads == 1 {
            return 0.0 + parts[0];
        }
        // Each thread's result lands in a zeroed buffer slot (idle threads leave theirs at 0), and
        // the buffer is summed into the zeroed output.
        parts.resize(self.threads, 0.0);
        let mut total = InnerSum::new(parts.len());
        parts.iter().for_each(|p| total.add(0.0 + p));
        0.0 + total.finish()
    }
}

/// torch's vectorised `sum` of one contiguous range (`vectorized_inner_sum` with 8-lane vectors):
/// whole vectors in groups of four (`row_sum`'s ILP) accumulated through four cascade levels
/// (`multi_row_sum`), leftover vectors into the first group, the four groups folded, then the
/// leftover scalars summed and the eight lanes added to them.
#[derive(Debug, Clone)]
struct InnerSum {
    rows: usize,
    vectors: usize,
    level_power: u32,
    levels: [[[f32; LANES]; 4]; 4],
    folded: Option<[[f32; LANES]; 4]>,
    seen: usize,
    tail: Vec<f32>,
}

impl InnerSum {
    fn new(len: usize) -> Self {
        let vectors = len / LANES;
        let rows = vectors / 4;
        InnerSum {
            rows,
            vectors,
            level_power: super::outer_sum::level_power(rows),
            levels: [[[0.0; LANES]; 4]; 4],
            folded: None,
            seen: 0,
            tail: Vec::new(),
        }
    }

    fn add(&mut self, v: f32) {
        let (vector, lane) = (self.seen / LANES, self.seen % LANES);
        self.seen += 1;
        if vector < 4 * self.rows {
            self.levels[0][vector % 4][lane] += v;
            let row_end = self.seen.is_multiple_of(4 * LANES);
            let done = self.seen / (4 * LANES);
            if row_end && done.is_multiple_of(1 << self.level_power) {
                self.cascade(done);
            }
        } else if vector < self.vectors {
            let levels = &self.levels;
            self.folded.get_or_insert_with(|| fold(levels))[0][lane] += v;
        } else {
            self.tail.push(v);
        }
    }

    /// After each full group of rows: level j takes level j − 1 while the row count is a
    /// multiple of the level's span.
    fn cascade(&mut self, rows_done: usize) {
        let mask = (1usize << self.level_power) - 1;
        for j in 1..4 {
            for k in 0..4 {
                for l in 0..LANES {
                    self.levels[j][k][l] += self.levels[j - 1][k][l];
                    self.levels[j - 1][k][l] = 0.0;
                }
            }
            if rows_done & (mask << (j as u32 * self.level_power)) != 0 {
                break;
            }
        }
    }

    fn finish(&self) -> f32 {
        let groups = self.folded.unwrap_or_else(|| fold(&self.levels));
        let mut first = groups[0];
        for group in &groups[1..] {
            for l in 0..LANES {
                first[l] += group[l];
            }
        }
        let mut sum = 0.0f32;
        for v in &self.tail {
            sum += v;
        }
        for lane in first {
            sum += lane;
        }
        sum
    }
}

/// The four groups after `multi_row_sum` returns: every level added into level 0.
fn fold(levels: &[[[f32; LANES]; 4]; 4]) -> [[f32; LANES]; 4] {
    let mut out = levels[0];
    for level in &levels[1..] {
        for k in 0..4 {
            for l in 0..LANES {
                out[k][l] += level[k][l];
            }
        }
    }
    out
}

/// torch's sum of a few values along a strided or short run (`row_sum`: four partial sums over
/// groups of four, the leftovers into the first, then the four folded in order). Fed from an
/// iterator, so the per-element sums of the merge methods collect nothing.
pub(crate) fn row_sum(values: impl IntoIterator<Item = f32, IntoIter: ExactSizeIterator>) -> f32 {
    let values = values.into_iter();
    let grouped = values.len() / 4 * 4;
    let mut partial = [0.0f32; 4];
    for (i, v) in values.enumerate() {
        partial[if i < grouped { i % 4 } else { 0 }] += v;
    }
    partial[1..].iter().fold(partial[0], |sum, p| sum + p)
}

/// mergekit's chunked float32 slerp norm of each source: the norm of the norms of its runs of
/// `run` elements.
pub(crate) fn chunked_norms(
    sources: &[&Source],
    n: usize,
    run: usize,
    progress: &Progress,
) -> Result<Vec<f64>> {
    let per_run = over_runs(
        sources,
        n,
        run,
        progress,
        |len| vec![LaneNorm::new(len); sources.len()],
        |norms, v| norms.iter_mut().zip(v).for_each(|(norm, x)| norm.add(x.iter().map(|x| *x as f32))),
    )?;
    Ok((0..sources.len())
        .map(|i| {
            let mut total = LaneNorm::new(per_run.len());
            total.add(per_run.iter().map(|norms| norms[i].finish()));
            f64::from(total.finish())
        })
        .collect())
}

/// mergekit's chunked float32 slerp cosine: per run of `run` elements, torch's sum of
/// (x/‖x‖)·(y/‖y‖) in f32, then the sum of the runs' results.
pub(crate) fn chunked_dot(
    sources: &[&Source],
    n: usize,
    run: usize,
    (norm_x, norm_y): (f32, f32),
    progress: &Progress,
) -> Result<f32> {
    let threads = torch_threads();
    let per_run = over_runs(
        sources,
        n,
        run,
        progress,
        |len| TorchSum::new(len, threads),
        |sum, v| sum.add(v[0].iter().zip(v[1]).map(|(x, y)| (*x as f32 / norm_x) * (*y as f32 / norm_y))),
    )?;
    let mut total = TorchSum::new(per_run.len(), threads);
    total.add(per_run.iter().map(TorchSum::finish));
    Ok(total.finish())
}

/// One accumulator per run of `run` elements (runs in parallel, each swept in order, block by
/// block of decoded sources), as mergekit's chunked slerp statistics take them.
fn over_runs<S: Send>(
    sources: &[&Source],
    n: usize,
    run: usize,
    progress: &Progress,
    start: impl Fn(usize) -> S + Sync,
    add: impl Fn(&mut S, &[&[f64]]) + Sync,
) -> Result<Vec<S>> {
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    (0..n.div_ceil(run))
        .into_par_iter()
        .map(|r| {
            let (first, len) = (r * run, run.min(n - r * run));
            let mut state = start(len);
            for at in (first..first + len).step_by(BLOCK) {
                progress.check()?;
                let count = BLOCK.min(first + len - at);
                with_block(sources, at, count, |v| add(&mut state, v));
                progress.done.fetch_add(count as u64 * bytes_per_element, Ordering::Relaxed);
            }
            Ok(state)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{row_sum, LaneNorm, TorchSum};

    /// Bit patterns torch 2.x gave for `torch.sum` of these values with 1 and 2 threads.
    #[test]
    fn sums_match_torch() {
        let cases = [
            (1, 5, 0x3a37_6549),
            (1, 17, 0x3a05_f6da),
            (1, 1000, 0x3a83_776a),
            (1, 40000, 0x3d24_5540),
            (1, 100_003, 0x3dcd_f414),
            (1, 1_048_576, 0x3f86_b5bd),
            (2, 5, 0x3a37_6549),
            (2, 17, 0x3a05_f6da),
            (2, 1000, 0x3a83_776a),
            (2, 40000, 0x3d24_553e),
            (2, 100_003, 0x3dcd_f414),
            (2, 1_048_576, 0x3f86_b5be),
        ];
        for (threads, n, bits) in cases {
            let values = (0..n).map(|i: usize| (((i * 7919) % 1000) as f64 / 997.0 - 0.5) as f32 * 1e-3f32);
            let mut sum = TorchSum::new(n, threads);
            sum.add(values);
            assert_eq!(sum.finish().to_bits(), bits, "{threads} threads, {n} values");
        }
    }

    #[test]
    fn lanes_then_tail_in_torch_order() {
        let values: Vec<f32> = (0..19).map(|v| 1.0 + v as f32 / 3.0).collect();
        let mut norm = LaneNorm::new(values.len());
        norm.add(values[..5].iter().copied());
        norm.add(values[5..].iter().copied());
        let mut lanes = [0f32; 8];
        for (e, v) in values[..16].iter().enumerate() {
            lanes[e % 8] += v * v;
        }
        let mut sum = lanes.iter().skip(1).fold(lanes[0], |s, l| s + l);
        for v in &values[16..] {
            sum = v.mul_add(*v, sum);
        }
        assert_eq!(norm.finish(), sum.sqrt());
    }

    #[test]
    fn row_sums_fold_four_partial_sums() {
        assert_eq!(row_sum([1.0, 2.0]), 3.0);
        // The fifth value joins the first partial sum before the others are folded in; summed in
        // order it would come last (0.75).
        assert_eq!(row_sum([1.0, 1e8, -1e8, 0.5, 0.25]), ((1.0f32 + 0.25) + 1e8 - 1e8) + 0.5);
    }
}

//! mergekit's `arcee_fusion`: the other model's change is kept where it is important, importance
//! being |x − z| times the KL divergence of the row's softmax (x's against the base's), and
//! "important" meaning at least median + 1.5·IQR of the tensor's importances.
//!
//! mergekit estimates the quartiles from a random sample of a million entries (drawn with
//! replacement by `torch.randint` from torch's generator) in larger tensors. Given the draws its
//! process made before the tensor (the planner counts them in mergekit's order, its generator
//! seeded with the merge's seed as `--random-seed` seeds it), the same sample is drawn here, for
//! mergekit's bits; otherwise the quartiles are taken exactly over every entry.

use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::job::{no_base, Compute, MergeJob};
use crate::merge::engine::source::{with_block, Resolved, Source};
use crate::merge::torch::half_ops::{Bf16Rounding, F16Rounding, Rounding};
use crate::merge::torch::radix;
use crate::merge::torch::random::Mt19937;

/// What the output pass needs: each row's KL divergence and the importance threshold.
#[derive(Debug, Clone)]
pub(crate) struct Fusion {
    kl: Vec<f64>,
    cols: usize,
    threshold: f64,
}

impl Fusion {
    /// Whether element `e` (of `first + e`), with values `x` and base `z`, keeps its change.
    #[inline]
    pub(crate) fn keeps(&self, compute: Compute, element: usize, x: f64, z: f64) -> bool {
        f64::from(importance(compute, self.kl[element / self.cols], x, z)) >= self.threshold
    }
}

/// The importance key of one element: |x − z|·KL of its row, at float32 (exact arithmetic), or
/// each step rounded to the working dtype as torch does it.
#[inline]
fn importance(compute: Compute, kl: f64, x: f64, z: f64) -> f32 {
    match compute {
        Compute::Float64 => ((x - z).abs() * kl) as f32,
        _ => {
            let r = rounding(compute);
            r(r(x as f32 - z as f32).abs() * kl as f32)
        }
    }
}

/// The working dtype's rounding of an f32 result.
fn rounding(compute: Compute) -> fn(f32) -> f32 {
    match compute {
        Compute::Bfloat16 => Bf16Rounding::round,
        Compute::Float16 => F16Rounding::round,
        _ => |v| v,
    }
}

/// [`row_kl`] in torch's steps for a float32 or half working dtype: softmax computed in f32 and
/// rounded to the dtype, then `+ 1e-8`, the ratio, its log, the product each rounded, and the sum
/// accumulated in f32 and rounded once.
fn row_kl_rounded(compute: Compute, x: &[f64], z: &[f64]) -> f64 {
    let r = rounding(compute);
    let softmax = |v: &[f64]| -> Vec<f32> {
        let max = v.iter().map(|&a| a as f32).fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = v.iter().map(|&a| (a as f32 - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.iter().map(|e| r(r(e / sum) + 1e-8)).collect()
    };
    let (p, q) = (softmax(x), softmax(z));
    let sum: f32 = p.iter().zip(&q).map(|(&p, &q)| r(p * r(r(p / q).ln()))).sum();
    f64::from(r(sum))
}

/// An f32 as a key whose unsigned order is the float order: importances can be negative (the
/// `+ ε` and rounding can make a row's KL slightly negative).
fn ordered(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The inverse of [`ordered`].
fn unordered(key: u32) -> f32 {
    f32::from_bits(if key >> 31 == 1 { key & 0x7fff_ffff } else { !key })
}

/// KL(softmax(x) + ε ‖ softmax(z) + ε) of one row, ε = 1e-8, as mergekit adds it.
fn row_kl(x: &[f64], z: &[f64]) -> f64 {
    const EPS: f64 = 1e-8;
    let softmax = |v: &[f64]| {
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = v.iter().map(|a| (a - max).exp()).sum();
        (max, sum)
    };
    let ((mx, sx), (mz, sz)) = (softmax(x), softmax(z));
    x.iter()
        .zip(z)
        .map(|(a, b)| {
            let p = (a - mx).exp() / sx + EPS;
            let q = (b - mz).exp() / sz + EPS;
            p * (p / q).ln()
        })
        .sum()
}

/// Measures one tensor: the rows' KL divergences (rows along the last axis; a 1-D tensor is one
/// row), then the quartiles of the importances in two streamed histogram passes.
pub(crate) fn measure(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<Fusion> {
    let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let n = tensor.numel;
    let cols =
        if tensor.shape.len() < 2 { n.max(1) } else { tensor.shape.last().copied().unwrap_or(1).max(1) };
    let sources = [base, &tensor.inputs[0]];
    let kl: Vec<f64> = (0..n / cols)
        .into_par_iter()
        .map(|row| -> Result<f64> {
            progress.check()?;
            Ok(with_block(&sources, row * cols, cols, |v| match job.compute {
                Compute::Float64 => row_kl(v[1], v[0]),
                compute => row_kl_rounded(compute, v[1], v[0]),
            }))
        })
        .collect::<Result<_>>()?;
    let sampled = tensor.recipe.draws_before.filter(|_| n > SAMPLE);
    let [q1, median, q3] = match sampled {
        Some(draws) => sampled_quartiles(job, &sources, &kl, cols, n, draws),
        None => {
            let ranks = vec![vec![rank(0.25, n), rank(0.5, n), rank(0.75, n)]];
            let found = radix::order_statistics(
                &sources,
                tensor.block,
                n,
                &ranks,
                progress,
                |first, len, _, keys| {
                    with_block(&sources, first, len, |v| {
                        keys.extend((0..len).map(|e| {
                            ordered(importance(job.compute, kl[(first + e) / cols], v[1][e], v[0][e]))
                        }))
                    })
                },
            )?;
            [0, 1, 2].map(|i| unordered(found[0][i].value()))
        }
    };
    let threshold = match job.compute {
        Compute::Float64 => f64::from(median) + 1.5 * (f64::from(q3) - f64::from(q1)),
        // 0-dim tensors of the working dtype; 1.5 a Python scalar.
        compute => {
            let r = rounding(compute);
            f64::from(r(median + r(1.5 * r(q3 - q1))))
        }
    };
    Ok(Fusion { kl, cols, threshold })
}

/// mergekit samples the importances of tensors with more entries than this.
const SAMPLE: usize = 1_000_000;

/// torch: `(q · (n − 1)).long()` with q a float32 tensor.
fn rank(q: f32, n: usize) -> usize {
    ((q * (n.saturating_sub(1)) as f32) as usize).min(n.saturating_sub(1))
}

/// The quartiles of a million importances drawn as mergekit draws them: `torch.randint(n, (10⁶,))`
/// (each index one 32-bit draw modulo n, in order) after `draws` earlier draws, sorted.
fn sampled_quartiles(
    job: &MergeJob,
    sources: &[&Source],
    kl: &[f64],
    cols: usize,
    n: usize,
    draws: u64,
) -> [f32; 3] {
    let mut generator = Mt19937::new(job.seed);
    generator.discard(draws);
    let indices: Vec<usize> = (0..SAMPLE).map(|_| generator.next_u32() as usize % n).collect();
    let mut keys: Vec<u32> = indices
        .par_iter()
        .map(|&i| {
            with_block(sources, i, 1, |v| ordered(importance(job.compute, kl[i / cols], v[1][0], v[0][0])))
        })
        .collect();
    keys.par_sort_unstable();
    [0.25, 0.5, 0.75].map(|q| unordered(keys[rank(q, SAMPLE)]))
}

#[cfg(test)]
mod tests {
    use super::{ordered, row_kl, unordered};

    #[test]
    fn keys_order_as_floats() {
        let values = [-3.5f32, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY];
        for pair in values.windows(2) {
            assert!(ordered(pair[0]) <= ordered(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(unordered(ordered(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn kl_of_equal_rows_is_zero_and_positive_otherwise() {
        let x = [0.1, -0.2, 0.3, 0.05];
        assert!(row_kl(&x, &x).abs() < 1e-15);
        let z = [0.3, 0.1, -0.2, 0.0];
        let by_hand: f64 = {
            let sm = |v: &[f64]| {
                let s: f64 = v.iter().map(|a| a.exp()).sum();
                v.iter().map(|a| a.exp() / s + 1e-8).collect::<Vec<_>>()
            };
            let (p, q) = (sm(&x), sm(&z));
            p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
        };
        assert!((row_kl(&x, &z) - by_hand).abs() < 1e-15 && by_hand > 0.0);
    }
}

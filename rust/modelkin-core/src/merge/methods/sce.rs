//! SCE (select, calculate, erase): the task vectors' entries of highest variance are kept
//! (`select_topk`), each task vector is weighted by its mean squared entry, signs are elected, and
//! the agreeing weighted entries are averaged onto the base.
//!
//! In float64 (`precise`) every step is exact. In mergekit's working dtype each step of mergekit's
//! `sce_merge` is rounded as torch rounds it: the task vectors, the variance (torch's float64
//! Welford rounded to the dtype, which a two-pass float64 variance equals), the energies (torch's
//! row sums), the sign election and the weighted average.

use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::job::{no_base, Compute, MergeJob};
use crate::merge::engine::source::{sweep_in_order, with_block, Resolved};
use crate::merge::torch::float32::{row_sum, TorchSum};
use crate::merge::torch::half_ops::Half;
use crate::merge::torch::radix;
use crate::merge::torch::threads::torch_threads;
use crate::merge::torch::topk;

/// What the output pass of one SCE tensor needs.
pub(crate) struct Sce {
    /// Working-dtype steps (`None`: exact float64).
    steps: Option<Steps>,
    /// Entries whose variance key is at least this are selected (`None`: all)...
    floor: Option<u32>,
    /// ...or, in the working dtype, the entries torch's topk selects (a bit per element), ties at
    /// the boundary included.
    chosen: Option<Vec<u64>>,
    /// Each task vector's weight (in the working dtype, its value there).
    weights: Vec<f64>,
}

/// The rounding of mergekit's working dtype.
#[derive(Clone, Copy)]
struct Steps {
    half: Option<Half>,
}

impl Steps {
    fn h(self, v: f32) -> f32 {
        self.half.map_or(v, |h| h.round(v))
    }
}

impl Sce {
    /// The task vectors of element `e` (rounded to the working dtype when there is one).
    fn vectors(&self, z: &[f64], inputs: &[&[f64]], e: usize, out: &mut Vec<f64>) {
        out.clear();
        match self.steps {
            Some(s) => out.extend(inputs.iter().map(|x| f64::from(s.h(x[e] as f32 - z[e] as f32)))),
            None => out.extend(inputs.iter().map(|x| x[e] - z[e])),
        }
    }

    /// The variance of the task vectors as the ranking sees it: f32 bits, of the working dtype's
    /// value where there is one.
    fn key(&self, vectors: &[f64]) -> u32 {
        let k = vectors.len() as f64;
        let mean = vectors.iter().sum::<f64>() / k;
        let variance = vectors.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / k;
        self.steps.map_or(variance as f32, |s| s.h(variance as f32)).to_bits()
    }

    /// The selected task vectors of element `e` of the block at `first` (zeros where not selected).
    fn selected(&self, z: &[f64], inputs: &[&[f64]], first: usize, e: usize, out: &mut Vec<f64>) {
        self.vectors(z, inputs, e, out);
        let dropped = match &self.chosen {
            Some(bits) => bits[(first + e) / 64] & (1 << ((first + e) % 64)) == 0,
            None => self.floor.is_some_and(|floor| self.key(out) < floor),
        };
        if dropped {
            out.iter_mut().for_each(|v| *v *= 0.0);
        }
    }

    /// The merged values of the block at element `first`.
    pub(crate) fn block(&self, first: usize, z: &[f64], inputs: &[&[f64]], merged: &mut [f64]) {
        let mut vectors = Vec::with_capacity(inputs.len());
        for (e, out) in merged.iter_mut().enumerate() {
            self.selected(z, inputs, first, e, &mut vectors);
            *out = match self.steps {
                None => {
                    let majority = if vectors.iter().sum::<f64>() >= 0.0 { 1.0 } else { -1.0 };
                    let (mut mixed, mut divisor) = (0.0, 0.0);
                    for (d, w) in vectors.iter().zip(&self.weights) {
                        if *d != 0.0 && d.signum() == majority {
                            mixed += d * w;
                            divisor += w;
                        }
                    }
                    z[e] + mixed / f64::max(divisor, 1e-6)
                }
                Some(s) => {
                    let h = |v: f32| s.h(v);
                    // The task vectors hold values of the working dtype: exact as f32.
                    let tvs = || vectors.iter().map(|&v| v as f32);
                    let majority = if h(row_sum(tvs())) >= 0.0 { 1.0 } else { -1.0 };
                    // sign(δ) == majority: zeros never agree.
                    let erased = || {
                        tvs().zip(&self.weights).map(move |(d, &w)| {
                            if d != 0.0 && d.signum() == majority {
                                w as f32
                            } else {
                                0.0
                            }
                        })
                    };
                    let divisor = h(row_sum(erased())).max(h(1e-6));
                    let mixed = h(row_sum(tvs().zip(erased()).map(|(d, w)| h(d * w))));
                    f64::from(h(z[e] as f32 + h(mixed / divisor)))
                }
            };
        }
    }
}

/// SCE's statistics of one tensor: the variance threshold of `select_topk`, then each task
/// vector's weight ∝ its mean squared (selected) entry.
pub(crate) fn measure(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<Sce> {
    tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let steps = (job.compute != Compute::Float64).then_some(Steps { half: job.compute.half() });
    let mut sce = Sce { steps, floor: None, chosen: None, weights: Vec::new() };
    let k = tensor.inputs.len();
    let n = tensor.numel;
    let all = tensor.sources();
    let keys = |sce: &Sce, first: usize, len: usize, keys: &mut Vec<u32>| {
        let mut vectors = Vec::with_capacity(k);
        with_block(&all, first, len, |v| {
            keys.extend((0..len).map(|e| {
                sce.vectors(v[0], &v[1..], e, &mut vectors);
                sce.key(&vectors)
            }))
        })
    };
    let topk = tensor.recipe.select_topk;
    if topk <= 0.0 {
        sce.floor = Some(u32::MAX);
    } else if topk < 1.0 {
        let nonzero: usize = (0..n.div_ceil(tensor.block))
            .into_par_iter()
            .map(|b| -> Result<usize> {
                progress.check()?;
                let first = b * tensor.block;
                let mut found = Vec::new();
                keys(&sce, first, tensor.block.min(n - first), &mut found);
                Ok(found.iter().filter(|&&key| key != 0).count())
            })
            .sum::<Result<usize>>()?;
        // int(count_nonzero(var) * select_topk): float64 exactly, or as torch multiplies an int64
        // tensor by a Python float (in float32).
        let selected = match steps {
            None => (nonzero as f64 * topk) as usize,
            Some(_) => (nonzero as f32 * topk as f32) as usize,
        };
        if selected > 0 && steps.is_some() && (n as u64) * 8 <= job.sort_order_bytes {
            sce.chosen = Some(topk_bits(&sce, tensor, selected, progress, keys)?);
        } else {
            sce.floor = Some(if selected == 0 {
                u32::MAX
            } else {
                let found = radix::order_statistics(
                    &all,
                    tensor.block,
                    n,
                    &[vec![n - selected]],
                    progress,
                    |first, len, _, out| keys(&sce, first, len, out),
                )?;
                found[0][0].keep_from()
            });
        }
    }
    sce.weights = match steps {
        None => exact_weights(&sce, tensor, progress)?,
        Some(s) => rounded_weights(&sce, s, tensor, progress)?,
    };
    Ok(sce)
}

/// The entries torch's `topk(selected)` of the variances returns, as a bit per element: every
/// variance packed with its index (complemented: the largest first), then libstdc++'s selection
/// replayed ([`topk::select_first`]), so that ties at the boundary split as torch splits them.
fn topk_bits(
    sce: &Sce,
    tensor: &Resolved,
    selected: usize,
    progress: &Progress,
    keys: impl Fn(&Sce, usize, usize, &mut Vec<u32>),
) -> Result<Vec<u64>> {
    let n = tensor.numel;
    let mut entries = Vec::with_capacity(n);
    let mut found = Vec::new();
    for first in (0..n).step_by(tensor.block) {
        progress.check()?;
        found.clear();
        keys(sce, first, tensor.block.min(n - first), &mut found);
        entries
            .extend(found.iter().enumerate().map(|(e, &key)| (u64::from(!key) << 32) | (first + e) as u64));
    }
    topk::select_first(&mut entries, selected);
    let mut bits = vec![0u64; n.div_ceil(64)];
    for entry in &entries[..selected] {
        let index = (entry & 0xFFFF_FFFF) as usize;
        bits[index / 64] |= 1 << (index % 64);
    }
    Ok(bits)
}

/// The weights in float64: each task vector's mean squared selected entry, over their sum.
fn exact_weights(sce: &Sce, tensor: &Resolved, progress: &Progress) -> Result<Vec<f64>> {
    let (k, n) = (tensor.inputs.len(), tensor.numel);
    let all = tensor.sources();
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(tensor.block))
        .into_par_iter()
        .map(|b| -> Result<Vec<f64>> {
            progress.check()?;
            let first = b * tensor.block;
            let len = tensor.block.min(n - first);
            let mut energy = vec![0.0; k];
            let mut vectors = Vec::with_capacity(k);
            with_block(&all, first, len, |v| {
                for e in 0..len {
                    sce.selected(v[0], &v[1..], first, e, &mut vectors);
                    energy.iter_mut().zip(&vectors).for_each(|(s, d)| *s += d * d);
                }
            });
            Ok(energy)
        })
        .collect::<Result<_>>()?;
    let means: Vec<f64> = (0..k).map(|i| parts.iter().map(|p| p[i]).sum::<f64>() / n as f64).collect();
    let total: f64 = means.iter().sum();
    Ok(if total.abs() < 1e-6 { vec![1.0 / k as f64; k] } else { means.iter().map(|m| m / total).collect() })
}

/// The weights in the working dtype: torch's mean of each row of squares (a float32 row sum
/// divided by the count, rounded once), then divided by their sum.
fn rounded_weights(sce: &Sce, s: Steps, tensor: &Resolved, progress: &Progress) -> Result<Vec<f64>> {
    let (k, n) = (tensor.inputs.len(), tensor.numel);
    // One row per task vector: split over torch's threads only when it is the whole reduction.
    let threads = if k == 1 { torch_threads() } else { 1 };
    let mut sums = vec![TorchSum::new(n, threads); k];
    let mut vectors = Vec::with_capacity(k);
    sweep_in_order(tensor, progress, |first, base, inputs| {
        let z = base.expect("sce has a base");
        for e in 0..z.len() {
            sce.selected(z, inputs, first, e, &mut vectors);
            sums.iter_mut().zip(&vectors).for_each(|(sum, &d)| sum.add([s.h(d as f32 * d as f32)]));
        }
    })?;
    let means: Vec<f32> = sums.iter().map(|sum| s.h(sum.finish() / n as f32)).collect();
    let total = s.h(row_sum(means.iter().copied()));
    Ok(if total.abs() < 1e-6 {
        vec![f64::from(s.h(1.0 / k as f32)); k]
    } else {
        means.iter().map(|m| f64::from(s.h(m / total))).collect()
    })
}

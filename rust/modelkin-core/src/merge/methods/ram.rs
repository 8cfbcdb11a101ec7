//! RAM and RAM+ (tensor-local), mergekit's `ram` and `ramplus_tl`: task-vector entries above
//! `epsilon` in magnitude count as contributions; an entry only one model contributes is kept
//! whole (RAM+: scaled by that model's λ), one several contribute is averaged over them.
//!
//! λᵢ = 1 + r·clamp(sharedᵢ / max(uniqueᵢ, ε), 0, α), from how many of model i's contributions the
//! tensor shares with other models and how many are its own; torch computes it in float32.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::job::{no_base, Compute, MergeJob};
use crate::merge::engine::source::{with_block, Resolved, BLOCK};
use crate::merge::torch::half_ops::{Bf16Rounding, F16Rounding, Half, NoRounding, Rounding};

/// The contribution threshold as torch compares it: a Python float against a tensor is cast to
/// the tensor's dtype first.
fn threshold(job: &MergeJob) -> f64 {
    let eps = job.ram.epsilon;
    match job.compute {
        Compute::Float64 => eps,
        Compute::Float32 => f64::from(eps as f32),
        Compute::Bfloat16 => f64::from(Bf16Rounding::round(eps as f32)),
        Compute::Float16 => f64::from(F16Rounding::round(eps as f32)),
    }
}

/// Rounds a task-vector entry to the working dtype.
fn delta(compute: Compute, x: f64, z: f64) -> f64 {
    match compute {
        Compute::Float64 => x - z,
        Compute::Float32 => f64::from(x as f32 - z as f32),
        Compute::Bfloat16 => f64::from(Bf16Rounding::round(x as f32 - z as f32)),
        Compute::Float16 => f64::from(F16Rounding::round(x as f32 - z as f32)),
    }
}

/// RAM+'s λ per input: one sweep counting, per input, its contributions shared with another input
/// and those only it makes.
pub(crate) fn ramplus_lambdas(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<Vec<f64>> {
    tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let k = tensor.inputs.len();
    let n = tensor.numel;
    let eps = threshold(job);
    let sources = tensor.sources();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let counts = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| -> Result<Vec<(u64, u64)>> {
            progress.check()?;
            let (first, len) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
            let counts = with_block(&sources, first, len, |v| {
                let mut counts = vec![(0u64, 0u64); k];
                let mut contributes = vec![false; k];
                for (e, &z) in v[0].iter().enumerate() {
                    contributes
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, c)| *c = delta(job.compute, v[1 + i][e], z).abs() > eps);
                    let total = contributes.iter().filter(|&&c| c).count();
                    for (c, _) in counts.iter_mut().zip(&contributes).filter(|(_, &c)| c) {
                        if total > 1 {
                            c.0 += 1;
                        } else {
                            c.1 += 1;
                        }
                    }
                }
                counts
            });
            progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
            Ok(counts)
        })
        .try_reduce(
            || vec![(0, 0); k],
            |a, b| Ok(a.iter().zip(&b).map(|(x, y)| (x.0 + y.0, x.1 + y.1)).collect()),
        )?;
    let (r, alpha, eps) = (job.ram.r, job.ram.alpha, job.ram.epsilon);
    Ok(counts
        .iter()
        .map(|&(shared, unique)| {
            if job.compute == Compute::Float64 {
                let rho = shared as f64 / (unique as f64).max(eps);
                1.0 + r * rho.clamp(0.0, alpha)
            } else {
                // int64 counts / a float32 clamp: float32 throughout, with r and α as f32 scalars.
                let rho = shared as f32 / (unique as f32).max(eps as f32);
                f64::from(1.0 + r as f32 * rho.clamp(0.0, alpha as f32))
            }
        })
        .collect())
}

/// One block of RAM (`lambdas` None) or RAM+ (one λ per input), in mergekit's order of roundings.
pub(crate) fn ram_block(
    job: &MergeJob,
    lambdas: Option<&[f64]>,
    inputs: &[&[f64]],
    z: &[f64],
    merged: &mut [f64],
) {
    match job.compute.half() {
        None if job.compute == Compute::Float64 => ram_exact(job, lambdas, inputs, z, merged),
        None => ram_rounded::<NoRounding>(job, lambdas, inputs, z, merged),
        Some(Half::Bf16) => ram_rounded::<Bf16Rounding>(job, lambdas, inputs, z, merged),
        Some(Half::F16) => ram_rounded::<F16Rounding>(job, lambdas, inputs, z, merged),
    }
}

fn ram_exact(job: &MergeJob, lambdas: Option<&[f64]>, inputs: &[&[f64]], z: &[f64], merged: &mut [f64]) {
    let eps = job.ram.epsilon;
    for (e, out) in merged.iter_mut().enumerate() {
        let deltas = inputs.iter().map(|x| x[e] - z[e]);
        let count = deltas.clone().filter(|d| d.abs() > eps).count();
        let sum: f64 = deltas
            .enumerate()
            .filter(|(_, d)| d.abs() > eps)
            .map(|(i, d)| if count == 1 { d * lambdas.map_or(1.0, |l| l[i]) } else { d / count as f64 })
            .sum();
        *out = z[e] + sum;
    }
}

/// torch's steps in the working dtype `R` (f32 for float32): the shared entries divided by the
/// count and rounded; RAM's unique entries as they are, RAM+'s promoted to float32 by its
/// float32 λ (the sum and the result then stay float32, rounded to the output dtype once).
fn ram_rounded<R: Rounding>(
    job: &MergeJob,
    lambdas: Option<&[f64]>,
    inputs: &[&[f64]],
    z: &[f64],
    merged: &mut [f64],
) {
    let h = R::round;
    let eps = threshold(job) as f32;
    let lambdas: Option<Vec<f32>> = lambdas.map(|l| l.iter().map(|&v| v as f32).collect());
    let mut deltas = vec![0.0f32; inputs.len()];
    for (e, out) in merged.iter_mut().enumerate() {
        let zb = z[e] as f32;
        deltas.iter_mut().zip(inputs).for_each(|(d, x)| *d = h(x[e] as f32 - zb));
        // NaN compares false, so it never contributes, as in torch.
        let count = deltas.iter().filter(|d| d.abs() > eps).count();
        let mut sum = 0.0f32;
        for (i, &d) in deltas.iter().enumerate() {
            if d.abs() <= eps || d.is_nan() {
                continue;
            }
            sum += match (&lambdas, count) {
                (Some(l), 1) => d * l[i],
                (None, 1) => d,
                _ => h(d / count as f32),
            };
        }
        *out = f64::from(if lambdas.is_some() { zb + sum } else { h(zb + h(sum)) });
    }
}

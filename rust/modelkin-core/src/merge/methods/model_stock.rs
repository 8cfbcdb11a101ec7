//! Model Stock's interpolation factors: t = N·cosθ / (1 + (N − 1)·cosθ) from the mean pairwise
//! cosine of the task vectors, per tensor or (`filter_wise`) per row, with mergekit's float32 and
//! half-precision reductions outside float64.

use std::sync::atomic::Ordering;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::job::{no_base, Compute, MergeJob};
use crate::merge::engine::source::{with_block, Resolved};
use crate::merge::engine::sums::gram;
use crate::merge::torch::float32;
use crate::merge::torch::half_ops::Half;
use crate::merge::torch::threads::torch_threads;

/// Model Stock: t = N·cosθ / (1 + (N − 1)·cosθ) from the mean pairwise cosine of task vectors
/// (t = 0 where the denominator vanishes), each step rounded as mergekit's working dtype.
pub(crate) fn factors(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<(f64, f64)> {
    tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let k = tensor.inputs.len();
    let (gram, norms) = match job.compute {
        Compute::Float64 => {
            let gram = gram(tensor, progress)?;
            let norms = (0..k).map(|i| gram[i * k + i].sqrt()).collect();
            (gram, norms)
        }
        _ => float32_task_vector_dots(tensor, job.compute.half(), progress)?,
    };
    Ok(stock_mix(job, k, &gram, &norms))
}

/// Model Stock's (1 − t, t) from the task vectors' dot products and norms.
fn stock_mix(job: &MergeJob, k: usize, gram: &[f64], norms: &[f64]) -> (f64, f64) {
    // Each step rounded to the working dtype; reductions (the mean) accumulate in f32 first.
    let half = job.compute.half();
    let f32r = job.compute.rounding();
    let r = |v: f64| half.map_or(f32r(v), |h| h.load(v));
    let mut cosines = Vec::new();
    for i in 0..k {
        for j in i + 1..k {
            let norm_product = r(r(norms[i]) * r(norms[j])).max(r(1e-6));
            cosines.push(r(r(gram[i * k + j]) / norm_product).clamp(-1.0, 1.0));
        }
    }
    // torch's mean of a half tensor divides the f32 sum and rounds once.
    let sum = cosines.iter().fold(0.0, |sum, c| f32r(sum + c));
    let cos = r(f32r(sum / cosines.len().max(1) as f64));
    let count = k as f64;
    let denominator = r(1.0 + r((count - 1.0) * cos));
    let t = if denominator.abs() < 1e-6 { 0.0 } else { r(r(count * cos) / denominator) };
    (r(1.0 - t), t)
}

/// Model Stock with `filter_wise: true`: one (1 − t, t) per row along the last axis, from the
/// rows' norms and dot products (torch's per-row float32 reductions outside float64). Rows are
/// finished in order during one sequential sweep, so only one row's accumulators are held.
pub(crate) fn row_factors(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<Vec<(f64, f64)>> {
    tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let k = tensor.inputs.len();
    let n = tensor.numel;
    let cols = tensor.shape.last().copied().unwrap_or(1).max(1);
    let half = job.compute.half();
    let exact = job.compute == Compute::Float64;
    let h = |v: f32| half.map_or(v, |h| h.round(v));
    let sources = tensor.sources();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let fresh_norms = || vec![float32::LaneNorm::new(cols); k];
    let fresh_dots = || vec![float32::TorchSum::new(cols, 1); k * k];
    let (mut norms, mut dots) = (fresh_norms(), fresh_dots());
    let mut exact_gram = vec![0.0f64; k * k];
    let mut out = Vec::with_capacity(n / cols);
    let mut deltas: Vec<Vec<f64>> = vec![Vec::new(); k];
    for first in (0..n).step_by(tensor.block) {
        progress.check()?;
        let len = tensor.block.min(n - first);
        with_block(&sources, first, len, |v| {
            for (delta, x) in deltas.iter_mut().zip(&v[1..]) {
                delta.clear();
                delta.extend(x.iter().zip(v[0]).map(|(x, z)| {
                    if exact {
                        x - z
                    } else {
                        f64::from(h(*x as f32 - *z as f32))
                    }
                }));
            }
        });
        let mut at = 0;
        while at < len {
            let row_end = ((first + at) / cols + 1) * cols;
            let end = (row_end - first).min(len);
            for i in 0..k {
                let a = &deltas[i][at..end];
                if exact {
                    for j in i..k {
                        exact_gram[i * k + j] +=
                            a.iter().zip(&deltas[j][at..end]).map(|(x, y)| x * y).sum::<f64>();
                    }
                } else {
                    norms[i].add(a.iter().map(|v| *v as f32));
                    for j in i + 1..k {
                        let b = &deltas[j][at..end];
                        dots[i * k + j].add(a.iter().zip(b).map(|(x, y)| h(*x as f32 * *y as f32)));
                    }
                }
            }
            if first + end == row_end {
                let (gram, row_norms): (Vec<f64>, Vec<f64>) = if exact {
                    let norms = (0..k).map(|i| exact_gram[i * k + i].sqrt()).collect();
                    (std::mem::replace(&mut exact_gram, vec![0.0; k * k]), norms)
                } else {
                    let gram = dots.iter().map(|d| f64::from(d.finish())).collect();
                    let finished = norms.iter().map(|m| f64::from(m.finish())).collect();
                    (norms, dots) = (fresh_norms(), fresh_dots());
                    (gram, finished)
                };
                out.push(stock_mix(job, k, &gram, &row_norms));
            }
            at = end;
        }
        progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
    }
    Ok(out)
}

/// The task vectors' pairwise dot products and norms as mergekit takes them in float32: each a
/// torch float32 reduction over the whole tensor in order, so this sweep is sequential.
///
/// With half arithmetic each difference and product is rounded to the half type first (the
/// reductions still accumulate in f32, as torch's do).
fn float32_task_vector_dots(
    tensor: &Resolved,
    half: Option<Half>,
    progress: &Progress,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let h = |v: f32| half.map_or(v, |h| h.round(v));
    let k = tensor.inputs.len();
    let n = tensor.numel;
    let sources = tensor.sources();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let threads = torch_threads();
    let mut norms = vec![float32::LaneNorm::new(n); k];
    let mut dots = vec![float32::TorchSum::new(n, threads); k * k];
    let mut deltas: Vec<Vec<f32>> = vec![Vec::new(); k];
    for first in (0..n).step_by(tensor.block) {
        progress.check()?;
        let len = tensor.block.min(n - first);
        with_block(&sources, first, len, |v| {
            for (delta, x) in deltas.iter_mut().zip(&v[1..]) {
                delta.clear();
                delta.extend(x.iter().zip(v[0]).map(|(x, z)| h(*x as f32 - *z as f32)));
            }
        });
        for (norm, delta) in norms.iter_mut().zip(&deltas) {
            norm.add(delta.iter().copied());
        }
        for i in 0..k {
            for j in i + 1..k {
                dots[i * k + j].add(deltas[i].iter().zip(&deltas[j]).map(|(a, b)| h(a * b)));
            }
        }
        progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
    }
    let dots = dots.iter().map(|d| f64::from(d.finish())).collect();
    Ok((dots, norms.iter().map(|norm| f64::from(norm.finish())).collect()))
}

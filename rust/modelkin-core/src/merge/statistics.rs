//! Whole-tensor statistics a method needs before its output pass, each taken in a streamed pass:
//! magnitude thresholds (radix select), L1 norms of pruned task vectors, norms and cosines.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use multiversion::multiversion;
use rayon::prelude::*;

use super::{
    float32, magnitude_bits, no_base, sort_order, uniform, with_block, Compute, MergeJob, Method, Resolved,
    Source, Sparsification,
};
use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use crate::kinship::Progress;

/// Per-input pruning rule of one tensor.
#[derive(Debug, Clone)]
pub(super) enum Keep {
    All,
    None,
    /// |δ| (as f32 bits) within [low, high).
    Range {
        low: u32,
        high: u32,
    },
    /// Element e is kept when bit e of the tensor-wide bitmask is set.
    Mask(Arc<Vec<u64>>),
    /// Bernoulli(density) from the counter-based generator.
    Random {
        density: f64,
    },
    /// Bernoulli with a probability rising with the magnitude's rank within its row (DELLA).
    Della {
        density: f64,
        epsilon: f64,
    },
}

/// What the output pass of one tensor needs to know.
pub(super) struct TensorStatistics {
    pub keep: Vec<Keep>,
    /// Per-input factor applied to kept entries (the L1 rescale of DARE and DELLA).
    pub scale: Vec<f64>,
    /// (s0, s1): output = s0·base + s1·other (slerp), or (1 − t, t) for model stock.
    pub mix: (f64, f64),
    /// SCE: entries whose variance across task vectors is at least this (f32 bits) are kept.
    pub variance_floor: Option<u32>,
    /// SCE: per-input weights from the task vectors' energy.
    pub weights: Vec<f64>,
    /// Spherical methods: output = base_coefficient·base + Σ coefficients[i]·input[i].
    pub combination: Option<(f64, Vec<f64>)>,
}

/// Which entries of a block of one input survive pruning; `None` keeps all.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn keep_mask(
    job: &MergeJob,
    tensor_index: usize,
    input: usize,
    keep: &Keep,
    x: &[f64],
    z: &[f64],
    first: usize,
    row: usize,
) -> Option<Vec<bool>> {
    let len = x.len();
    match *keep {
        Keep::All => None,
        Keep::None => Some(vec![false; len]),
        Keep::Range { low, high } => Some(
            x.iter()
                .zip(z)
                .map(|(x, z)| {
                    let bits = magnitude_bits(*x, *z);
                    bits >= low && bits < high
                })
                .collect(),
        ),
        Keep::Mask(ref kept) => {
            // `first` is a multiple of 64 except in the rare last block of a tiny tensor.
            let mut mask = Vec::with_capacity(len);
            if first.is_multiple_of(64) {
                for word in &kept[first / 64..(first + len).div_ceil(64)] {
                    mask.extend((0..64).map(|j| word >> j & 1 == 1));
                }
                mask.truncate(len);
            } else {
                mask.extend((first..first + len).map(|e| kept[e / 64] >> (e % 64) & 1 == 1));
            }
            Some(mask)
        }
        Keep::Random { density } => {
            Some((0..len).map(|e| uniform(job.seed, tensor_index, input, first + e) < density).collect())
        }
        Keep::Della { density, epsilon } => {
            let mut mask = vec![false; len];
            let mut order: Vec<usize> = Vec::with_capacity(row);
            for start in (0..len).step_by(row) {
                let end = (start + row).min(len);
                let magnitudes: Vec<u32> = (start..end).map(|e| magnitude_bits(x[e], z[e])).collect();
                order.clear();
                order.extend(0..end - start);
                order.sort_by_key(|&e| (magnitudes[e], e));
                let span = (end - start).saturating_sub(1).max(1) as f64;
                for (rank, &e) in order.iter().enumerate() {
                    let p = (density - epsilon) + rank as f64 / span * 2.0 * epsilon;
                    mask[start + e] = uniform(job.seed, tensor_index, input, first + start + e) < p;
                }
            }
            Some(mask)
        }
    }
}

impl TensorStatistics {
    pub(super) fn measure(
        job: &MergeJob,
        index: usize,
        tensor: &Resolved,
        pool: &sort_order::EntryPool,
        progress: &Progress,
    ) -> Result<Self> {
        let k = tensor.inputs.len();
        let mut stats = TensorStatistics {
            keep: vec![Keep::All; k],
            scale: vec![1.0; k],
            mix: (0.0, 1.0),
            variance_floor: None,
            weights: tensor.recipe.inputs.iter().map(|i| i.weight).collect(),
            combination: None,
        };
        let n = tensor.numel;
        if let Some(sparsification) = job.method.sparsification() {
            let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
            // Ascending magnitude ranks each input's pruning needs; all found in one pair of passes.
            let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); k];
            // The same pruning as a run of positions in torch's sort order (descending or not).
            let mut runs: Vec<Option<(bool, Range<usize>)>> = vec![None; k];
            for (i, input) in tensor.recipe.inputs.iter().enumerate() {
                if input.density >= 1.0 {
                    continue;
                }
                match sparsification {
                    Sparsification::Magnitude => {
                        // mergekit keeps at least one element of a non-empty tensor.
                        let keep = ((input.density * n as f64) as usize).max(1).min(n);
                        wanted[i] = vec![n - keep];
                        runs[i] = Some((true, 0..keep));
                    }
                    Sparsification::MagnitudeOutliers => {
                        // mergekit 0.1.5 keeps ascending ranks [n_bot, n_bot + target), with
                        // n_bot = max(0, n − target − n_top).
                        let target = ((input.density * n as f64) as usize).min(n);
                        let top = (input.gamma * n as f64) as usize;
                        let bottom = n.saturating_sub(target + top);
                        if target == 0 {
                            stats.keep[i] = Keep::None;
                        } else if bottom + target >= n {
                            wanted[i] = vec![bottom];
                        } else {
                            wanted[i] = vec![bottom, bottom + target];
                        }
                        if target > 0 {
                            runs[i] = Some((false, bottom..(bottom + target).min(n)));
                        }
                    }
                    Sparsification::Random => stats.keep[i] = Keep::Random { density: input.density },
                    Sparsification::DellaMagprune => {
                        if input.density - input.epsilon <= 0.0 || input.density + input.epsilon >= 1.0 {
                            return Err(Error::InvalidArgument(format!(
                                "tensor '{}': della needs density ± epsilon inside (0, 1), got {} ± {}",
                                tensor.recipe.name, input.density, input.epsilon
                            )));
                        }
                        stats.keep[i] = Keep::Della { density: input.density, epsilon: input.epsilon };
                    }
                }
            }
            let entry_bytes = 8 * n as u64;
            if n <= u32::MAX as usize && entry_bytes <= job.sort_order_bytes {
                // Within the memory budget, ties at the boundaries break exactly as mergekit's
                // argsort breaks them; as many inputs at once as the budget holds.
                let ranked: Vec<usize> = (0..k).filter(|&i| runs[i].is_some()).collect();
                let at_once = (job.sort_order_bytes / entry_bytes.max(1)).max(1) as usize;
                for group in ranked.chunks(at_once) {
                    let found: Vec<Keep> = group
                        .par_iter()
                        .map(|&i| {
                            let (descending, run) = runs[i].clone().expect("ranked");
                            let mut entries = pool.take(n);
                            let keep = sorted_run(
                                base,
                                &tensor.inputs[i],
                                tensor.block,
                                descending,
                                run,
                                &mut entries,
                                progress,
                            );
                            pool.give(entries);
                            keep
                        })
                        .collect::<Result<_>>()?;
                    for (&i, keep) in group.iter().zip(found) {
                        stats.keep[i] = keep;
                    }
                }
            } else if wanted.iter().any(|w| !w.is_empty()) {
                let sources = tensor.sources();
                let boundaries =
                    order_statistics(&sources, tensor.block, n, &wanted, progress, |first, len, i, keys| {
                        magnitude_keys(base, &tensor.inputs[i], first, len, keys)
                    })?;
                for (i, found) in boundaries.iter().enumerate() {
                    match found[..] {
                        [low] => stats.keep[i] = Keep::Range { low: low.keep_from(), high: u32::MAX },
                        [low, high] => {
                            stats.keep[i] = Keep::Range { low: low.keep_from(), high: high.drop_from() }
                        }
                        _ => {}
                    }
                }
            }
            for i in 0..k {
                if job.rescale && matches!(stats.keep[i], Keep::Random { .. } | Keep::Della { .. }) {
                    stats.scale[i] = l1_rescale(job, index, i, &stats.keep[i], tensor, progress)?;
                }
            }
        }
        match job.method {
            Method::Slerp => stats.mix = slerp_mix(job, tensor, progress)?,
            Method::ModelStock => stats.mix = model_stock_factors(job, tensor, progress)?,
            Method::Nuslerp | Method::Multislerp | Method::Karcher => {
                let gram = gram(tensor, progress)?;
                let weights = stats.weights.clone();
                let coefficients = match job.method {
                    Method::Nuslerp => crate::merge::spherical::nuslerp(&gram, &weights),
                    Method::Multislerp => {
                        crate::merge::spherical::multislerp(&gram, &weights, &job.spherical).map_err(|e| {
                            Error::InvalidArgument(format!("tensor '{}': {e}", tensor.recipe.name))
                        })?
                    }
                    _ => crate::merge::spherical::karcher(&gram, &job.spherical),
                };
                // Task vectors (with a base): out = z + Σ cᵢ(xᵢ − z).
                let base = if tensor.base.is_some() { 1.0 - coefficients.iter().sum::<f64>() } else { 0.0 };
                stats.combination = Some((base, coefficients));
            }
            Method::Sce => sce_statistics(job, tensor, &mut stats, progress)?,
            _ => {}
        }
        Ok(stats)
    }
}

/// Elements per chunk of mergekit's float32 slerp norms.
const SLERP_CHUNK: usize = 1 << 20;

/// Slerp's (s0, s1) for one tensor: the cosine of base and other, then [`slerp_factors`].
fn slerp_mix(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<(f64, f64)> {
    const EPS: f64 = 1e-8;
    let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let sources = [base, &tensor.inputs[0]];
    let n = tensor.numel;
    let norm = |norm: f64| if norm > EPS { norm } else { 1.0 };
    let dot = match job.compute {
        Compute::Float64 => {
            let [aa, bb, ab] = sums_over(&sources, tensor.block, n, progress, |_, v| {
                let (a, b) = (v[0], v[1]);
                [
                    a.iter().map(|x| x * x).sum(),
                    b.iter().map(|x| x * x).sum(),
                    a.iter().zip(b).map(|(x, y)| x * y).sum(),
                ]
            })?;
            ab / (norm(aa.sqrt()) * norm(bb.sqrt()))
        }
        Compute::Float32 => {
            // mergekit divides by torch's float32 norms (chunked), then sums x/|x| · y/|y| per chunk
            // with torch's float32 sum, and sums the chunks' results.
            let norms = float32::chunked_norms(&sources, n, SLERP_CHUNK, progress)?;
            let (na, nb) = (norm(norms[0]) as f32, norm(norms[1]) as f32);
            f64::from(float32::chunked_dot(&sources, n, SLERP_CHUNK, (na, nb), progress)?)
        }
    };
    Ok(slerp_factors(tensor.recipe.t, dot, job.compute.rounding()))
}

/// mergekit's slerp factors (s0 for the base, s1 for the other) from the cosine `dot`; lerp when
/// nearly colinear. `round` rounds each step to the working precision, as mergekit does.
fn slerp_factors(t: f64, dot: f64, round: fn(f64) -> f64) -> (f64, f64) {
    const DOT_THRESHOLD: f64 = 0.9995;
    let dot = round(dot.clamp(-1.0, 1.0));
    let t = round(t);
    if dot.abs() > DOT_THRESHOLD {
        return (round(1.0 - t), t);
    }
    let theta = round(dot.acos());
    let sin_theta = round(theta.sin());
    (
        round(round(round(round(1.0 - t) * theta).sin()) / sin_theta),
        round(round(round(t * theta).sin()) / sin_theta),
    )
}

/// Model Stock: t = N·cosθ / (1 + (N − 1)·cosθ) from the mean pairwise cosine of task vectors
/// (t = 0 where the denominator vanishes), each step rounded as mergekit's working dtype.
fn model_stock_factors(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<(f64, f64)> {
    tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let k = tensor.inputs.len();
    let (gram, norms) = match job.compute {
        Compute::Float64 => {
            let gram = gram(tensor, progress)?;
            let norms = (0..k).map(|i| gram[i * k + i].sqrt()).collect();
            (gram, norms)
        }
        Compute::Float32 => float32_task_vector_dots(tensor, progress)?,
    };
    let r = job.compute.rounding();
    let mut cosines = Vec::new();
    for i in 0..k {
        for j in i + 1..k {
            let norm_product = r(norms[i] * norms[j]).max(r(1e-6));
            cosines.push(r(r(gram[i * k + j]) / norm_product).clamp(-1.0, 1.0));
        }
    }
    let cos = r(cosines.iter().fold(0.0, |sum, c| r(sum + c)) / cosines.len().max(1) as f64);
    let count = k as f64;
    let denominator = r(1.0 + r((count - 1.0) * cos));
    let t = if denominator.abs() < 1e-6 { 0.0 } else { r(r(count * cos) / denominator) };
    Ok((r(1.0 - t), t))
}

/// The task vectors' pairwise dot products and norms as mergekit takes them in float32: each a
/// torch float32 reduction over the whole tensor in order, so this sweep is sequential.
fn float32_task_vector_dots(tensor: &Resolved, progress: &Progress) -> Result<(Vec<f64>, Vec<f64>)> {
    let k = tensor.inputs.len();
    let n = tensor.numel;
    let sources = tensor.sources();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let threads = float32::torch_threads();
    let mut norms = vec![float32::LaneNorm::new(n); k];
    let mut dots = vec![float32::TorchSum::new(n, threads); k * k];
    let mut deltas: Vec<Vec<f32>> = vec![Vec::new(); k];
    for first in (0..n).step_by(tensor.block) {
        progress.check()?;
        let len = tensor.block.min(n - first);
        with_block(&sources, first, len, |v| {
            for (delta, x) in deltas.iter_mut().zip(&v[1..]) {
                delta.clear();
                delta.extend(x.iter().zip(v[0]).map(|(x, z)| *x as f32 - *z as f32));
            }
        });
        for (norm, delta) in norms.iter_mut().zip(&deltas) {
            norm.add(delta.iter().copied());
        }
        for i in 0..k {
            for j in i + 1..k {
                dots[i * k + j].add(deltas[i].iter().zip(&deltas[j]).map(|(a, b)| a * b));
            }
        }
        progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
    }
    let dots = dots.iter().map(|d| f64::from(d.finish())).collect();
    Ok((dots, norms.iter().map(|norm| f64::from(norm.finish())).collect()))
}

/// The Gram matrix Σ vᵢ·vⱼ of the inputs, or of their task vectors when there is a base.
fn gram(tensor: &Resolved, progress: &Progress) -> Result<Vec<f64>> {
    let k = tensor.inputs.len();
    let relative = tensor.base.is_some();
    sums_over_vec(&tensor.sources(), tensor.block, tensor.numel, k * k, progress, |_, v, out| {
        add_gram_block(v, k, relative, out)
    })
}

/// Adds one block's Σ vᵢ·vⱼ to `out` (k×k); with `relative`, v[0] is the base and the products
/// are of the task vectors v[i + 1] − v[0].
fn add_gram_block(v: &[&[f64]], k: usize, relative: bool, out: &mut [f64]) {
    let offset = usize::from(relative);
    for i in 0..k {
        for j in i..k {
            let (x, y) = (v[i + offset], v[j + offset]);
            let dot: f64 = if relative {
                x.iter().zip(y).zip(v[0]).map(|((a, b), z)| (a - z) * (b - z)).sum()
            } else {
                x.iter().zip(y).map(|(a, b)| a * b).sum()
            };
            out[i * k + j] += dot;
            if j != i {
                out[j * k + i] += dot;
            }
        }
    }
}

/// Population variance across the task vectors at one element, as f32 bits (mergekit's ranking).
pub(super) fn variance_bits(v: &[&[f64]], e: usize) -> u32 {
    let k = (v.len() - 1) as f64;
    let deltas = v[1..].iter().map(|x| x[e] - v[0][e]);
    let mean = deltas.clone().sum::<f64>() / k;
    let variance = deltas.map(|d| (d - mean) * (d - mean)).sum::<f64>() / k;
    (variance as f32).to_bits()
}

/// SCE: the variance threshold of `select_topk`, then weights ∝ mean squared (selected) task vector.
fn sce_statistics(
    job: &MergeJob,
    tensor: &Resolved,
    stats: &mut TensorStatistics,
    progress: &Progress,
) -> Result<()> {
    tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let k = tensor.inputs.len();
    let n = tensor.numel;
    let all = tensor.sources();
    let topk = tensor.recipe.select_topk;
    if topk <= 0.0 {
        stats.variance_floor = Some(u32::MAX);
    } else if topk < 1.0 {
        let [zeros] = sums_over(&all, tensor.block, n, progress, |_, v| {
            [(0..v[0].len()).filter(|&e| variance_bits(v, e) == 0).count() as f64]
        })?;
        let selected = ((n - zeros as usize) as f64 * topk) as usize;
        stats.variance_floor = Some(if selected == 0 {
            u32::MAX
        } else {
            let found = order_statistics(
                &all,
                tensor.block,
                n,
                &[vec![n - selected]],
                progress,
                |first, len, _, keys| {
                    with_block(&all, first, len, |v| keys.extend((0..len).map(|e| variance_bits(v, e))))
                },
            )?;
            found[0][0].keep_from()
        });
    }
    let floor = stats.variance_floor;
    let energy = sums_over_vec(&all, tensor.block, n, k, progress, |_, v, out| {
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = (0..v[0].len())
                .filter(|&e| floor.is_none_or(|f| variance_bits(v, e) >= f))
                .map(|e| (v[i + 1][e] - v[0][e]).powi(2))
                .sum();
        }
    })?;
    let means: Vec<f64> = energy.iter().map(|s| s / n as f64).collect();
    let total: f64 = means.iter().sum();
    stats.weights =
        if total.abs() < 1e-6 { vec![1.0 / k as f64; k] } else { means.iter().map(|m| m / total).collect() };
    Ok(())
}

/// The L1 rescale of a randomly pruned task vector: ‖δ‖₁ / ‖δ·mask‖₁, or 1 when either is
/// below mergekit's 1e-7.
fn l1_rescale(
    job: &MergeJob,
    index: usize,
    input: usize,
    keep: &Keep,
    tensor: &Resolved,
    progress: &Progress,
) -> Result<f64> {
    let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
    let [before, after] =
        sums_over(&[base, &tensor.inputs[input]], tensor.block, tensor.numel, progress, |first, v| {
            let mask = keep_mask(job, index, input, keep, v[1], v[0], first, tensor.row);
            let mut sums = [0.0, 0.0];
            for (e, (z, x)) in v[0].iter().zip(v[1]).enumerate() {
                let magnitude = (x - z).abs();
                sums[0] += magnitude;
                if mask.as_ref().is_none_or(|m| m[e]) {
                    sums[1] += magnitude;
                }
            }
            sums
        })?;
    Ok(if before < 1e-7 || after < 1e-7 { 1.0 } else { before / after })
}

/// Sums computed block by block over the decoded sources, merged in block order.
fn sums_over<const S: usize>(
    sources: &[&Source],
    block: usize,
    n: usize,
    progress: &Progress,
    block_sums: impl Fn(usize, &[&[f64]]) -> [f64; S] + Sync,
) -> Result<[f64; S]> {
    let parts = sums_over_vec(sources, block, n, S, progress, |first, v, out| {
        out.copy_from_slice(&block_sums(first, v))
    })?;
    Ok(std::array::from_fn(|i| parts[i]))
}

fn sums_over_vec(
    sources: &[&Source],
    block: usize,
    n: usize,
    width: usize,
    progress: &Progress,
    block_sums: impl Fn(usize, &[&[f64]], &mut [f64]) + Sync,
) -> Result<Vec<f64>> {
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            progress.check()?;
            let first = b * block;
            let len = block.min(n - first);
            let mut out = vec![0.0; width];
            with_block(sources, first, len, |views| block_sums(first, views, &mut out));
            progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
            Ok(out)
        })
        .collect::<Result<_>>()?;
    let mut total = vec![0.0; width];
    for part in parts {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    Ok(total)
}

/// The entries torch's CPU sort of |δ| (descending or ascending) puts at positions `run`, as a
/// bitmask over the tensor: every |δ| is packed with its index into `entries` (one per element),
/// and the sort is replayed towards the run's ends ([`sort_order::arrange`]).
fn sorted_run(
    base: &Source,
    input: &Source,
    block: usize,
    descending: bool,
    run: Range<usize>,
    entries: &mut [u64],
    progress: &Progress,
) -> Result<Keep> {
    let n = entries.len();
    let bytes_per_element = (base.dtype.size() + input.dtype.size()) as u64;
    entries.par_chunks_mut(block).enumerate().try_for_each(|(b, out)| -> Result<()> {
        progress.check()?;
        sort_entries(base, input, b * block, descending, out);
        progress.done.fetch_add(out.len() as u64 * bytes_per_element, Ordering::Relaxed);
        Ok(())
    })?;
    let mut boundaries: Vec<usize> = [run.start, run.end].into_iter().filter(|&b| 0 < b && b < n).collect();
    boundaries.dedup();
    sort_order::arrange(entries, &boundaries);
    progress.check()?;
    // The replay stands in for the second histogram pass of the progress total.
    progress.done.fetch_add(n as u64 * bytes_per_element, Ordering::Relaxed);
    // Marks the smaller side: the run's entries on a clear mask, or the rest on a full one.
    let outside = run.start + (n - run.end);
    let (marked, fill) =
        if run.len() <= outside { (&entries[run.clone()], 0u64) } else { (&entries[..run.start], u64::MAX) };
    let mut kept = vec![fill; n.div_ceil(64)];
    let mut flip = |entries: &[u64]| {
        for &entry in entries {
            let element = entry as u32 as usize;
            kept[element / 64] ^= 1 << (element % 64);
        }
    };
    flip(marked);
    if fill != 0 {
        flip(&entries[run.end..]);
    }
    Ok(Keep::Mask(Arc::new(kept)))
}

/// Packs |x − z| of elements `first..first + out.len()` (f32 bits, complemented when sorting
/// descending: descending order by |δ| is ascending order by its complement) with each index.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn sort_entries(base: &Source, input: &Source, first: usize, descending: bool, out: &mut [u64]) {
    let flip = if descending { u32::MAX } else { 0 };
    let pack = |e: usize, bits: u32| (u64::from(bits ^ flip) << 32) | (first + e) as u64;
    if base.dtype == FloatDtype::BF16 && input.dtype == FloatDtype::BF16 {
        let z = base.model.raw_bytes(base.entry, base.dtype, first, out.len());
        let x = input.model.raw_bytes(input.entry, input.dtype, first, out.len());
        let widen = |b: &[u8]| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
        for (e, (entry, (x, z))) in out.iter_mut().zip(x.chunks_exact(2).zip(z.chunks_exact(2))).enumerate() {
            *entry = pack(e, (widen(x) - widen(z)).abs().to_bits());
        }
    } else {
        with_block(&[base, input], first, out.len(), |v| {
            for (e, (entry, (x, z))) in out.iter_mut().zip(v[1].iter().zip(v[0])).enumerate() {
                *entry = pack(e, magnitude_bits(*x, *z));
            }
        });
    }
}

/// The value at an order-statistic rank, with the counts that place the rank inside its ties.
#[derive(Debug, Clone, Copy)]
pub(super) struct Boundary {
    /// The key (f32 bits) at the rank.
    value: u32,
    /// Elements with a smaller key.
    below: u64,
    /// Elements with exactly this key.
    equal: u64,
    /// The 0-based ascending rank asked for.
    rank: u64,
}

impl Boundary {
    /// The smallest key to keep when keeping ascending ranks ≥ `rank`. Ties at the boundary go
    /// all in or all out, whichever side holds most of them: mergekit breaks them by the
    /// (arbitrary) order of an unstable sort, and all-or-nothing minimises the expected mismatch.
    fn keep_from(self) -> u32 {
        let inside = self.below + self.equal - self.rank;
        if 2 * inside >= self.equal {
            self.value
        } else {
            self.value + 1
        }
    }

    /// The first key to drop when keeping ascending ranks < `rank` (ties as in `keep_from`).
    fn drop_from(self) -> u32 {
        let inside = self.rank - self.below;
        if 2 * inside >= self.equal {
            self.value + 1
        } else {
            self.value
        }
    }
}

/// Exact order statistics of per-element keys (non-negative f32 bits) computed from the decoded
/// sources. `ranks[s]` lists the 0-based ascending ranks wanted of key set `s` (`keys(views, s,
/// out)` appends that set's keys of a block); the result holds one [`Boundary`] per rank. Two
/// streamed histogram passes (radix select on the upper, then the lower 16 bits) serve every set
/// at once, so memory stays bounded and the sources are read twice in all.
fn order_statistics(
    sources: &[&Source],
    block: usize,
    n: usize,
    ranks: &[Vec<usize>],
    progress: &Progress,
    keys: impl Fn(usize, usize, usize, &mut Vec<u32>) + Sync,
) -> Result<Vec<Vec<Boundary>>> {
    const BINS: usize = 1 << 16;
    let sets: Vec<usize> = (0..ranks.len()).filter(|&s| !ranks[s].is_empty()).collect();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    // One histogram per query: (key set, Some(upper 16 bits) to count lower bits within, or None
    // to count upper bits).
    // Sparse histograms, (bin, count) sorted by bin: magnitudes occupy few bins, and dense
    // 65536-entry results per run would be fresh memory the kernel has to zero every time.
    let histograms = |queries: &[(usize, Option<u32>)]| -> Result<Vec<Vec<(u32, u64)>>> {
        // Magnitudes crowd into a few bins, so consecutive increments of one counter would wait
        // on each other; four interleaved tables per query break that dependency chain.
        // Contiguous runs of blocks, a few per worker, each counted into one set of tables.
        let blocks = n.div_ceil(block);
        let runs = (rayon::current_num_threads() * 2).clamp(1, blocks.max(1));
        let per_query = (0..runs)
            .into_par_iter()
            .map(|run| -> Result<Vec<Vec<(u32, u64)>>> {
                HISTOGRAM_TABLES.with_borrow_mut(|counts| {
                    // Reused per thread: fresh 1 MiB tables per run would be mapped and zeroed by
                    // the kernel again and again.
                    counts.resize_with(queries.len(), || vec![0u32; 4 * BINS]);
                    let mut scratch = Vec::<u32>::new();
                    // The bins each query touched: only those are read back and cleared.
                    let mut touched = vec![(u32::MAX, 0u32); queries.len()];
                    for b in (run * blocks / runs)..((run + 1) * blocks / runs) {
                        progress.check()?;
                        let first = b * block;
                        let len = block.min(n - first);
                        for &set in &sets {
                            scratch.clear();
                            keys(first, len, set, &mut scratch);
                            for (q, &(query_set, within)) in queries.iter().enumerate() {
                                if query_set == set {
                                    count_bins(&scratch, within, &mut counts[q], &mut touched[q]);
                                }
                            }
                        }
                        progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
                    }
                    let totals = counts[..queries.len()]
                        .iter_mut()
                        .zip(&touched)
                        .map(|(t, &(low, high))| {
                            let mut sparse = Vec::new();
                            for bin in (low as usize)..=(high as usize).min(BINS - 1) {
                                let c: u64 = (0..4).map(|j| u64::from(t[j * BINS + bin])).sum();
                                (0..4).for_each(|j| t[j * BINS + bin] = 0);
                                if c > 0 {
                                    sparse.push((bin as u32, c));
                                }
                            }
                            sparse
                        })
                        .collect();
                    Ok(totals)
                })
            })
            .try_reduce(
                || vec![Vec::new(); queries.len()],
                |a, b| Ok(a.into_iter().zip(b).map(|(x, y)| merge_sparse(&x, &y)).collect()),
            )?;
        Ok(per_query)
    };
    // (bin, elements in lower bins, elements in the bin) of the bin holding `rank`.
    let locate = |counts: &[(u32, u64)], rank: u64| -> (u32, u64, u64) {
        let mut seen = 0u64;
        for &(bin, c) in counts {
            if seen + c > rank {
                return (bin, seen, c);
            }
            seen += c;
        }
        counts.last().map_or((0, 0, 0), |&(bin, c)| (bin, seen - c, c))
    };
    let high_queries: Vec<(usize, Option<u32>)> = sets.iter().map(|&s| (s, None)).collect();
    let high = histograms(&high_queries)?;
    let mut low_queries = Vec::new();
    let mut placed = Vec::new();
    for (h, &set) in sets.iter().enumerate() {
        for &rank in &ranks[set] {
            let rank = rank.min(n.saturating_sub(1)) as u64;
            let (top, below_top, _) = locate(&high[h], rank);
            low_queries.push((set, Some(top)));
            placed.push((set, rank, top, below_top));
        }
    }
    let low = histograms(&low_queries)?;
    let mut out: Vec<Vec<Boundary>> = vec![Vec::new(); ranks.len()];
    for ((set, rank, top, below_top), counts) in placed.into_iter().zip(&low) {
        let (bottom, below_bottom, equal) = locate(counts, rank - below_top);
        out[set].push(Boundary { value: (top << 16) | bottom, below: below_top + below_bottom, equal, rank });
    }
    Ok(out)
}

/// The sum of two sparse histograms sorted by bin.
fn merge_sparse(a: &[(u32, u64)], b: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(&(x, c)), Some(&(y, d))) if x == y => {
                out.push((x, c + d));
                i += 1;
                j += 1;
            }
            (Some(&(x, c)), Some(&(y, _))) if x < y => {
                out.push((x, c));
                i += 1;
            }
            (Some(&(x, c)), None) => {
                out.push((x, c));
                i += 1;
            }
            (_, Some(&(y, d))) => {
                out.push((y, d));
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    out
}

thread_local! {
    /// Per-thread histogram tables of `order_statistics`, zeroed after each use.
    static HISTOGRAM_TABLES: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends |x − z| (as f32 bits) of elements `first..first + len`. bf16 pairs are widened in
/// registers straight from the file bytes: the threshold passes read every input twice, and
/// decoding to f64 buffers first would double their cost.
fn magnitude_keys(base: &Source, input: &Source, first: usize, len: usize, keys: &mut Vec<u32>) {
    if base.dtype == FloatDtype::BF16 && input.dtype == FloatDtype::BF16 {
        let z = base.model.raw_bytes(base.entry, base.dtype, first, len);
        let x = input.model.raw_bytes(input.entry, input.dtype, first, len);
        let widen = |b: &[u8]| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
        keys.extend(
            x.chunks_exact(2).zip(z.chunks_exact(2)).map(|(x, z)| (widen(x) - widen(z)).abs().to_bits()),
        );
    } else {
        with_block(&[base, input], first, len, |v| {
            keys.extend(v[1].iter().zip(v[0]).map(|(x, z)| magnitude_bits(*x, *z)))
        });
    }
}

/// Counts keys into 65536-bin tables: their upper 16 bits into four interleaved tables (`within` =
/// None), or the lower 16 bits of the keys whose upper bits equal `within` into the first; widens
/// `touched` to the bins used.
fn count_bins(keys: &[u32], within: Option<u32>, tables: &mut [u32], touched: &mut (u32, u32)) {
    const BINS: usize = 1 << 16;
    match within {
        None => {
            let (t0, rest) = tables.split_at_mut(BINS);
            let (t1, rest) = rest.split_at_mut(BINS);
            let (t2, t3) = rest.split_at_mut(BINS);
            let quads = keys.chunks_exact(4);
            for k in quads.remainder() {
                t0[(k >> 16) as usize] += 1;
            }
            for q in quads {
                t0[(q[0] >> 16) as usize] += 1;
                t1[(q[1] >> 16) as usize] += 1;
                t2[(q[2] >> 16) as usize] += 1;
                t3[(q[3] >> 16) as usize] += 1;
            }
            let (low, high) = keys.iter().fold((u32::MAX, 0), |(l, h), k| (l.min(k >> 16), h.max(k >> 16)));
            *touched = (touched.0.min(low), touched.1.max(high));
        }
        Some(top) => {
            // Few keys fall in the boundary bin, so one table suffices here.
            for &k in keys.iter().filter(|k| *k >> 16 == top) {
                let bin = k & 0xFFFF;
                tables[bin as usize] += 1;
                *touched = (touched.0.min(bin), touched.1.max(bin));
            }
        }
    }
}

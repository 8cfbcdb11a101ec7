//! Whole-tensor statistics a method needs before its output pass: magnitude pruning (torch's sort
//! order replayed, or a streamed radix select), L1 norms of pruned task vectors, norms and cosines.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use multiversion::multiversion;
use rayon::prelude::*;

use crate::io::error::{Error, Result};
use crate::io::progress::Progress;
use crate::merge::engine::job::{no_base, Compute, MergeJob};
use crate::merge::engine::method::{Method, Sparsification};
use crate::merge::engine::source::{magnitude_bits, read_bytes, with_block, Resolved};
use crate::merge::engine::sums::{gram, sums_over};
use crate::merge::methods::fusion;
use crate::merge::methods::karcher;
use crate::merge::methods::model_stock;
use crate::merge::methods::multislerp;
use crate::merge::methods::nuslerp;
use crate::merge::methods::ram;
use crate::merge::methods::sce;
use crate::merge::methods::spherical;
use crate::merge::torch::float32;
use crate::merge::torch::radix;
use crate::merge::torch::random::uniform;
use crate::merge::torch::sort_order;
use crate::merge::torch::trig::Trig;

/// Per-input pruning rule of one tensor.
#[derive(Debug, Clone)]
pub(crate) enum Keep {
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

impl Keep {
    /// Whether the rule decides from the values (a magnitude range, DELLA's ranks) rather than
    /// from what the statistics pass stored ([`value_free_mask`] answers the others).
    pub(super) fn reads_values(&self) -> bool {
        matches!(self, Keep::Range { .. } | Keep::Della { .. })
    }
}

/// What the output pass of one tensor needs to know.
pub(crate) struct TensorStatistics {
    pub keep: Vec<Keep>,
    /// Per-input factor applied to kept entries (the L1 rescale of DARE and DELLA).
    pub scale: Vec<f64>,
    /// (s0, s1): output = s0·base + s1·other (slerp), or (1 − t, t) for model stock.
    pub mix: (f64, f64),
    /// model_stock `filter_wise`: (1 − t, t) per row along the last axis.
    pub mix_rows: Option<Vec<(f64, f64)>>,
    /// SCE: the variance threshold and the task vectors' weights.
    pub sce: Option<sce::Sce>,
    /// SCE: per-input weights from the task vectors' energy.
    pub weights: Vec<f64>,
    /// Spherical methods: output = base_coefficient·base + Σ `coefficients[i]`·`input[i]`.
    pub combination: Option<(f64, Vec<f64>)>,
    /// nuslerp without `nuslerp_flatten`: the two coefficients per vector (see [`vector_of`]).
    pub vector_combinations: Option<Vec<[f64; 2]>>,
    /// arcee_fusion: the rows' KL divergences and the importance threshold.
    pub fusion: Option<fusion::Fusion>,
    /// multislerp in a working dtype (not float64): its reductions, in torch's steps.
    pub multislerp: Option<multislerp::Multislerp>,
    /// nuslerp in a working dtype (see [`nuslerp::applies`]): each run's factors.
    pub nuslerp: Option<nuslerp::Nuslerp>,
    /// karcher in a half dtype (see [`karcher::applies`]): the merged tensor's mean direction.
    pub karcher: Option<karcher::Karcher>,
}

/// The pruning mask of a rule that needs no values (all, none, a replayed-sort bitmask, random),
/// or `None` for a rule that reads them (a magnitude range, DELLA). `len` elements from `first`.
pub(super) fn value_free_mask(
    job: &MergeJob,
    tensor_index: usize,
    input: usize,
    keep: &Keep,
    first: usize,
    len: usize,
) -> Option<Option<Vec<bool>>> {
    match *keep {
        Keep::All => Some(None),
        Keep::None => Some(Some(vec![false; len])),
        Keep::Mask(ref kept) => {
            // Magnitude pruning's blocks are BLOCK long, so each starts on a word of the mask.
            debug_assert!(first.is_multiple_of(64));
            Some(Some(expand_bits(&kept[first / 64..], len)))
        }
        Keep::Random { density } => Some(Some(
            (0..len).map(|e| uniform(job.seed, tensor_index, input, first + e) < density).collect(),
        )),
        Keep::Range { .. } | Keep::Della { .. } => None,
    }
}

/// Bit j of a byte as the j-th of eight booleans, for every byte value.
const SPREAD: [[bool; 8]; 256] = {
    let mut table = [[false; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut bit = 0;
        while bit < 8 {
            table[byte][bit] = byte >> bit & 1 == 1;
            bit += 1;
        }
        byte += 1;
    }
    table
};

/// The first `len` bits of `words` (bit j of word w is element 64·w + j) as booleans, eight at a
/// time from a table: the merge reads a magnitude mask once per block and input, and a bit-by-bit
/// loop over a freshly zeroed vector cost more than the merge's arithmetic on it.
fn expand_bits(words: &[u64], len: usize) -> Vec<bool> {
    // Byte b of the mask: bits 8b..8b + 8, in word b / 8.
    let byte = |b: usize| usize::from((words[b / 8] >> (8 * (b % 8))) as u8);
    let mut mask = vec![false; len];
    let mut chunks = mask.chunks_exact_mut(8);
    for (b, chunk) in (&mut chunks).enumerate() {
        // A whole byte as one eight-byte store.
        let chunk: &mut [bool; 8] = chunk.try_into().expect("eight");
        *chunk = SPREAD[byte(b)];
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let n = tail.len();
        tail.copy_from_slice(&SPREAD[byte(len / 8)][..n]);
    }
    mask
}

/// Which entries of a block of one input survive pruning; `None` keeps all.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn keep_mask(
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
    if let Some(mask) = value_free_mask(job, tensor_index, input, keep, first, len) {
        return mask;
    }
    match *keep {
        Keep::Range { low, high } => Some(
            x.iter()
                .zip(z)
                .map(|(x, z)| {
                    let bits = magnitude_bits(*x, *z, job.compute.half());
                    bits >= low && bits < high
                })
                .collect(),
        ),
        Keep::All | Keep::None | Keep::Mask(_) | Keep::Random { .. } => unreachable!("value-free rules"),
        Keep::Della { density, epsilon } => {
            let mut mask = vec![false; len];
            let (mut order, mut magnitudes): (Vec<usize>, Vec<u32>) = (Vec::with_capacity(row), Vec::new());
            for start in (0..len).step_by(row) {
                let end = (start + row).min(len);
                magnitudes.clear();
                magnitudes.extend((start..end).map(|e| magnitude_bits(x[e], z[e], job.compute.half())));
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
            mix_rows: None,
            sce: None,
            weights: tensor.recipe.inputs.iter().map(|i| i.weight).collect(),
            combination: None,
            vector_combinations: None,
            fusion: None,
            multislerp: None,
            nuslerp: None,
            karcher: None,
        };
        let n = tensor.numel;
        if let Some(sparsification) = job.method.sparsification() {
            let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
            // Each input's pruning as the run of positions it keeps in torch's sort order of |δ|
            // (descending or not).
            let mut runs: Vec<Option<(bool, Range<usize>)>> = vec![None; k];
            for (i, input) in tensor.recipe.inputs.iter().enumerate() {
                if input.density >= 1.0 {
                    continue;
                }
                if input.density <= 0.0 {
                    // mergekit's pruning keeps nothing at density 0: the task vector drops out.
                    stats.keep[i] = Keep::None;
                    continue;
                }
                match sparsification {
                    Sparsification::Magnitude => {
                        // mergekit keeps at least one element of a non-empty tensor.
                        let keep = ((input.density * n as f64) as usize).max(1).min(n);
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
                        } else {
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
                            let (input, block) = (&tensor.inputs[i], tensor.block);
                            let kept = sort_order::sorted_run(
                                base, input, n, block, descending, run, pool, progress,
                            )?;
                            Ok(Keep::Mask(Arc::new(kept)))
                        })
                        .collect::<Result<_>>()?;
                    for (&i, keep) in group.iter().zip(found) {
                        stats.keep[i] = keep;
                    }
                }
                // The progress total counts two full reads for the threshold (the streamed rule's
                // passes); the runs counted their inputs' bytes, the rest is the base and the
                // inputs kept whole.
                let counted: u64 =
                    ranked.iter().map(|&i| 2 * (n * tensor.inputs[i].dtype.size()) as u64).sum();
                progress.done.fetch_add(2 * read_bytes(tensor) - counted, Ordering::Relaxed);
            } else if runs.iter().any(Option::is_some) {
                // The same runs as ascending ranks: a descending run 0..keep keeps the ranks from
                // n − keep, an ascending one its own positions.
                let wanted: Vec<Vec<usize>> = runs
                    .iter()
                    .map(|run| match run {
                        Some((true, run)) => vec![n - run.end],
                        Some((false, run)) if run.end < n => vec![run.start, run.end],
                        Some((false, run)) => vec![run.start],
                        None => Vec::new(),
                    })
                    .collect();
                let sources = tensor.sources();
                let boundaries = radix::order_statistics(
                    &sources,
                    tensor.block,
                    n,
                    &wanted,
                    progress,
                    |first, len, i, keys| radix::magnitude_keys(base, &tensor.inputs[i], first, len, keys),
                )?;
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
                // mergekit 0.1.5 rescales every sparsification (magnitude pruning too) when asked.
                if job.rescale && !matches!(stats.keep[i], Keep::All | Keep::None) {
                    stats.scale[i] = l1_rescale(job, index, i, &stats.keep[i], tensor, progress)?;
                }
            }
        }
        match job.method {
            Method::Slerp => stats.mix = slerp_mix(job, tensor, progress)?,
            // filter_wise leaves 1-D tensors whole (mergekit makes them one row).
            Method::ModelStock if job.filter_wise && tensor.shape.len() >= 2 => {
                stats.mix_rows = Some(model_stock::row_factors(job, tensor, progress)?)
            }
            Method::ModelStock => stats.mix = model_stock::factors(job, tensor, progress)?,
            Method::Nuslerp if nuslerp::applies(job) => {
                stats.nuslerp = Some(nuslerp::measure(job, tensor, &stats.weights, progress)?)
            }
            Method::Nuslerp if !job.spherical.flatten => {
                stats.vector_combinations = Some(nuslerp_vectors(job, tensor, &stats.weights, progress)?)
            }
            Method::Multislerp if job.compute != Compute::Float64 => {
                stats.multislerp = Some(multislerp::measure(job, tensor, &stats.weights, progress)?)
            }
            Method::Karcher if karcher::applies(job) => {
                stats.karcher = Some(karcher::measure(job, tensor, progress)?)
            }
            Method::Nuslerp | Method::Multislerp | Method::Karcher => {
                let gram = gram(tensor, progress)?;
                let weights = stats.weights.clone();
                let coefficients = match job.method {
                    Method::Nuslerp => spherical::nuslerp(&gram, &weights),
                    Method::Multislerp => {
                        spherical::multislerp(&gram, &weights, &job.spherical).map_err(|e| {
                            Error::InvalidArgument(format!("tensor '{}': {e}", tensor.recipe.name))
                        })?
                    }
                    _ => spherical::karcher(&gram, &job.spherical),
                };
                // Task vectors (with a base): out = z + Σ cᵢ(xᵢ − z).
                let base = if tensor.base.is_some() { 1.0 - coefficients.iter().sum::<f64>() } else { 0.0 };
                stats.combination = Some((base, coefficients));
            }
            Method::Sce => stats.sce = Some(sce::measure(job, tensor, progress)?),
            Method::ArceeFusion => stats.fusion = Some(fusion::measure(job, tensor, progress)?),
            Method::Ram => {
                tensor.base.as_ref().ok_or_else(|| no_base(job))?;
            }
            // RAM+'s λ per input travels as its weight.
            Method::RamplusTl => stats.weights = ram::ramplus_lambdas(job, tensor, progress)?,
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
        _ => {
            // mergekit divides by torch's float32 norms (chunked), then sums x/|x| · y/|y| per chunk
            // with torch's float32 sum, and sums the chunks' results.
            let norms = float32::chunked_norms(&sources, n, SLERP_CHUNK, progress)?;
            let (na, nb) = (norm(norms[0]) as f32, norm(norms[1]) as f32);
            f64::from(float32::chunked_dot(&sources, n, SLERP_CHUNK, (na, nb), progress)?)
        }
    };
    Ok(slerp_factors(tensor.recipe.t, dot, job.compute.float32_order().then_some(&job.trig)))
}

/// mergekit's slerp factors (s0 for the base, s1 for the other) from the cosine `dot`; lerp when
/// nearly colinear. With `float32` angles every step is a float32 operation, as mergekit computes
/// them in float32; else exact in float64.
fn slerp_factors(t: f64, dot: f64, float32: Option<&Trig>) -> (f64, f64) {
    const DOT_THRESHOLD: f64 = 0.9995;
    let Some(trig) = float32 else {
        let dot = dot.clamp(-1.0, 1.0);
        if dot.abs() > DOT_THRESHOLD {
            return (1.0 - t, t);
        }
        let theta = dot.acos();
        return (((1.0 - t) * theta).sin() / theta.sin(), (t * theta).sin() / theta.sin());
    };
    let (dot, t) = ((dot as f32).clamp(-1.0, 1.0), t as f32);
    if dot.abs() > DOT_THRESHOLD as f32 {
        return ((1.0 - t).into(), t.into());
    }
    let theta = trig.acos(dot);
    let sin_theta = trig.sin(theta);
    (f64::from(trig.sin((1.0 - t) * theta) / sin_theta), f64::from(trig.sin(t * theta) / sin_theta))
}

/// The vector element `e` belongs to in nuslerp without flattening: rows along the last axis, or
/// with `nuslerp_row_wise` the vectors along the first axis (mergekit transposes it last).
pub(super) fn vector_of(job: &MergeJob, tensor: &Resolved, e: usize) -> usize {
    if tensor.shape.len() < 2 {
        0
    } else if job.spherical.row_wise {
        e % tensor.row
    } else {
        e / tensor.shape.last().copied().unwrap_or(1).max(1)
    }
}

/// nuslerp per vector: each vector's 2×2 Gram matrix of the two inputs (or their task vectors),
/// exact, then the flattened rule on it. Blocks are summed in order, a batch at a time, so the
/// result does not depend on the threads and memory stays a batch of per-vector sums.
fn nuslerp_vectors(
    job: &MergeJob,
    tensor: &Resolved,
    weights: &[f64],
    progress: &Progress,
) -> Result<Vec<[f64; 2]>> {
    let vectors = if tensor.shape.len() < 2 {
        1
    } else if job.spherical.row_wise {
        tensor.row
    } else {
        tensor.numel / tensor.shape.last().copied().unwrap_or(1).max(1)
    };
    let relative = usize::from(tensor.base.is_some());
    let sources = tensor.sources();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let (n, block) = (tensor.numel, tensor.block);
    let mut total = vec![[0.0f64; 3]; vectors];
    let blocks: Vec<usize> = (0..n.div_ceil(block)).collect();
    for batch in blocks.chunks(BATCH) {
        let parts = batch
            .par_iter()
            .map(|&b| -> Result<(usize, Vec<[f64; 3]>)> {
                progress.check()?;
                let (first, len) = (b * block, block.min(n - b * block));
                // Only the vectors this block touches: a run of rows, or every column.
                let low = (0..len).map(|e| vector_of(job, tensor, first + e)).min().unwrap_or(0);
                let high = (0..len).map(|e| vector_of(job, tensor, first + e)).max().unwrap_or(0);
                let mut sums = vec![[0.0f64; 3]; high + 1 - low];
                with_block(&sources, first, len, |v| {
                    for e in 0..len {
                        let z = if relative == 1 { v[0][e] } else { 0.0 };
                        let (a, b) = (v[relative][e] - z, v[relative + 1][e] - z);
                        let s = &mut sums[vector_of(job, tensor, first + e) - low];
                        s[0] += a * a;
                        s[1] += a * b;
                        s[2] += b * b;
                    }
                });
                progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
                Ok((low, sums))
            })
            .collect::<Result<Vec<_>>>()?;
        for (low, sums) in parts {
            for (t, s) in total[low..].iter_mut().zip(sums) {
                (0..3).for_each(|i| t[i] += s[i]);
            }
        }
    }
    Ok(total
        .iter()
        .map(|g| {
            let c = spherical::nuslerp(&[g[0], g[1], g[1], g[2]], weights);
            [c[0], c[1]]
        })
        .collect())
}

/// Blocks of a per-vector sum computed in parallel before they are added in order.
const BATCH: usize = 16;

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

#[cfg(test)]
mod expand_tests {
    use super::expand_bits;

    #[test]
    fn bits_expand_to_their_elements() {
        let words = [0x8000_0000_0000_0001u64, 0x0123_4567_89ab_cdef, u64::MAX];
        for len in [0, 1, 7, 8, 63, 64, 65, 130, 192] {
            let expected: Vec<bool> = (0..len).map(|e| words[e / 64] >> (e % 64) & 1 == 1).collect();
            assert_eq!(expand_bits(&words, len), expected, "len {len}");
        }
    }
}

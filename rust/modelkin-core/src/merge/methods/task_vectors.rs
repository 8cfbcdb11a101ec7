//! The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA) over one block:
//! pruned, rescaled, weighted task vectors, optionally sign-elected, normalised, times lambda, in
//! float64, in float32 or in mergekit's half-precision order of roundings.

use bytemuck::Pod;
use multiversion::multiversion;
use num_traits::{AsPrimitive, Float};

use crate::merge::engine::job::MergeJob;
use crate::merge::engine::scratch::Scratch;
use crate::merge::engine::source::Resolved;
use crate::merge::engine::statistics::{keep_mask, TensorStatistics};
use crate::merge::torch::half_ops::{Bf16Rounding, F16Rounding, Half, Rounding};

/// Generalised task arithmetic: pruned, rescaled, weighted task vectors, optionally sign-elected
/// (majority = sign of their sum, +1 on a tie; zeros never vote), normalised, times lambda,
/// computed in `T`. In f32 every operation is rounded as mergekit's float32 tensors round it (an f32
/// operation is the f64 one rounded to f32), at twice the SIMD width of emulating that rounding in
/// f64.
#[allow(clippy::too_many_arguments)]
pub(crate) fn task_vector_block<T>(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    inputs: &[&[f64]],
    z: &[f64],
    first: usize,
    merged: &mut [f64],
) where
    T: Float + Pod,
    f64: AsPrimitive<T>,
    T: AsPrimitive<f64>,
{
    let masks = block_masks(job, index, tensor, stats, inputs, z, first);
    // The scratch is taken here, outside the multiversioned body: a closure inside it
    // would be compiled without its target features.
    let mut scratch = Scratch::take::<f64>(inputs.len() + 4, ROUNDED_CHUNK.min(merged.len()));
    in_chunks(inputs, z, &masks, merged, |views, z, masks, merged| {
        task_vector_block_in::<T>(job, stats, views, z, masks, merged, &mut scratch)
    });
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn task_vector_block_in<T>(
    job: &MergeJob,
    stats: &TensorStatistics,
    inputs: &[&[f64]],
    z: &[f64],
    masks: &[Option<&[bool]>],
    merged: &mut [f64],
    scratch: &mut Scratch,
) where
    T: Float + Pod,
    f64: AsPrimitive<T>,
    T: AsPrimitive<f64>,
{
    let weights: Vec<T> = stats.weights.iter().map(|&w| w.as_()).collect();
    let scales: Vec<T> = stats.scale.iter().map(|&s| s.as_()).collect();
    let lambda: T = job.lambda.as_();
    let (zero, one) = (T::zero(), T::one());
    let len = merged.len();
    // Column by column (one input at a time over the whole block) so the loops vectorise; the
    // per-element order of additions is still input 0, 1, 2, ... as in mergekit.
    let mut views = scratch.views::<T>(len);
    let (contributions, rest) = views.split_at_mut(inputs.len());
    let [base, mixed, divisor, majority] = rest else { unreachable!("four scratch buffers") };
    base.iter_mut().zip(z).for_each(|(b, &z)| *b = z.as_());
    let base = &**base;
    for (i, c) in contributions.iter_mut().enumerate() {
        let (x, w, s) = (inputs[i], weights[i], scales[i]);
        let contribution = |x: f64, z: T| w * ((x.as_() - z) * s);
        match masks[i] {
            None => c.iter_mut().zip(x.iter().zip(base)).for_each(|(c, (&x, &z))| *c = contribution(x, z)),
            // Multiplying by 1 or 0 is exact, and keeps the loop free of branches.
            Some(mask) => {
                c.iter_mut().zip(x.iter().zip(base)).zip(mask).for_each(|((c, (&x, &z)), &kept)| {
                    *c = contribution(x, z) * if kept { one } else { zero }
                })
            }
        }
    }
    mixed.iter_mut().for_each(|m| *m = zero);
    for c in contributions.iter() {
        mixed.iter_mut().zip(c.iter()).for_each(|(m, &c)| *m = *m + c);
    }
    if job.method.sign_consensus() {
        // Majority sign of the weighted deltas (+1 on a tie); zeros never vote. Adding c·1 or
        // c·0 is exact, so the selection needs no branch.
        majority.iter_mut().zip(mixed.iter()).for_each(|(s, &m)| *s = if m >= zero { one } else { -one });
        mixed.iter_mut().for_each(|m| *m = zero);
        divisor.iter_mut().for_each(|d| *d = zero);
        for (c, &w) in contributions.iter().zip(&weights) {
            for (((sum, div), &c), &m) in
                mixed.iter_mut().zip(divisor.iter_mut()).zip(c.iter()).zip(majority.iter())
            {
                let agrees = if ((c > zero) & (m > zero)) | ((c < zero) & (m < zero)) { one } else { zero };
                *sum = *sum + c * agrees;
                *div = *div + w * agrees;
            }
        }
        divisor.iter_mut().for_each(|d| *d = if *d == zero { one } else { *d });
    } else {
        let total = weights.iter().fold(zero, |acc, &w| acc + w);
        let total = if total.abs().as_() < 1e-8 { one } else { total };
        divisor.iter_mut().for_each(|d| *d = total);
    }
    for ((out, (&m, &d)), &z) in merged.iter_mut().zip(mixed.iter().zip(divisor.iter())).zip(base) {
        let m = if job.normalize { m / d } else { m };
        let m = if lambda == one { m } else { m * lambda };
        *out = (z + m).as_();
    }
}

/// Each input's pruning mask over this block (`None` keeps all).
fn block_masks(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    inputs: &[&[f64]],
    z: &[f64],
    first: usize,
) -> Vec<Option<Vec<bool>>> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, x)| keep_mask(job, index, i, &stats.keep[i], x, z, first, tensor.row))
        .collect()
}

/// Generalised task arithmetic in mergekit's half-precision order: every elementwise step rounded
/// to the half type, the sums over the models accumulated in f32 and rounded once, the weights
/// held in the half type and `lambda` (a Python scalar) in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn task_vector_half_block(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    inputs: &[&[f64]],
    z: &[f64],
    first: usize,
    merged: &mut [f64],
    half: Half,
) {
    let masks = block_masks(job, index, tensor, stats, inputs, z, first);
    // The streamed and DELLA rules read the f64 views; the arithmetic runs on f32 copies.
    let narrow = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (zf, xs): (Vec<f32>, Vec<Vec<f32>>) = (narrow(z), inputs.iter().map(|x| narrow(x)).collect());
    let xs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    match half {
        Half::Bf16 => task_vector_rounded::<Bf16Rounding>(job, stats, &xs, &zf, &masks, merged),
        Half::F16 => task_vector_rounded::<F16Rounding>(job, stats, &xs, &zf, &masks, merged),
    }
}

/// [`task_vector_half_block`]'s arithmetic for one half type (or, with `NoRounding`, float32's),
/// column by column (one input at a time over the whole block) so that the loops and the
/// branchless rounding vectorise; the per-element order of operations is mergekit's.
pub(crate) fn task_vector_rounded<R: Rounding>(
    job: &MergeJob,
    stats: &TensorStatistics,
    inputs: &[&[f32]],
    z: &[f32],
    masks: &[Option<Vec<bool>>],
    merged: &mut [f64],
) {
    // The scratch is taken here, outside the multiversioned body: a closure inside it
    // would be compiled without its target features.
    let mut scratch = Scratch::take::<f32>(inputs.len() + 4, ROUNDED_CHUNK.min(merged.len()));
    in_chunks(inputs, z, masks, merged, |views, z, masks, merged| {
        task_vector_rounded_in::<R>(job, stats, views, z, masks, merged, &mut scratch)
    });
}

/// Runs `step` over the block [`ROUNDED_CHUNK`] elements at a time, with each input, the base,
/// each mask and the output cut to the chunk. Every step of the task-vector arithmetic is
/// elementwise, so chunks whose intermediates stay in the core's cache give the same values as
/// a dozen passes over block-long buffers, faster.
fn in_chunks<T>(
    inputs: &[&[T]],
    z: &[T],
    masks: &[Option<Vec<bool>>],
    merged: &mut [f64],
    mut step: impl FnMut(&[&[T]], &[T], &[Option<&[bool]>], &mut [f64]),
) {
    let mut views: Vec<&[T]> = Vec::with_capacity(inputs.len());
    let mut chunk_masks: Vec<Option<&[bool]>> = Vec::with_capacity(inputs.len());
    for start in (0..merged.len()).step_by(ROUNDED_CHUNK) {
        let end = (start + ROUNDED_CHUNK).min(merged.len());
        views.clear();
        views.extend(inputs.iter().map(|x| &x[start..end]));
        chunk_masks.clear();
        chunk_masks.extend(masks.iter().map(|m| m.as_ref().map(|m| &m[start..end])));
        step(&views, &z[start..end], &chunk_masks, &mut merged[start..end]);
    }
}

/// Elements per chunk of [`task_vector_rounded`] and [`task_vector_block`]: their seven f32
/// intermediates then take 112 KiB (f64 ones, 224 KiB: within a core's L2 still).
const ROUNDED_CHUNK: usize = 4096;

#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn task_vector_rounded_in<R: Rounding>(
    job: &MergeJob,
    stats: &TensorStatistics,
    inputs: &[&[f32]],
    z: &[f32],
    masks: &[Option<&[bool]>],
    merged: &mut [f64],
    scratch: &mut Scratch,
) {
    let h = R::round;
    let weights: Vec<f32> = stats.weights.iter().map(|&w| h(w as f32)).collect();
    // The L1 rescale factor is a ratio of two half-precision sums: a half value itself.
    let scales: Vec<f32> = stats.scale.iter().map(|&s| h(s as f32)).collect();
    let lambda = job.lambda as f32;
    let total = h(weights.iter().fold(0.0f32, |acc, &w| acc + w));
    let total = if total.abs() < 1e-8 { 1.0 } else { total };
    let len = merged.len();
    let mut views = scratch.views::<f32>(len);
    let (contributions, rest) = views.split_at_mut(inputs.len());
    let [base, mixed, divisor, majority] = rest else { unreachable!("four scratch buffers") };
    // The inputs were rounded to the half type on load.
    base.copy_from_slice(z);
    let base = &**base;
    for (i, c) in contributions.iter_mut().enumerate() {
        let (x, w, s) = (inputs[i], weights[i], scales[i]);
        // δ = x − z, times the mask (torch multiplies by it: exact, and free of branches), the
        // rescale when there is one, the weight; each step rounded. One fused pass per input.
        let step = |x: f32, z: f32, kept: f32| {
            let d = h(x - z) * kept;
            let d = if s == 1.0 { d } else { h(d * s) };
            h(d * w)
        };
        match masks[i] {
            None => c.iter_mut().zip(x.iter().zip(base)).for_each(|(c, (&x, &z))| *c = step(x, z, 1.0)),
            Some(mask) => c
                .iter_mut()
                .zip(x.iter().zip(base))
                .zip(mask)
                .for_each(|((c, (&x, &z)), &kept)| *c = step(x, z, if kept { 1.0 } else { 0.0 })),
        }
    }
    // `sum(dim=0)`: accumulated in f32 in model order, rounded once.
    mixed.iter_mut().for_each(|m| *m = 0.0);
    for c in contributions.iter() {
        mixed.iter_mut().zip(c.iter()).for_each(|(m, &c)| *m += c);
    }
    mixed.iter_mut().for_each(|m| *m = h(*m));
    if job.method.sign_consensus() {
        // sign(c) == majority (+1 on a tie): zeros never agree.
        majority.iter_mut().zip(mixed.iter()).for_each(|(s, &m)| *s = if m >= 0.0 { 1.0 } else { -1.0 });
        mixed.iter_mut().for_each(|m| *m = 0.0);
        divisor.iter_mut().for_each(|d| *d = 0.0);
        for (c, &w) in contributions.iter().zip(&weights) {
            for (((sum, div), &c), &m) in
                mixed.iter_mut().zip(divisor.iter_mut()).zip(c.iter()).zip(majority.iter())
            {
                let agrees = if ((c > 0.0) & (m > 0.0)) | ((c < 0.0) & (m < 0.0)) { 1.0 } else { 0.0 };
                *sum += c * agrees;
                *div += w * agrees;
            }
        }
        mixed.iter_mut().for_each(|m| *m = h(*m));
        divisor.iter_mut().for_each(|d| *d = if h(*d) == 0.0 { 1.0 } else { h(*d) });
    } else {
        divisor.iter_mut().for_each(|d| *d = total);
    }
    for ((out, (&m, &d)), &z) in merged.iter_mut().zip(mixed.iter().zip(divisor.iter())).zip(base) {
        let m = if job.normalize { h(m / d) } else { m };
        let m = if job.lambda == 1.0 { m } else { h(m * lambda) };
        *out = f64::from(h(z + m));
    }
}

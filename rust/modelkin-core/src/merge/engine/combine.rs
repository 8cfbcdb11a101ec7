//! The output pass: each block of an output tensor is combined from the decoded inputs, encoded
//! to the output dtype and written in order; the parents' kinship moments come from the same read.

use std::sync::atomic::Ordering;

use multiversion::multiversion;
use rayon::prelude::*;

use crate::io::dtype::FloatDtype;
use crate::io::encode::encode;
use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::io::writer::TensorSink;
use crate::kinship::stats::Moments;
use crate::merge::engine::job::{Compute, MergeJob};
use crate::merge::engine::method::Method;
use crate::merge::engine::moments::{block_moments, recheck_distances};
use crate::merge::engine::scratch::Scratch;
use crate::merge::engine::source::{with_block, Resolved, Source};
use crate::merge::engine::statistics::{value_free_mask, vector_of, Keep, TensorStatistics};
use crate::merge::methods::ram::ram_block;
use crate::merge::methods::task_vectors::{task_vector_block, task_vector_half_block, task_vector_rounded};
use crate::merge::torch::half_ops::{Bf16Rounding, F16Rounding, Half, NoRounding, Rounding};

/// Blocks computed in parallel before their bytes are written in order.
const BLOCKS_IN_FLIGHT: usize = 32;

/// Merges and writes one tensor; returns the moments of the parents' deltas against the base
/// (for kinship) when there is a base.
pub(super) fn write_tensor(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    writer: &mut dyn TensorSink,
    progress: &Progress,
) -> Result<Option<Moments>> {
    let n = tensor.numel;
    let blocks: Vec<usize> = (0..n.div_ceil(tensor.block)).collect();
    let bytes_per_element: u64 =
        tensor.base.iter().chain(&tensor.inputs).map(|s| s.dtype.size() as u64).sum();
    let mut moments = tensor.base.as_ref().map(|_| Moments::empty(tensor.inputs.len()));
    for batch in blocks.chunks(BLOCKS_IN_FLIGHT) {
        let outputs: Vec<(Vec<u8>, Option<Moments>)> = batch
            .par_iter()
            .map(|&b| {
                progress.check()?;
                let first = b * tensor.block;
                let len = tensor.block.min(n - first);
                let out = merge_block(job, index, tensor, stats, first, len);
                progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
                Ok(out)
            })
            .collect::<Result<_>>()?;
        for (bytes, block_moments) in outputs {
            writer.write(&bytes)?;
            if let (Some(total), Some(block)) = (moments.as_mut(), block_moments) {
                total.merge(&block);
            }
        }
    }
    if let Some(moments) = moments.as_mut() {
        recheck_distances(tensor, moments);
    }
    Ok(moments)
}

fn merge_block(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    first: usize,
    len: usize,
) -> (Vec<u8>, Option<Moments>) {
    let f32_task_vectors = job.compute != Compute::Float64
        && job.method.task_vectors()
        && !stats.keep.iter().any(Keep::reads_values);
    if let (true, Some(base)) = (f32_task_vectors, &tensor.base) {
        return task_vector_f32(job, index, tensor, stats, base, first, len, job.compute.half());
    }
    if job.method == Method::Linear {
        // f32 pieces hold bf16, f16 and f32 values exactly and widen twice as fast as f64 ones.
        let exact_in_f32 = tensor
            .inputs
            .iter()
            .all(|s| matches!(s.dtype, FloatDtype::BF16 | FloatDtype::F16 | FloatDtype::F32));
        return match (job.compute == Compute::Float64, exact_in_f32) {
            (true, true) => linear_block::<false, f32>(job, tensor, stats, first, len),
            (true, false) => linear_block::<false, f64>(job, tensor, stats, first, len),
            (false, true) => linear_block::<true, f32>(job, tensor, stats, first, len),
            (false, false) => linear_block::<true, f64>(job, tensor, stats, first, len),
        };
    }
    with_block(&tensor.sources(), first, len, |views| {
        let (base, inputs) =
            if tensor.base.is_some() { (Some(views[0]), &views[1..]) } else { (None, views) };
        match job.compute {
            Compute::Float64 => combine_block::<false>(job, index, tensor, stats, first, base, inputs),
            _ => combine_block::<true>(job, index, tensor, stats, first, base, inputs),
        }
    })
}

/// Rounds to f32 when `F32`: monomorphised, so the float64 path pays nothing and the float32
/// path inlines the conversion instead of calling through a function pointer per operation.
#[inline(always)]
fn round<const F32: bool>(v: f64) -> f64 {
    if F32 {
        f64::from(v as f32)
    } else {
        v
    }
}

// Compiled for each vector width as the other hot loops are: the per-element loops below (a
// linear sum, the half rounding) ran 2 lanes wide in the baseline build, most of a linear merge.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn combine_block<const F32: bool>(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    first: usize,
    base: Option<&[f64]>,
    inputs: &[&[f64]],
) -> (Vec<u8>, Option<Moments>) {
    let len = inputs[0].len();
    let mut scratch = Scratch::take::<f64>(1, len);
    // Every method below writes every element, so the buffer is not cleared.
    let merged = scratch.one::<f64>(len);
    // In float32 mode every operation is rounded to f32 in mergekit's order, so results match
    // mergekit's `dtype: float32` bit for bit; in float64 mode `r` is the identity.
    let r = round::<F32>;
    let half = job.compute.half();
    match (job.method, &base) {
        (method, Some(z)) if method.task_vectors() && half.is_some() => {
            task_vector_half_block(job, index, tensor, stats, inputs, z, first, merged, half.expect("half"))
        }
        (Method::Slerp, Some(z)) => {
            // mergekit's slerp works in float32 from half inputs too, rounding once at the end.
            let (s0, s1) = (r(stats.mix.0), r(stats.mix.1));
            for (e, out) in merged.iter_mut().enumerate() {
                *out = r(r(s0 * r(z[e])) + r(s1 * r(inputs[0][e])));
            }
        }
        (Method::ModelStock, Some(z)) => {
            // Every step in the working dtype: with half arithmetic each one is rounded to it.
            let h = |v: f64| half.map_or(r(v), |h| f64::from(h.round(v as f32)));
            let count = inputs.len() as f64;
            let cols = tensor.shape.last().copied().unwrap_or(1).max(1);
            for (e, out) in merged.iter_mut().enumerate() {
                let (s0, s1) = stats.mix_rows.as_ref().map_or(stats.mix, |rows| rows[(first + e) / cols]);
                let (s0, s1) = (h(s0), h(s1));
                let other = h(inputs.iter().fold(0.0, |acc, x| h(acc + r(x[e]))) / count);
                *out = h(h(s0 * r(z[e])) + h(s1 * other));
            }
        }
        (Method::Sce, Some(z)) => stats.sce.as_ref().expect("measured").block(first, z, inputs, merged),
        (Method::ArceeFusion, Some(z)) => {
            // z + (x − z)·mask: the difference in the working dtype, then (the mask being
            // float32) the sum in float32, which mergekit writes as it is.
            let fusion = stats.fusion.as_ref().expect("measured");
            let h = |v: f64| half.map_or(r(v), |h| h.load(v));
            for (e, out) in merged.iter_mut().enumerate() {
                let x = inputs[0][e];
                let kept = fusion.keeps(job.compute, first + e, x, z[e]);
                *out = if kept { r(z[e] + h(x - z[e])) } else { z[e] };
            }
        }
        (Method::Ram, Some(z)) => ram_block(job, None, inputs, z, merged),
        (Method::RamplusTl, Some(z)) => ram_block(job, Some(&stats.weights), inputs, z, merged),
        (Method::Nearswap, Some(a)) => {
            // weight = clamp(t / max(|a − b|, 1e-6), 0, 1); out = weight·b + (1 − weight)·a,
            // each step in the working dtype (t and 1e-6 are Python scalars: float32).
            let h = |v: f64| half.map_or(r(v), |h| h.load(v));
            let t = r(tensor.recipe.t);
            let floor = h(r(1e-6));
            for (e, out) in merged.iter_mut().enumerate() {
                let (a, b) = (a[e], inputs[0][e]);
                let distance = h(a - b).abs().max(floor);
                // `t / tensor` is torch's __rtruediv__: reciprocal(tensor) * t, two roundings.
                let weight = h(r(h(1.0 / distance) * t)).clamp(0.0, 1.0);
                *out = h(h(weight * b) + h(h(1.0 - weight) * a));
            }
        }
        (Method::Passthrough, _) => {
            // mergekit multiplies by a Python float, which torch casts to the tensor's working
            // dtype first (float32 for float32 and half arithmetic), then multiplies in it.
            let scale = stats.weights[0];
            if scale == 1.0 {
                merged.copy_from_slice(inputs[0]);
            } else {
                let scale = r(scale);
                merged.iter_mut().zip(inputs[0]).for_each(|(out, &x)| *out = r(x * scale));
            }
        }
        (Method::Nuslerp, _) if stats.vector_combinations.is_some() => {
            let vectors = stats.vector_combinations.as_ref().expect("measured");
            for (e, out) in merged.iter_mut().enumerate() {
                let [a, b] = vectors[vector_of(job, tensor, first + e)];
                let z = base.map_or(0.0, |z| z[e]);
                *out = r(z + a * (inputs[0][e] - z) + b * (inputs[1][e] - z));
            }
        }
        (Method::Nuslerp, _) if stats.nuslerp.is_some() => {
            stats.nuslerp.as_ref().expect("measured").block(first, base, inputs, merged)
        }
        (Method::Multislerp, _) if stats.multislerp.is_some() => {
            stats.multislerp.as_ref().expect("measured").block(base, inputs, merged)
        }
        (Method::Karcher, _) if stats.karcher.is_some() => {
            stats.karcher.as_ref().expect("measured").block(first, inputs, merged)
        }
        (Method::Nuslerp | Method::Multislerp | Method::Karcher, _) => {
            let (base_coefficient, coefficients) = stats.combination.as_ref().expect("measured");
            for (e, out) in merged.iter_mut().enumerate() {
                let sum: f64 = inputs.iter().zip(coefficients).map(|(x, c)| c * x[e]).sum();
                let base = base.map_or(0.0, |z| base_coefficient * z[e]);
                *out = r(base + sum);
            }
        }
        (method, Some(z)) if method.task_vectors() => {
            if F32 {
                task_vector_block::<f32>(job, index, tensor, stats, inputs, z, first, merged)
            } else {
                task_vector_block::<f64>(job, index, tensor, stats, inputs, z, first, merged)
            }
        }
        _ => merged.copy_from_slice(inputs[0]),
    }
    finish_block(job, tensor, first, merged)
}

/// A merged block's last steps: held in the half type before it is cast to out_dtype, as
/// mergekit's result is (RAM+'s float32 λ and arcee_fusion's float32 mask promote theirs to
/// float32), encoded, and the parents' moments measured from the stored bytes when there is a
/// base. Inlined into its multiversioned callers, so its loops get their vector width.
#[inline(always)]
fn finish_block(
    job: &MergeJob,
    tensor: &Resolved,
    first: usize,
    merged: &mut [f64],
) -> (Vec<u8>, Option<Moments>) {
    let len = merged.len();
    match job.compute.half().filter(|_| !matches!(job.method, Method::RamplusTl | Method::ArceeFusion)) {
        Some(Half::Bf16) => merged.iter_mut().for_each(|v| *v = f64::from(Bf16Rounding::round(*v as f32))),
        Some(Half::F16) => merged.iter_mut().for_each(|v| *v = f64::from(F16Rounding::round(*v as f32))),
        None => {}
    }
    let mut bytes = Vec::with_capacity(len * job.out_dtype.size());
    encode(job.out_dtype, merged, &mut bytes);
    let moments = tensor.base.as_ref().map(|_| block_moments(tensor, first, len));
    (bytes, moments)
}

/// Elements per piece of [`linear_block`]: its inputs' decoded pieces stay in the L1 cache.
const PIECE: usize = 2048;

/// What [`linear_block`] decodes a piece of an input to (with the half rounding mergekit's load
/// applies): f32 where that holds the stored values exactly, f64 otherwise.
trait Decoded: bytemuck::Pod + Into<f64> {
    fn decode(source: &Source, first: usize, out: &mut [Self]);
}

impl Decoded for f32 {
    fn decode(source: &Source, first: usize, out: &mut [f32]) {
        decode_f32(source, first, out);
    }
}

impl Decoded for f64 {
    fn decode(source: &Source, first: usize, out: &mut [f64]) {
        source.read(first, out);
    }
}

/// `linear`, in mergekit's order: each element summed input by input from zero, in float32 mode
/// every step rounded to f32 (mergekit accumulates with addcmul_, a fused multiply-add: the
/// product of two f32 values is exact in f64, so only the sum is rounded). The inputs are decoded
/// a piece at a time and the base not at all (its only use is the parents' moments, measured from
/// the stored bytes): decoding every source to a block of f64 first was a third of the merge.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn linear_block<const F32: bool, T: Decoded>(
    job: &MergeJob,
    tensor: &Resolved,
    stats: &TensorStatistics,
    first: usize,
    len: usize,
) -> (Vec<u8>, Option<Moments>) {
    let r = round::<F32>;
    let weights: Vec<f64> = stats.weights.iter().map(|&w| r(w)).collect();
    let total = weights.iter().fold(0.0, |acc, &w| r(acc + w));
    let mut wide = Scratch::take::<f64>(1, len);
    let merged = wide.one::<f64>(len);
    let mut decoded = Scratch::take::<T>(1, PIECE);
    let piece = decoded.one::<T>(PIECE);
    for (p, out) in merged.chunks_mut(PIECE).enumerate() {
        let x = &mut piece[..out.len()];
        out.fill(0.0);
        for (source, &w) in tensor.inputs.iter().zip(&weights) {
            T::decode(source, first + p * PIECE, x);
            out.iter_mut().zip(x.iter()).for_each(|(acc, &x)| *acc = r(*acc + w * r(x.into())));
        }
        if job.normalize {
            out.iter_mut().for_each(|sum| *sum = r(*sum / total));
        }
    }
    finish_block(job, tensor, first, merged)
}

/// The GTA family in float32 or half arithmetic (`half`) when no pruning rule needs the values
/// (kept whole, a replayed-sort mask, random): the inputs are decoded straight to f32 (exact for
/// bf16, f16 and f32, and the float32 arithmetic's own load of the others), which halves the
/// decoding and lets the arithmetic run twice as wide as from f64.
#[allow(clippy::too_many_arguments)]
fn task_vector_f32(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    base: &Source,
    first: usize,
    len: usize,
    half: Option<Half>,
) -> (Vec<u8>, Option<Moments>) {
    let masks: Vec<Option<Vec<bool>>> = stats
        .keep
        .iter()
        .enumerate()
        .map(|(i, k)| value_free_mask(job, index, i, k, first, len).expect("checked by the caller"))
        .collect();
    let mut decoded = Scratch::take::<f32>(tensor.inputs.len() + 1, len);
    let mut buffers = decoded.views::<f32>(len);
    for (buffer, source) in buffers.iter_mut().zip(std::iter::once(base).chain(&tensor.inputs)) {
        decode_f32(source, first, buffer);
    }
    let (z, inputs) = buffers.split_first().expect("base");
    let inputs: Vec<&[f32]> = inputs.iter().map(|b| &**b).collect();
    let mut wide = Scratch::take::<f64>(1, len);
    let merged = wide.one::<f64>(len);
    match half {
        Some(Half::Bf16) => task_vector_rounded::<Bf16Rounding>(job, stats, &inputs, z, &masks, merged),
        Some(Half::F16) => task_vector_rounded::<F16Rounding>(job, stats, &inputs, z, &masks, merged),
        None => task_vector_rounded::<NoRounding>(job, stats, &inputs, z, &masks, merged),
    }
    let mut bytes = Vec::with_capacity(len * job.out_dtype.size());
    encode(job.out_dtype, merged, &mut bytes);
    (bytes, Some(block_moments(tensor, first, len)))
}

/// Decodes a block of a source to f32, rounded to the half type on load where mergekit's load
/// rounds it. f32 holds every bf16, f16 and f32 value exactly.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn decode_f32(source: &Source, first: usize, out: &mut [f32]) {
    let bytes = source.model.raw_bytes(source.entry, source.dtype, first, out.len());
    match source.dtype {
        FloatDtype::BF16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        FloatDtype::F16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        FloatDtype::F32 => out
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        _ => {
            let mut scratch = Scratch::take::<f64>(1, out.len());
            let wide = scratch.one::<f64>(out.len());
            source.read(first, wide);
            out.iter_mut().zip(wide.iter()).for_each(|(o, &w)| *o = w as f32);
        }
    }
    if let (Some(h), true) = (source.half, source.rounds_on_load) {
        out.iter_mut().for_each(|v| *v = h.round(*v));
    }
}

//! One streaming pass over a base model and k fine-tunes: per-tensor moments of every delta.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::io::dtype::FloatDtype;
use crate::io::error::{Error, Result};
use crate::io::progress::Progress;
use crate::io::threads::with_threads;
use crate::kinship::family::{release, Family, Plan, PlannedTensor};
use crate::kinship::gram::fused::{fused_format, MAX_MODELS as MAX_FUSED_MODELS};
use crate::kinship::gram::Gram;
use crate::kinship::kernel;
use crate::kinship::options::PassOptions;
use crate::kinship::report::{KinshipReport, SkippedTensor, TensorStats};
use crate::kinship::simd::LANES;
use crate::kinship::stats::{Mode, Moments};

/// Elements per work item: large enough to amortise scheduling, small enough that k+1 decoded
/// buffers of it stay in a core's L2 cache.
const CHUNK: usize = 16 * 1024;

/// Elements per block of the all-pairs sweep: the base's and k deltas' blocks stay in L1.
const GRAM_BLOCK: usize = 256;

/// Worst relative rounding error of a chunk's raw sums: each of the `LANES` partial sums adds
/// CHUNK / LANES terms, then the lanes and the distance identity add a few roundings more.
const RAW_SUM_RELATIVE_ERROR: f64 = (CHUNK / LANES + LANES + 4) as f64 * f64::EPSILON / 2.0;

enum ChunkOutcome {
    Moments(Moments),
    MaxAbs(Vec<f64>),
    /// Index into `sources` of the model whose values are not finite.
    NonFinite(usize),
}

/// Measures the deltas of every model in `models` against `base` in one pass over the files.
pub fn kinship_pass(
    family: &Family,
    plan: &Plan,
    options: &PassOptions,
    progress: &Progress,
) -> Result<KinshipReport> {
    let mut skipped = plan.skipped.clone();
    let plan = &plan.tensors;
    let passes = if options.low_precision.is_some() { 2 } else { 1 };
    progress.total.store(passes * plan.iter().map(PlannedTensor::bytes).sum::<u64>(), Ordering::Relaxed);

    let run = || -> Result<KinshipReport> {
        let scales = match options.low_precision {
            Some(scope) => Some(quantisation_scales(family, plan, scope, progress)?),
            None => None,
        };
        let mut tensors = Vec::with_capacity(plan.len());
        for (t, tensor) in plan.iter().enumerate() {
            let outcome = match scales.as_ref().map(|s| &s[t]) {
                // Pass one already found NaN/Inf here; don't read it again.
                Some(Err(culprit)) => Err(*culprit),
                Some(Ok(scale)) => tensor_moments(family, tensor, Some(scale), progress)?,
                None => tensor_moments(family, tensor, None, progress)?,
            };
            release(family, tensor);
            match outcome {
                Ok(moments) => tensors.push(TensorStats {
                    name: tensor.name.clone(),
                    shape: tensor.shape.clone(),
                    moments,
                }),
                Err(culprit) => {
                    let path = family.file_of(&tensor.sources[culprit]).to_path_buf();
                    if !options.skip_nonfinite {
                        return Err(Error::NonFinite { path, tensor: tensor.name.clone() });
                    }
                    skipped.push(SkippedTensor {
                        name: tensor.name.clone(),
                        reason: format!("NaN or Inf values in {}", path.display()),
                    });
                }
            }
        }
        Ok(KinshipReport::new(family.k(), tensors, skipped))
    };
    with_threads(options.threads, run)
}

/// Decodes one chunk of every source into `buffer` (base first) and turns the fine-tunes' rows into
/// deltas, returning each delta's sum, or the index of a source with NaN/Inf.
fn load_deltas(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    buffer: &mut [f64],
) -> std::result::Result<Vec<f64>, usize> {
    let (base, deltas) = buffer.split_at_mut(CHUNK);
    let base = &mut base[..len];
    family.read_f64(&tensor.sources[0], first, base);
    let mut sums = Vec::with_capacity(tensor.sources.len() - 1);
    for (i, s) in tensor.sources[1..].iter().enumerate() {
        let sum = family.read_delta(s, first, base, &mut deltas[i * CHUNK..i * CHUNK + len]);
        // A sum of finite widened f32 values cannot overflow f64, so this catches NaN/Inf.
        if !sum.is_finite() {
            return Err(if kernel::sum(base).is_finite() { i + 1 } else { 0 });
        }
        sums.push(sum);
    }
    Ok(sums)
}

thread_local! {
    static CHUNK_BUFFER: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn par_chunks<'a, T, F>(tensor: &'a PlannedTensor, progress: &'a Progress, work: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&mut [f64], usize, usize) -> T + Sync + Send,
{
    let k = tensor.sources.len() - 1;
    let chunks = tensor.numel.div_ceil(CHUNK);
    let bytes_per_element: u64 = tensor.sources.iter().map(|s| s.dtype.size() as u64).sum();
    (0..chunks)
        .into_par_iter()
        .map(|c| {
            progress.check()?;
            let first = c * CHUNK;
            let len = CHUNK.min(tensor.numel - first);
            // One buffer per worker thread for the whole pass: allocating per job would map and
            // fault in fresh zero pages over and over.
            let outcome = CHUNK_BUFFER.with_borrow_mut(|buffer| {
                buffer.resize(buffer.len().max((k + 1) * CHUNK), 0.0);
                work(&mut buffer[..(k + 1) * CHUNK], first, len)
            });
            progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
            Ok(outcome)
        })
        .collect()
}

/// Per tensor, per fine-tune: the quantisation scale (max |delta| over the scope), or the index
/// of the source holding NaN/Inf.
type Scales = std::result::Result<Vec<f64>, usize>;

fn quantisation_scales(
    family: &Family,
    plan: &[PlannedTensor],
    scope: Mode,
    progress: &Progress,
) -> Result<Vec<Scales>> {
    let mut scales = Vec::with_capacity(plan.len());
    for tensor in plan {
        let k = tensor.sources.len() - 1;
        let outcomes = par_chunks(tensor, progress, |buffer, first, len| {
            if let Err(culprit) = load_deltas(family, tensor, first, len, buffer) {
                return ChunkOutcome::NonFinite(culprit);
            }
            ChunkOutcome::MaxAbs(
                (0..k).map(|i| kernel::max_abs(&buffer[(i + 1) * CHUNK..(i + 1) * CHUNK + len])).collect(),
            )
        })?;
        release(family, tensor);
        let mut max = Ok(vec![0.0f64; k]);
        for outcome in outcomes {
            match (outcome, &mut max) {
                (ChunkOutcome::MaxAbs(m), Ok(max)) => max.iter_mut().zip(m).for_each(|(a, b)| *a = a.max(b)),
                (ChunkOutcome::NonFinite(culprit), Ok(_)) => max = Err(culprit),
                _ => {}
            }
        }
        scales.push(max);
    }
    if scope == Mode::Full {
        let k = plan.first().map_or(0, |t| t.sources.len() - 1);
        // Tensors with NaN/Inf are reported or skipped later; they take no part in the scale.
        let global: Vec<f64> =
            (0..k).map(|i| scales.iter().flatten().map(|s| s[i]).fold(0.0, f64::max)).collect();
        for s in scales.iter_mut().flatten() {
            s.clone_from(&global);
        }
    }
    Ok(scales)
}

/// The tensor's moments, or the index of the source holding NaN/Inf.
fn tensor_moments(
    family: &Family,
    tensor: &PlannedTensor,
    scales: Option<&[f64]>,
    progress: &Progress,
) -> Result<std::result::Result<Moments, usize>> {
    let k = tensor.sources.len() - 1;
    let pair_path = k == 2 && scales.is_none();
    let fused = if scales.is_none() { fused_format(k, tensor.sources.iter().map(|s| s.dtype)) } else { None };
    let outcomes = par_chunks(tensor, progress, |buffer, first, len| {
        if pair_path {
            pair_chunk(family, tensor, first, len, buffer)
        } else {
            gram_chunk(family, tensor, first, len, scales, fused, buffer)
        }
    })?;
    let mut moments = Moments::empty(k);
    for outcome in outcomes {
        match outcome {
            ChunkOutcome::Moments(m) => moments.merge(&m),
            ChunkOutcome::NonFinite(culprit) => return Ok(Err(culprit)),
            ChunkOutcome::MaxAbs(_) => unreachable!("the moments pass yields no maxima"),
        }
    }
    if !pair_path {
        for i in 0..k {
            for j in i + 1..k {
                if moments.distance_may_have_cancelled(i, j, RAW_SUM_RELATIVE_ERROR) {
                    let direct = direct_squared_distance(family, tensor, (i, j), scales, progress)?;
                    moments.set_squared_distance(i, j, direct);
                }
            }
        }
    }
    Ok(Ok(moments))
}

/// Raw all-pairs sums of one chunk: with a `fused` format (from [`fused_format`]) the fine-tunes
/// are widened and multiplied in registers; otherwise, and for the chunk's last few (under eight)
/// elements, each block of every source is decoded, turned into deltas (quantised when `scales`
/// is given) and fed to the tiled pair kernel.
fn gram_chunk(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    scales: Option<&[f64]>,
    fused: Option<FloatDtype>,
    buffer: &mut [f64],
) -> ChunkOutcome {
    let k = tensor.sources.len() - 1;
    let mut gram = Gram::new(k);
    let (base, rows) = buffer[..(k + 1) * GRAM_BLOCK].split_at_mut(GRAM_BLOCK);
    let mut widened = 0;
    if let Some(format) = fused {
        let mut stored: [&[u8]; MAX_FUSED_MODELS + 1] = [&[]; MAX_FUSED_MODELS + 1];
        for (bytes, source) in stored.iter_mut().zip(&tensor.sources) {
            *bytes = family.raw_bytes(source, first, len);
        }
        widened = gram.add_stored(format, &stored[..=k], len, rows);
    }
    // The chunk's tail (or all of it, without a fused sweep) is decoded into rows first.
    for start in (first + widened..first + len).step_by(GRAM_BLOCK) {
        let count = GRAM_BLOCK.min(first + len - start);
        let padded = count.next_multiple_of(LANES);
        family.read_f64(&tensor.sources[0], start, &mut base[..count]);
        for (i, (source, delta)) in tensor.sources[1..].iter().zip(rows.chunks_mut(GRAM_BLOCK)).enumerate() {
            let mut sum = family.read_delta(source, start, &base[..count], &mut delta[..count]);
            if let Some(scales) = scales {
                kernel::quantize_int8(&mut delta[..count], scales[i]);
                sum = kernel::sum(&delta[..count]);
            }
            delta[count..padded].fill(0.0);
            gram.add_sum(i, sum);
        }
        gram.add_products(rows, GRAM_BLOCK, padded);
    }
    let (sums, products) = gram.totals();
    if sums.iter().chain(&products).all(|v| v.is_finite()) {
        return ChunkOutcome::Moments(Moments::from_raw_sums(len, &sums, &products));
    }
    ChunkOutcome::NonFinite(nonfinite_source(family, tensor, first, len, buffer))
}

/// Σ(aᵢ − aⱼ)² over one tensor, swept directly: for a pair whose distance from raw sums may have
/// cancelled (two nearly equal fine-tunes). The extra read is added to the progress total.
fn direct_squared_distance(
    family: &Family,
    tensor: &PlannedTensor,
    (i, j): (usize, usize),
    scales: Option<&[f64]>,
    progress: &Progress,
) -> Result<f64> {
    progress.total.fetch_add(tensor.bytes(), Ordering::Relaxed);
    let parts = par_chunks(tensor, progress, |buffer, first, len| {
        let (base, rest) = buffer.split_at_mut(CHUNK);
        let (x, y) = rest.split_at_mut(CHUNK);
        let (base, x, y) = (&mut base[..len], &mut x[..len], &mut y[..len]);
        family.read_f64(&tensor.sources[0], first, base);
        for (delta, model) in [(&mut *x, i), (&mut *y, j)] {
            family.read_delta(&tensor.sources[model + 1], first, base, delta);
            if let Some(scales) = scales {
                kernel::quantize_int8(delta, scales[model]);
            }
        }
        kernel::centred_dot_and_squared_distance(x, y, 0.0, 0.0).1
    })?;
    Ok(parts.iter().sum())
}

/// The two-model chunk without quantisation: decode, then one fused sweep (the hot path of
/// `modelkin kinship`).
fn pair_chunk(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    buffer: &mut [f64],
) -> ChunkOutcome {
    let dtypes: Vec<FloatDtype> = tensor.sources.iter().map(|s| s.dtype).collect();
    let sums = match dtypes[..] {
        [FloatDtype::BF16, FloatDtype::BF16, FloatDtype::BF16] => {
            staged_pair_sums::<u16>(family, tensor, first, len, kernel::pair_delta_sums_bf16)
        }
        [FloatDtype::F32, FloatDtype::F32, FloatDtype::F32] => {
            staged_pair_sums::<f32>(family, tensor, first, len, kernel::pair_delta_sums_f32)
        }
        _ => {
            let (z, rest) = buffer.split_at_mut(CHUNK);
            let (x, y) = rest.split_at_mut(CHUNK);
            let (z, x, y) = (&mut z[..len], &mut x[..len], &mut y[..len]);
            family.read_f64(&tensor.sources[0], first, z);
            family.read_f64(&tensor.sources[1], first, x);
            family.read_f64(&tensor.sources[2], first, y);
            kernel::pair_delta_sums(x, y, z)
        }
    };
    if sums.iter().all(|s| s.is_finite()) {
        return ChunkOutcome::Moments(Moments::from_pair_sums(len, sums));
    }
    ChunkOutcome::NonFinite(nonfinite_source(family, tensor, first, len, buffer))
}

/// A fused pair kernel: raw sums of (x − z, y − z) over stored words.
type PairSums<T> = fn(&[T], &[T], &[T]) -> [f64; 6];

/// Words staged per step of the fused pair path: three of them stay in L1.
const PAIR_STAGE: usize = 2048;

/// Raw pair sums of one chunk whose three sources share a dtype stored as `T` words: the bytes are
/// copied into aligned staging arrays and widened inside `sums`.
fn staged_pair_sums<T: bytemuck::Pod + Default>(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    sums: PairSums<T>,
) -> [f64; 6] {
    let mut staging = [[T::default(); PAIR_STAGE]; 3];
    let mut total = [0.0f64; 6];
    for start in (first..first + len).step_by(PAIR_STAGE) {
        let count = PAIR_STAGE.min(first + len - start);
        for (stage, source) in staging.iter_mut().zip(&tensor.sources) {
            crate::io::dtype::stage(family.raw_bytes(source, start, count), &mut stage[..count]);
        }
        let [z, x, y] = &staging;
        let part = sums(&x[..count], &y[..count], &z[..count]);
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    total
}

/// Which source of a chunk holds NaN/Inf (the base when it does, since it spoils every delta).
fn nonfinite_source(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    buffer: &mut [f64],
) -> usize {
    let values = &mut buffer[..len];
    tensor
        .sources
        .iter()
        .position(|source| {
            family.read_f64(source, first, values);
            !kernel::sum(values).is_finite()
        })
        .unwrap_or(0)
}

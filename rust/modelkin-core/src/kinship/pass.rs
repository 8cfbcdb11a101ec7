//! One streaming pass over a base model and k fine-tunes: per-tensor moments of every delta.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::io::dtype::FloatDtype;
use crate::io::error::{Error, Result};
use crate::io::progress::Progress;
use crate::io::threads::with_threads;
use crate::kinship::family::{release, Family, Plan, PlannedTensor};
use crate::kinship::gram::stored_chunk_sums;
use crate::kinship::kernel;
use crate::kinship::options::PassOptions;
use crate::kinship::report::{KinshipReport, SkippedTensor, TensorStats};
use crate::kinship::stats::{raw_sum_relative_error, Mode, Moments};

/// Elements per work item: large enough to amortise scheduling, small enough that k+1 decoded
/// buffers of it stay in a core's L2 cache.
const CHUNK: usize = 16 * 1024;

/// Elements per work item of the two-model pass over stored bytes. Its raw sums keep 32 partial
/// sums (see `kernel::pair`), so each adds PAIR_CHUNK / 32 terms: as many as a CHUNK's eight did.
const PAIR_CHUNK: usize = 4 * CHUNK;

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
        let scale = |t: usize| scales.as_ref().map(|s| &s[t]);
        // Pass one already found NaN/Inf in some tensors; they are not read again.
        let read: Vec<usize> = (0..plan.len()).filter(|&t| !matches!(scale(t), Some(Err(_)))).collect();
        let scale_of = |t: usize| match scale(t) {
            Some(Ok(scale)) => Some(scale.as_slice()),
            _ => None,
        };
        let mut sums: Vec<std::result::Result<Moments, usize>> =
            plan.iter().map(|tensor| Ok(Moments::empty(tensor.sources.len() - 1))).collect();
        par_tensor_chunks(
            family,
            plan,
            &read,
            |t| if stored_pair(&plan[t], scale_of(t)) { PAIR_CHUNK } else { CHUNK },
            progress,
            |t, buffer, first, len| {
                let tensor = &plan[t];
                if pair_path(tensor, scale_of(t)) {
                    pair_chunk(family, tensor, first, len, buffer)
                } else {
                    gram_chunk(family, tensor, first, len, scale_of(t), buffer)
                }
            },
            // Chunk by chunk in order, so the merged moments do not depend on the scheduling.
            |t, outcome| match (outcome, &mut sums[t]) {
                (ChunkOutcome::Moments(m), Ok(moments)) => moments.merge(&m),
                // The first chunk with NaN/Inf names the culprit.
                (ChunkOutcome::NonFinite(culprit), sums @ Ok(_)) => *sums = Err(culprit),
                (ChunkOutcome::MaxAbs(_), _) => unreachable!("the moments pass yields no maxima"),
                (_, Err(_)) => {}
            },
        )?;
        let mut tensors = Vec::with_capacity(plan.len());
        for (t, (tensor, outcome)) in plan.iter().zip(sums).enumerate() {
            let outcome = match (scale(t), outcome) {
                (Some(Err(culprit)), _) => Err(*culprit),
                (_, Ok(mut moments)) => {
                    recheck_distances(family, tensor, &mut moments, scale_of(t), progress)?;
                    Ok(moments)
                }
                (_, Err(culprit)) => Err(culprit),
            };
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

/// Work items per parallel sweep of [`par_tensor_chunks`]: enough that the threads seldom wait for
/// each other at a sweep's end, few enough that the outcomes held until then stay small.
const WINDOW: usize = 2048;

/// Runs `work(t, buffer, first, len)` over the chunks of the tensors `plan[t]` for t in `tensors`,
/// `chunk(t)` elements each, in parallel across tensors: no thread waits at the end of a tensor
/// for the others to finish theirs (a pass over a model of hundreds of tensors would wait
/// hundreds of times). Each outcome goes to `fold(t, outcome)` in the order of the tensors and
/// their chunks, so what it folds does not depend on the scheduling. A tensor's pages are let go
/// once its last chunk is done. `buffer` holds (k + 1)·[`CHUNK`] values whatever the chunk is.
fn par_tensor_chunks<T, W>(
    family: &Family,
    plan: &[PlannedTensor],
    tensors: &[usize],
    chunk: impl Fn(usize) -> usize,
    progress: &Progress,
    work: W,
    mut fold: impl FnMut(usize, T),
) -> Result<()>
where
    T: Send,
    W: Fn(usize, &mut [f64], usize, usize) -> T + Sync + Send,
{
    // Every chunk of every tensor, in reading order: (tensor, first element, elements).
    let mut items = Vec::new();
    for &t in tensors {
        let (numel, chunk) = (plan[t].numel, chunk(t));
        items.extend((0..numel.div_ceil(chunk)).map(|c| (t, c * chunk, chunk.min(numel - c * chunk))));
        if numel == 0 {
            release(family, &plan[t]);
        }
    }
    let remaining: Vec<AtomicUsize> = plan
        .iter()
        .enumerate()
        .map(|(t, tensor)| AtomicUsize::new(tensor.numel.div_ceil(chunk(t).max(1))))
        .collect();
    for window in items.chunks(WINDOW) {
        let outcomes = window
            .par_iter()
            .map(|&(t, first, len)| {
                progress.check()?;
                let tensor = &plan[t];
                let k = tensor.sources.len() - 1;
                // One buffer per worker thread for the whole pass: allocating per job would map
                // and fault in fresh zero pages over and over.
                let outcome = CHUNK_BUFFER.with_borrow_mut(|buffer| {
                    buffer.resize(buffer.len().max((k + 1) * CHUNK), 0.0);
                    work(t, &mut buffer[..(k + 1) * CHUNK], first, len)
                });
                let bytes_per_element: u64 = tensor.sources.iter().map(|s| s.dtype.size() as u64).sum();
                progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
                if remaining[t].fetch_sub(1, Ordering::AcqRel) == 1 {
                    release(family, tensor);
                }
                Ok(outcome)
            })
            .collect::<Result<Vec<T>>>()?;
        for (&(t, _, _), outcome) in window.iter().zip(outcomes) {
            fold(t, outcome);
        }
    }
    Ok(())
}

/// Runs `work(buffer, first, len)` over one tensor's chunks in parallel; the results in order.
fn par_chunks<T, F>(tensor: &PlannedTensor, progress: &Progress, work: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&mut [f64], usize, usize) -> T + Sync + Send,
{
    let k = tensor.sources.len() - 1;
    let bytes_per_element: u64 = tensor.sources.iter().map(|s| s.dtype.size() as u64).sum();
    (0..tensor.numel.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            progress.check()?;
            let (first, len) = (c * CHUNK, CHUNK.min(tensor.numel - c * CHUNK));
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
    let mut scales: Vec<Scales> =
        plan.iter().map(|tensor| Ok(vec![0.0f64; tensor.sources.len() - 1])).collect();
    let all: Vec<usize> = (0..plan.len()).collect();
    par_tensor_chunks(
        family,
        plan,
        &all,
        |_| CHUNK,
        progress,
        |t, buffer, first, len| {
            let tensor = &plan[t];
            if let Err(culprit) = load_deltas(family, tensor, first, len, buffer) {
                return ChunkOutcome::NonFinite(culprit);
            }
            let k = tensor.sources.len() - 1;
            ChunkOutcome::MaxAbs(
                (0..k).map(|i| kernel::max_abs(&buffer[(i + 1) * CHUNK..(i + 1) * CHUNK + len])).collect(),
            )
        },
        |t, outcome| match (outcome, &mut scales[t]) {
            (ChunkOutcome::MaxAbs(m), Ok(max)) => max.iter_mut().zip(m).for_each(|(a, b)| *a = a.max(b)),
            (ChunkOutcome::NonFinite(culprit), max @ Ok(_)) => *max = Err(culprit),
            _ => {}
        },
    )?;
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

/// Whether a tensor's chunks go to the two-model kernel (two fine-tunes, no quantisation).
fn pair_path(tensor: &PlannedTensor, scales: Option<&[f64]>) -> bool {
    tensor.sources.len() == 3 && scales.is_none()
}

/// Whether the two-model kernel reads the tensor's stored bytes directly (its sources share a
/// dtype): it then needs no buffer, and its chunks can be longer ([`PAIR_CHUNK`]), which spreads
/// the per-chunk costs (scheduling, merging moments) over more elements.
fn stored_pair(tensor: &PlannedTensor, scales: Option<&[f64]>) -> bool {
    pair_path(tensor, scales) && tensor.sources.iter().all(|s| s.dtype == tensor.sources[0].dtype)
}

/// Replaces the distances of the all-pairs path that may have cancelled in the raw-sum identity
/// with ones swept directly (the two-model kernel sums Σ(a − b)² itself).
fn recheck_distances(
    family: &Family,
    tensor: &PlannedTensor,
    moments: &mut Moments,
    scales: Option<&[f64]>,
    progress: &Progress,
) -> Result<()> {
    if pair_path(tensor, scales) {
        return Ok(());
    }
    let k = tensor.sources.len() - 1;
    for i in 0..k {
        for j in i + 1..k {
            if moments.distance_may_have_cancelled(i, j, raw_sum_relative_error(CHUNK)) {
                let direct = direct_squared_distance(family, tensor, (i, j), scales, progress)?;
                moments.set_squared_distance(i, j, direct);
            }
        }
    }
    Ok(())
}

/// The moments of one chunk of the all-pairs path (see [`stored_chunk_sums`]).
fn gram_chunk(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    scales: Option<&[f64]>,
    buffer: &mut [f64],
) -> ChunkOutcome {
    let sources: Vec<(FloatDtype, &[u8])> =
        tensor.sources.iter().map(|s| (s.dtype, family.raw_bytes(s, first, len))).collect();
    let (sums, products) = stored_chunk_sums(&sources, len, scales, buffer);
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

/// The two-model chunk without quantisation (the hot path of `modelkin kinship`): one sweep over
/// the mapped bytes when the three sources share a dtype; otherwise they are widened first.
fn pair_chunk(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    buffer: &mut [f64],
) -> ChunkOutcome {
    let [z, x, y] = [0, 1, 2].map(|s| &tensor.sources[s]);
    let sums = if x.dtype == z.dtype && y.dtype == z.dtype {
        let [z, x, y] = [z, x, y].map(|s| family.raw_bytes(s, first, len));
        kernel::pair_delta_sums_stored(tensor.sources[0].dtype, x, y, z)
    } else {
        let (zb, rest) = buffer.split_at_mut(CHUNK);
        let (xb, yb) = rest.split_at_mut(CHUNK);
        let (zb, xb, yb) = (&mut zb[..len], &mut xb[..len], &mut yb[..len]);
        family.read_f64(z, first, zb);
        family.read_f64(x, first, xb);
        family.read_f64(y, first, yb);
        kernel::pair_delta_sums(xb, yb, zb)
    };
    if sums.iter().all(|s| s.is_finite()) {
        return ChunkOutcome::Moments(Moments::from_pair_sums(len, sums));
    }
    ChunkOutcome::NonFinite(nonfinite_source(family, tensor, first, len, buffer))
}

/// Which source of a chunk holds NaN/Inf (the base when it does, since it spoils every delta).
fn nonfinite_source(
    family: &Family,
    tensor: &PlannedTensor,
    first: usize,
    len: usize,
    buffer: &mut [f64],
) -> usize {
    // A chunk may be longer than the buffer (see PAIR_CHUNK): each source is read a piece at a time.
    let step = buffer.len().min(len).max(1);
    tensor
        .sources
        .iter()
        .position(|source| {
            (first..first + len).step_by(step).any(|start| {
                let values = &mut buffer[..step.min(first + len - start)];
                family.read_f64(source, start, values);
                !kernel::sum(values).is_finite()
            })
        })
        .unwrap_or(0)
}

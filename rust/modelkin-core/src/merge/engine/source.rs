//! Where a merge's numbers come from: each output tensor's inputs resolved to stored tensors (a
//! [`Source`] per model, checked for shape), decoded block by block into per-thread buffers, and
//! the magnitudes the pruning passes rank, widened straight from the file bytes.

use std::sync::Arc;

use crate::io::dtype::FloatDtype;
use crate::io::error::{Error, Result};
use crate::io::model::{Model, TensorEntry};
use crate::io::progress::Progress;
use crate::kinship::family::cut_shape;
use crate::merge::engine::job::{MergeJob, TensorRecipe};
use crate::merge::engine::method::Sparsification;
use crate::merge::engine::scratch::Scratch;
use crate::merge::torch::half_ops;

/// Elements per row block of the merge.
pub(crate) const BLOCK: usize = 1 << 16;

#[derive(Clone)]
pub(crate) struct Source<'m> {
    pub(super) model: &'m Model,
    pub(super) entry: &'m TensorEntry,
    pub(crate) dtype: FloatDtype,
    /// The half type mergekit's arithmetic works in (`dtype: bfloat16`/`float16`), if any.
    pub(super) half: Option<half_ops::Half>,
    /// Whether loading rounds the stored values to `half` (they are not stored in it already).
    pub(super) rounds_on_load: bool,
}

impl Source<'_> {
    pub(super) fn read(&self, first: usize, out: &mut [f64]) {
        self.model.read_f64(self.entry, self.dtype, first, out);
        if let (Some(h), true) = (self.half, self.rounds_on_load) {
            out.iter_mut().for_each(|v| *v = h.load(*v));
        }
    }
}

pub(crate) struct Resolved<'m> {
    pub(crate) recipe: &'m TensorRecipe,
    pub(crate) base: Option<Source<'m>>,
    pub(crate) inputs: Vec<Source<'m>>,
    pub(crate) shape: Vec<usize>,
    pub(crate) numel: usize,
    /// Elements per row (a 1-D tensor is one row), for methods that rank within rows.
    pub(crate) row: usize,
    /// Elements per block: whole rows when the method ranks within rows.
    pub(crate) block: usize,
}

impl<'m> Resolved<'m> {
    /// The base (when there is one), then the inputs: the order `with_block` views come in.
    pub(crate) fn sources(&self) -> Vec<&Source<'m>> {
        self.base.iter().chain(&self.inputs).collect()
    }
}

fn source<'m>(
    job: &MergeJob,
    models: &'m [Arc<Model>],
    index: usize,
    name: &str,
    rows: Option<usize>,
    shape: Option<&[usize]>,
) -> Result<(Source<'m>, Vec<usize>)> {
    let model = models
        .get(index)
        .ok_or_else(|| Error::InvalidArgument(format!("model index {index} out of range")))?;
    let entry = model
        .tensor(name)
        .ok_or_else(|| Error::MissingTensor { path: model.path.clone(), tensor: name.to_string() })?;
    let cut = cut_shape(&entry.shape, rows);
    if let Some(expected) = shape {
        if cut != expected {
            return Err(Error::ShapeMismatch {
                path: model.file_of(entry).to_path_buf(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: cut,
            });
        }
    }
    let dtype = model.float_dtype(name, entry)?;
    let half = job.compute.half();
    // Loading bf16 values as bf16 (or f16 as f16) changes nothing.
    let rounds_on_load = !matches!(
        (half, dtype),
        (None, _)
            | (Some(half_ops::Half::Bf16), FloatDtype::BF16)
            | (Some(half_ops::Half::F16), FloatDtype::F16)
    );
    Ok((Source { model, entry, dtype, half, rounds_on_load }, cut))
}

pub(super) fn resolve<'m>(job: &'m MergeJob, models: &'m [Arc<Model>]) -> Result<Vec<Resolved<'m>>> {
    job.tensors
        .iter()
        .map(|recipe| {
            // The base's shape is the output's. A fine-tune with another vocabulary size is refused,
            // as mergekit 0.1.5 refuses it: cutting its rows would pair unrelated tokens' rows.
            let (base, mut shape) = match (recipe.base_model.or(job.base), &recipe.base_tensor) {
                (Some(b), Some(name)) => {
                    let (s, shape) = source(job, models, b, name, None, None)?;
                    (Some(s), Some(shape))
                }
                _ => (None, None),
            };
            let mut inputs = Vec::with_capacity(recipe.inputs.len());
            for input in &recipe.inputs {
                let (s, cut) = source(job, models, input.model, &input.tensor, None, shape.as_deref())?;
                shape.get_or_insert(cut);
                inputs.push(s);
            }
            let shape = shape
                .ok_or_else(|| Error::InvalidArgument(format!("tensor '{}' has no inputs", recipe.name)))?;
            let numel: usize = shape.iter().product();
            let row = if shape.len() < 2 { numel.max(1) } else { (numel / shape[0].max(1)).max(1) };
            let block = match job.method.sparsification() {
                Some(Sparsification::DellaMagprune) => row * (BLOCK / row).max(1),
                _ => BLOCK,
            };
            Ok(Resolved { recipe, base, inputs, shape, numel, row, block })
        })
        .collect()
}

pub(super) fn read_bytes(tensor: &Resolved) -> u64 {
    tensor.base.iter().chain(&tensor.inputs).map(|s| (tensor.numel * s.dtype.size()) as u64).sum()
}

/// |x − z| rounded to f32 (then to the half type mergekit works in, if any), as bits: the
/// magnitude mergekit ranks by.
#[inline(always)]
pub(super) fn magnitude_bits(x: f64, z: f64, half: Option<half_ops::Half>) -> u32 {
    let d = (x as f32) - (z as f32);
    half.map_or(d, |h| h.round(d)).abs().to_bits()
}

/// Sets `out[e]` to `key(e, magnitude)` for elements `first + e` of input − base, the magnitude as
/// in [`magnitude_bits`]. bf16 pairs are widened in registers straight from the file bytes:
/// decoding them to f64 buffers first would double the cost of the passes that rank magnitudes.
#[inline(always)]
pub(crate) fn map_magnitudes<T>(
    base: &Source,
    input: &Source,
    first: usize,
    out: &mut [T],
    key: impl Fn(usize, u32) -> T,
) {
    // With half arithmetic the difference itself is rounded to the half type.
    let half = base.half;
    if base.dtype == FloatDtype::BF16 && input.dtype == FloatDtype::BF16 && !input.rounds_on_load {
        let z = base.model.raw_bytes(base.entry, base.dtype, first, out.len());
        let x = input.model.raw_bytes(input.entry, input.dtype, first, out.len());
        match half {
            None => bf16_magnitudes::<half_ops::NoRounding, T>(x, z, out, key),
            Some(half_ops::Half::Bf16) => bf16_magnitudes::<half_ops::Bf16Rounding, T>(x, z, out, key),
            Some(half_ops::Half::F16) => bf16_magnitudes::<half_ops::F16Rounding, T>(x, z, out, key),
        }
    } else {
        with_block(&[base, input], first, out.len(), |v| {
            for (e, (o, (x, z))) in out.iter_mut().zip(v[1].iter().zip(v[0])).enumerate() {
                *o = key(e, magnitude_bits(*x, *z, half));
            }
        });
    }
}

/// [`map_magnitudes`] over stored bf16 bytes, with the difference rounded by `R` (branch-free, so
/// the loop vectorises).
#[inline(always)]
fn bf16_magnitudes<R: half_ops::Rounding, T>(
    x: &[u8],
    z: &[u8],
    out: &mut [T],
    key: impl Fn(usize, u32) -> T,
) {
    let widen = |b: &[u8]| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    for (e, (o, (x, z))) in out.iter_mut().zip(x.chunks_exact(2).zip(z.chunks_exact(2))).enumerate() {
        *o = key(e, R::round(widen(x) - widen(z)).abs().to_bits());
    }
}

/// Decodes elements `first..first + len` of every source into buffers of this thread's scratch
/// pool and hands them to `work`.
pub(crate) fn with_block<T>(
    sources: &[&Source],
    first: usize,
    len: usize,
    work: impl FnOnce(&[&[f64]]) -> T,
) -> T {
    let mut scratch = Scratch::take::<f64>(sources.len(), len);
    let mut buffers = scratch.views::<f64>(len);
    for (source, buffer) in sources.iter().zip(buffers.iter_mut()) {
        source.read(first, buffer);
    }
    let views: Vec<&[f64]> = buffers.into_iter().map(|b| &*b).collect();
    work(&views)
}

/// Sweeps a tensor's blocks in order, for reductions whose result depends on it (torch's), handing
/// `visit` each block's first element, its decoded base (when there is one) and its inputs.
pub(crate) fn sweep_in_order(
    tensor: &Resolved,
    progress: &Progress,
    mut visit: impl FnMut(usize, Option<&[f64]>, &[&[f64]]),
) -> Result<()> {
    let sources = tensor.sources();
    let has_base = tensor.base.is_some();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let n = tensor.numel;
    for first in (0..n).step_by(tensor.block) {
        progress.check()?;
        let len = tensor.block.min(n - first);
        with_block(&sources, first, len, |v| match has_base {
            true => visit(first, Some(v[0]), &v[1..]),
            false => visit(first, None, v),
        });
        progress.done.fetch_add(len as u64 * bytes_per_element, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

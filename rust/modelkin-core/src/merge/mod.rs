//! Merging models tensor by tensor, with mergekit's method definitions, in bounded memory.
//!
//! Every output tensor is computed in row blocks. A method that needs a whole-tensor statistic
//! (a magnitude threshold, an L1 norm, a norm or cosine) takes it in a first streamed pass over
//! that tensor; nothing holds a model's tensor decoded in full. The parents' deltas against the
//! base are measured for kinship while the output pass reads them.

mod combine;
mod float32;
mod fusion;
mod half_ops;
mod methods;
mod model_stock;
mod radix;
mod ram;
mod sort_order;
mod spherical;
mod statistics;
mod table;
mod task_vectors;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use serde::Deserialize;

use crate::dtype::FloatDtype;
use crate::encode::OutDtype;
use crate::error::{Error, Result};
use crate::family::cut_shape;
use crate::model::{Model, TensorEntry};
use crate::progress::Progress;
use crate::report::{KinshipReport, TensorStats};
use crate::threads::with_threads;
use crate::writer::{MemoryWriter, OutputTensor, ShardedWriter, TensorSink};

pub use methods::{
    BaseUse, DefaultValue, Inputs, Method, MethodSpec, Parameter, Range, Scope, Sparsification, Statistics,
    METHODS,
};
pub use ram::RamOptions;
use statistics::TensorStatistics;

/// Elements per row block of the merge.
const BLOCK: usize = 1 << 16;
/// Blocks computed in parallel before their bytes are written in order.
const BLOCKS_IN_FLIGHT: usize = 32;

fn one() -> f64 {
    1.0
}

/// One model's contribution to one output tensor, with its resolved parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeInput {
    /// Index into [`MergeJob::models`].
    pub model: usize,
    /// Tensor name in that model.
    pub tensor: String,
    /// `weight` parameter (passthrough: its `scale`).
    #[serde(default = "one")]
    pub weight: f64,
    /// `density` parameter.
    #[serde(default = "one")]
    pub density: f64,
    /// `gamma` parameter (breadcrumbs).
    #[serde(default)]
    pub gamma: f64,
    /// `epsilon` parameter (della).
    #[serde(default)]
    pub epsilon: f64,
}

/// How one output tensor is made.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRecipe {
    /// Output tensor name.
    pub name: String,
    /// The base model's tensor name, for methods that use a base.
    pub base_tensor: Option<String>,
    /// The model the base tensor is read from when not the job's base (a vocabulary laid out
    /// in the output tokenizer's order, written to a scratch file beforehand).
    #[serde(default)]
    pub base_model: Option<usize>,
    /// The merged models, in the config's order (the base excluded).
    pub inputs: Vec<MergeInput>,
    /// `t` parameter (slerp, nearswap).
    #[serde(default)]
    pub t: f64,
    /// `select_topk` parameter (sce).
    #[serde(default = "one")]
    pub select_topk: f64,
}

/// Global options of the spherical methods (mergekit's defaults when absent).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SphericalOptions {
    /// multislerp: divide the weights by their sum.
    pub normalize_weights: bool,
    /// multislerp: numerical floor of norms.
    pub eps: f64,
    /// karcher: iterations.
    pub max_iter: usize,
    /// karcher: convergence tolerance.
    pub tol: f64,
    /// nuslerp: one interpolation over the flattened tensors (else per vector).
    pub flatten: bool,
    /// nuslerp without flattening: vectors along the first axis instead of rows.
    pub row_wise: bool,
}

impl Default for SphericalOptions {
    fn default() -> Self {
        SphericalOptions {
            normalize_weights: true,
            eps: 1e-8,
            max_iter: 10,
            tol: 1e-5,
            flatten: true,
            row_wise: false,
        }
    }
}

/// The precision merged values are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compute {
    /// Exact float64 arithmetic (the default).
    Float64,
    /// Every operation rounded to float32 in mergekit's order, as mergekit's `dtype: float32`.
    Float32,
    /// Inputs loaded as bfloat16 and every operation rounded as mergekit's `dtype: bfloat16`.
    Bfloat16,
    /// Inputs loaded as float16 and every operation rounded as mergekit's `dtype: float16`.
    Float16,
}

impl Compute {
    /// The half type inputs are loaded in and operations rounded to, if any.
    pub(crate) fn half(self) -> Option<half_ops::Half> {
        match self {
            Compute::Bfloat16 => Some(half_ops::Half::Bf16),
            Compute::Float16 => Some(half_ops::Half::F16),
            _ => None,
        }
    }

    /// Whether whole-tensor statistics follow torch's float32 reductions: mergekit's slerp and
    /// linear compute in float32 from half inputs too.
    pub(crate) fn float32_order(self) -> bool {
        self != Compute::Float64
    }

    /// Rounds one result to the working precision.
    pub(crate) fn rounding(self) -> fn(f64) -> f64 {
        match self {
            Compute::Float64 => |v| v,
            Compute::Float32 | Compute::Bfloat16 | Compute::Float16 => |v| f64::from(v as f32),
        }
    }
}

fn yes() -> bool {
    true
}

fn sort_order_bytes() -> u64 {
    512 << 20
}

fn float64() -> Compute {
    Compute::Float64
}

/// A whole merge, as the Python layer resolves it from a mergekit YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeJob {
    /// Local paths of every model the recipe names.
    pub models: Vec<PathBuf>,
    /// Index of the base model, if any.
    pub base: Option<usize>,
    /// The method.
    pub method: Method,
    /// Divide by the sum of (masked) weights.
    pub normalize: bool,
    /// Rescale pruned task vectors to keep their L1 norm (DARE).
    pub rescale: bool,
    /// Scale of the mixed task vector.
    pub lambda: f64,
    /// Seed of the random methods.
    pub seed: u64,
    /// Output dtype.
    pub out_dtype: OutDtype,
    /// Arithmetic precision.
    #[serde(default = "float64")]
    pub compute: Compute,
    /// Measure the parents' kinship while merging (every tensor must have the same inputs).
    #[serde(default = "yes")]
    pub kinship: bool,
    /// Options of ram and ramplus_tl.
    #[serde(default)]
    pub ram: RamOptions,
    /// model_stock: one interpolation factor per row (along the last axis) instead of per tensor.
    #[serde(default)]
    pub filter_wise: bool,
    /// Options of nuslerp, multislerp and karcher.
    #[serde(default)]
    pub spherical: SphericalOptions,
    /// Memory (bytes) magnitude pruning may hold to break ties at its threshold exactly as torch's
    /// sort does (8 bytes per element of a tensor); larger tensors use the streamed tie rule.
    #[serde(default = "sort_order_bytes")]
    pub sort_order_bytes: u64,
    /// Directory the shards are written into (it must exist); none keeps the merged model in
    /// memory ([`MergeReport::model`]).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// Largest shard size in bytes.
    pub max_shard_bytes: u64,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// The output tensors, in writing order.
    pub tensors: Vec<TensorRecipe>,
}

/// What a merge produced besides its files.
#[derive(Debug)]
pub struct MergeReport {
    /// The parents' kinship against the base (none without a base).
    pub kinship: Option<KinshipReport>,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// The merged model, when the job has no output directory.
    pub model: Option<Model>,
    /// Seconds spent on the tensors (statistics, merging, writing), after the models were opened
    /// and the job resolved: what the rest of a call's time is compared against.
    pub tensor_seconds: f64,
}

#[derive(Clone)]
struct Source<'m> {
    model: &'m Model,
    entry: &'m TensorEntry,
    dtype: FloatDtype,
    /// The half type mergekit's arithmetic works in (`dtype: bfloat16`/`float16`), if any.
    half: Option<half_ops::Half>,
    /// Whether loading rounds the stored values to `half` (they are not stored in it already).
    rounds_on_load: bool,
}

impl Source<'_> {
    fn read(&self, first: usize, out: &mut [f64]) {
        self.model.read_f64(self.entry, self.dtype, first, out);
        if let (Some(h), true) = (self.half, self.rounds_on_load) {
            out.iter_mut().for_each(|v| *v = h.load(*v));
        }
    }
}

struct Resolved<'m> {
    recipe: &'m TensorRecipe,
    base: Option<Source<'m>>,
    inputs: Vec<Source<'m>>,
    shape: Vec<usize>,
    numel: usize,
    /// Elements per row (a 1-D tensor is one row), for methods that rank within rows.
    row: usize,
    /// Elements per block: whole rows when the method ranks within rows.
    block: usize,
}

impl<'m> Resolved<'m> {
    /// The base (when there is one), then the inputs: the order `with_block` views come in.
    fn sources(&self) -> Vec<&Source<'m>> {
        self.base.iter().chain(&self.inputs).collect()
    }
}

/// Runs a merge job: reads every input tensor once for the output (plus one streamed statistics
/// pass where the method needs it) and writes the shards into `job.out_dir`, or, without one,
/// into memory (the merged model's size, plus the engine's bounded working set).
pub fn run_merge(job: &MergeJob, progress: &Progress) -> Result<MergeReport> {
    let models = job.models.iter().map(Model::open).collect::<Result<Vec<_>>>()?;
    with_threads(job.threads, || merge_models(job, &models, progress))
}

/// The label a merged model held in memory goes by in messages.
pub const IN_MEMORY_LABEL: &str = "<merged model in memory>";

fn source<'m>(
    job: &MergeJob,
    models: &'m [Model],
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

fn resolve<'m>(job: &'m MergeJob, models: &'m [Model]) -> Result<Vec<Resolved<'m>>> {
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

fn merge_models(job: &MergeJob, models: &[Model], progress: &Progress) -> Result<MergeReport> {
    let resolved = resolve(job, models)?;
    let start = std::time::Instant::now();
    let outputs: Vec<OutputTensor> = resolved
        .iter()
        .map(|r| OutputTensor { name: r.recipe.name.clone(), shape: r.shape.clone(), dtype: job.out_dtype })
        .collect();
    let total: u64 = resolved.iter().map(|r| read_bytes(r) * (1 + statistics_passes(job))).sum();
    progress.total.store(total, Ordering::Relaxed);
    let mut writer = match &job.out_dir {
        Some(dir) => Output::Disk(ShardedWriter::create(dir, &outputs, job.max_shard_bytes)?),
        None => Output::Memory(MemoryWriter::create(&outputs)),
    };
    let mut kinship = Vec::new();
    let mut bytes_written = 0u64;
    let pool = sort_order::EntryPool::new(job.sort_order_bytes);
    let measure = |index: usize| -> Result<Option<TensorStatistics>> {
        resolved.get(index).map(|t| TensorStatistics::measure(job, index, t, &pool, progress)).transpose()
    };
    // Each tensor's statistics are measured while the previous tensor is written, so the cores
    // idle in one stage (a replayed sort runs on one core per input) pick up the other.
    let mut statistics = measure(0)?;
    for (index, tensor) in resolved.iter().enumerate() {
        let current = statistics.take().expect("measured before its turn");
        let (next, written) = rayon::join(
            || measure(index + 1),
            || -> Result<_> {
                writer.sink().begin_tensor(index)?;
                combine::write_tensor(job, index, tensor, &current, writer.sink(), progress)
            },
        );
        let moments = written?;
        statistics = next?;
        bytes_written += (tensor.numel * job.out_dtype.size()) as u64;
        if let (Some(moments), true) = (moments, job.kinship) {
            kinship.push(TensorStats {
                name: tensor.recipe.name.clone(),
                shape: tensor.shape.clone(),
                moments,
            });
        }
        for s in tensor.base.iter().chain(&tensor.inputs) {
            s.model.release(s.entry);
        }
    }
    let model = writer.finish()?;
    let parents = resolved.first().map_or(0, |r| r.inputs.len());
    let kinship = (!kinship.is_empty()).then(|| KinshipReport::new(parents, kinship, Vec::new()));
    Ok(MergeReport { kinship, bytes_written, model, tensor_seconds: start.elapsed().as_secs_f64() })
}

/// Where the merged tensors go.
enum Output {
    Disk(ShardedWriter),
    Memory(MemoryWriter),
}

impl Output {
    fn sink(&mut self) -> &mut dyn TensorSink {
        match self {
            Output::Disk(w) => w,
            Output::Memory(w) => w,
        }
    }

    /// Syncs the files, or hands over the model held in memory.
    fn finish(self) -> Result<Option<Model>> {
        match self {
            Output::Disk(w) => w.finish().map(|()| None),
            Output::Memory(w) => w.finish(IN_MEMORY_LABEL).map(Some),
        }
    }
}

fn read_bytes(tensor: &Resolved) -> u64 {
    tensor.base.iter().chain(&tensor.inputs).map(|s| (tensor.numel * s.dtype.size()) as u64).sum()
}

/// Extra full reads of the tensor the method's statistics take (for the progress total).
fn statistics_passes(job: &MergeJob) -> u64 {
    match (job.method.spec().statistics, job.method.sparsification()) {
        (Statistics::Sparsification, Some(Sparsification::Magnitude | Sparsification::MagnitudeOutliers)) => {
            2 + u64::from(job.rescale)
        }
        (Statistics::Sparsification, _) => u64::from(job.rescale),
        (Statistics::Variance, _) => 3,
        // float32 slerp sweeps its runs twice: torch's norms, then the cosine over the normalised runs.
        (Statistics::Norms, _) if job.method == Method::Slerp && job.compute.float32_order() => 2,
        (Statistics::Norms, _) => 1,
        // The rows' KL divergences, then the two histogram passes of the quartiles.
        (Statistics::Importance, _) => 3,
        (Statistics::None, _) => 0,
    }
}

fn no_base(job: &MergeJob) -> Error {
    Error::InvalidArgument(format!("merge method {} needs a base_model", job.method.name()))
}

/// A reproducible uniform in [0, 1) for (seed, tensor, input, element), independent of threads.
fn uniform(seed: u64, tensor: usize, input: usize, element: usize) -> f64 {
    let stream = splitmix64(splitmix64(seed ^ splitmix64(tensor as u64)) ^ input as u64);
    (splitmix64(stream.wrapping_add(element as u64)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// |x − z| rounded to f32 (then to the half type mergekit works in, if any), as bits: the
/// magnitude mergekit ranks by.
#[inline(always)]
fn magnitude_bits(x: f64, z: f64, half: Option<half_ops::Half>) -> u32 {
    let d = (x as f32) - (z as f32);
    half.map_or(d, |h| h.round(d)).abs().to_bits()
}

/// Sets `out[e]` to `key(e, magnitude)` for elements `first + e` of input − base, the magnitude as
/// in [`magnitude_bits`]. bf16 pairs are widened in registers straight from the file bytes:
/// decoding them to f64 buffers first would double the cost of the passes that rank magnitudes.
#[inline(always)]
fn map_magnitudes<T>(
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

thread_local! {
    /// Per-thread decode buffers, reused block after block: allocating them per block would map
    /// and zero fresh pages each time.
    static BLOCK_BUFFERS: std::cell::RefCell<Vec<Vec<f64>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes elements `first..first + len` of every source into this thread's buffers and hands
/// them to `work` (which must not call `with_block` itself).
fn with_block<T>(sources: &[&Source], first: usize, len: usize, work: impl FnOnce(&[&[f64]]) -> T) -> T {
    BLOCK_BUFFERS.with_borrow_mut(|buffers| {
        if buffers.len() < sources.len() {
            buffers.resize_with(sources.len(), Vec::new);
        }
        for (source, buffer) in sources.iter().zip(buffers.iter_mut()) {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            source.read(first, &mut buffer[..len]);
        }
        let views: Vec<&[f64]> = buffers[..sources.len()].iter().map(|b| &b[..len]).collect();
        work(&views)
    })
}

#[cfg(test)]
mod tests;

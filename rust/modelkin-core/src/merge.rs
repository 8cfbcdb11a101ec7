//! Merging models tensor by tensor, with mergekit's method definitions, in bounded memory.
//!
//! Every output tensor is computed in row blocks. A method that needs a whole-tensor statistic
//! (a magnitude threshold, an L1 norm, a norm or cosine) takes it in a first streamed pass over
//! that tensor; nothing holds a model's tensor decoded in full. The parents' deltas against the
//! base are measured for kinship while the output pass reads them.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use rayon::prelude::*;
use serde::Deserialize;

use crate::dtype::FloatDtype;
use crate::encode::{encode, OutDtype};
use crate::error::{Error, Result};
use crate::kinship::{cut_shape, KinshipReport, Progress, TensorStats};
use crate::model::{Model, TensorEntry};
use crate::stats::Moments;
use crate::writer::{OutputTensor, ShardedWriter};

/// Elements per row block of the merge.
const BLOCK: usize = 1 << 16;
/// Blocks computed in parallel before their bytes are written in order.
const BLOCKS_IN_FLIGHT: usize = 32;

/// A merge method, named as in mergekit's YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weighted average of the models (a model soup).
    Linear,
    /// Base plus the weighted sum of task vectors.
    TaskArithmetic,
    /// Task arithmetic with top-k magnitude pruning and sign election.
    Ties,
    /// Random (Bernoulli) pruning with L1 rescaling and sign election.
    DareTies,
    /// Random (Bernoulli) pruning with L1 rescaling.
    DareLinear,
    /// Drops the largest `gamma` and the smallest entries of each task vector.
    Breadcrumbs,
    /// Breadcrumbs with sign election.
    BreadcrumbsTies,
    /// Spherical interpolation between the base (t = 0) and one other model.
    Slerp,
    /// Model Stock: interpolation towards the average by the task vectors' mean cosine.
    ModelStock,
    /// Copies one model's tensor.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparsification {
    Magnitude,
    Random,
    MagnitudeOutliers,
}

impl Method {
    fn sparsification(self) -> Option<Sparsification> {
        match self {
            Method::Ties => Some(Sparsification::Magnitude),
            Method::DareTies | Method::DareLinear => Some(Sparsification::Random),
            Method::Breadcrumbs | Method::BreadcrumbsTies => {
                Some(Sparsification::MagnitudeOutliers)
            }
            _ => None,
        }
    }

    fn sign_consensus(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::DareTies | Method::BreadcrumbsTies
        )
    }

    fn task_vectors(self) -> bool {
        matches!(
            self,
            Method::TaskArithmetic
                | Method::Ties
                | Method::DareTies
                | Method::DareLinear
                | Method::Breadcrumbs
                | Method::BreadcrumbsTies
        )
    }
}

fn one() -> f64 {
    1.0
}

/// One model's contribution to one output tensor, with its resolved parameters.
#[derive(Debug, Clone, Deserialize)]
pub struct MergeInput {
    /// Index into [`MergeJob::models`].
    pub model: usize,
    /// Tensor name in that model.
    pub tensor: String,
    /// `weight` parameter.
    #[serde(default = "one")]
    pub weight: f64,
    /// `density` parameter.
    #[serde(default = "one")]
    pub density: f64,
    /// `gamma` parameter (breadcrumbs).
    #[serde(default)]
    pub gamma: f64,
}

/// How one output tensor is made.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorRecipe {
    /// Output tensor name.
    pub name: String,
    /// The base model's tensor name, for methods that use a base.
    pub base_tensor: Option<String>,
    /// The merged models, in the config's order (the base excluded).
    pub inputs: Vec<MergeInput>,
    /// `t` parameter (slerp).
    #[serde(default)]
    pub t: f64,
}

/// A whole merge, as the Python layer resolves it from a mergekit YAML.
#[derive(Debug, Clone, Deserialize)]
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
    /// Directory the shards are written into (it must exist).
    pub out_dir: PathBuf,
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
}

#[derive(Clone)]
struct Source<'m> {
    model: &'m Model,
    entry: &'m TensorEntry,
    dtype: FloatDtype,
}

impl Source<'_> {
    fn read(&self, first: usize, out: &mut [f64]) {
        self.model.read_f64(self.entry, self.dtype, first, out);
    }
}

struct Resolved<'m> {
    recipe: &'m TensorRecipe,
    base: Option<Source<'m>>,
    inputs: Vec<Source<'m>>,
    shape: Vec<usize>,
    numel: usize,
}

/// Runs a merge job: reads every input tensor once for the output (plus one streamed statistics
/// pass where the method needs it) and writes the shards into `job.out_dir`.
pub fn run_merge(job: &MergeJob, progress: &Progress) -> Result<MergeReport> {
    let models = job
        .models
        .iter()
        .map(Model::open)
        .collect::<Result<Vec<_>>>()?;
    let run = || merge_models(job, &models, progress);
    if job.threads == 0 {
        run()
    } else {
        rayon::ThreadPoolBuilder::new()
            .num_threads(job.threads)
            .build()
            .map_err(|e| {
                Error::InvalidArgument(format!("cannot start {} threads: {e}", job.threads))
            })?
            .install(run)
    }
}

fn source<'m>(
    models: &'m [Model],
    index: usize,
    name: &str,
    rows: Option<usize>,
    shape: Option<&[usize]>,
) -> Result<(Source<'m>, Vec<usize>)> {
    let model = models
        .get(index)
        .ok_or_else(|| Error::InvalidArgument(format!("model index {index} out of range")))?;
    let entry = model.tensor(name).ok_or_else(|| Error::MissingTensor {
        path: model.path.clone(),
        tensor: name.to_string(),
    })?;
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
    Ok((
        Source {
            model,
            entry,
            dtype: model.float_dtype(name, entry)?,
        },
        cut,
    ))
}

fn resolve<'m>(job: &'m MergeJob, models: &'m [Model]) -> Result<Vec<Resolved<'m>>> {
    job.tensors
        .iter()
        .map(|recipe| {
            // The base's shape is the output's; fine-tunes with extra vocabulary rows are cut to it.
            let (base, mut shape) = match (job.base, &recipe.base_tensor) {
                (Some(b), Some(name)) => {
                    let (s, shape) = source(models, b, name, None, None)?;
                    (Some(s), Some(shape))
                }
                _ => (None, None),
            };
            let mut inputs = Vec::with_capacity(recipe.inputs.len());
            for input in &recipe.inputs {
                let rows = shape.as_ref().and_then(|s| s.first().copied());
                let (s, cut) = source(models, input.model, &input.tensor, rows, shape.as_deref())?;
                shape.get_or_insert(cut);
                inputs.push(s);
            }
            let shape = shape.ok_or_else(|| {
                Error::InvalidArgument(format!("tensor '{}' has no inputs", recipe.name))
            })?;
            let numel = shape.iter().product();
            Ok(Resolved {
                recipe,
                base,
                inputs,
                shape,
                numel,
            })
        })
        .collect()
}

fn merge_models(job: &MergeJob, models: &[Model], progress: &Progress) -> Result<MergeReport> {
    let resolved = resolve(job, models)?;
    let outputs: Vec<OutputTensor> = resolved
        .iter()
        .map(|r| OutputTensor {
            name: r.recipe.name.clone(),
            shape: r.shape.clone(),
            dtype: job.out_dtype,
        })
        .collect();
    let total: u64 = resolved
        .iter()
        .map(|r| read_bytes(r) * (1 + statistics_passes(job)))
        .sum();
    progress.total.store(total, Ordering::Relaxed);
    let mut writer = ShardedWriter::create(&job.out_dir, &outputs, job.max_shard_bytes)?;
    let mut kinship = Vec::new();
    let mut bytes_written = 0u64;
    for (index, tensor) in resolved.iter().enumerate() {
        let statistics = TensorStatistics::measure(job, index, tensor, progress)?;
        writer.begin_tensor(index)?;
        let moments = write_tensor(job, index, tensor, &statistics, &mut writer, progress)?;
        bytes_written += (tensor.numel * job.out_dtype.size()) as u64;
        if let Some(moments) = moments {
            kinship.push(TensorStats {
                name: tensor.recipe.name.clone(),
                shape: tensor.shape.clone(),
                moments,
            });
        }
        for s in tensor.base.iter().chain(&tensor.inputs) {
            s.model.shards[s.entry.shard].release(s.entry.start, s.entry.end);
        }
    }
    writer.finish()?;
    let parents = resolved.first().map_or(0, |r| r.inputs.len());
    let kinship = (!kinship.is_empty()).then(|| KinshipReport::new(parents, kinship, Vec::new()));
    Ok(MergeReport {
        kinship,
        bytes_written,
    })
}

fn read_bytes(tensor: &Resolved) -> u64 {
    tensor
        .base
        .iter()
        .chain(&tensor.inputs)
        .map(|s| (tensor.numel * s.dtype.size()) as u64)
        .sum()
}

/// Extra full reads of the tensor the method's statistics take (for the progress total).
fn statistics_passes(job: &MergeJob) -> u64 {
    match job.method.sparsification() {
        Some(Sparsification::Magnitude | Sparsification::MagnitudeOutliers) => 2,
        Some(Sparsification::Random) if job.rescale => 1,
        _ if matches!(job.method, Method::Slerp | Method::ModelStock) => 1,
        _ => 0,
    }
}

/// Per-input pruning rule of one tensor.
#[derive(Debug, Clone, Copy)]
enum Keep {
    All,
    None,
    /// |δ| (as f32 bits) within [low, high).
    Range {
        low: u32,
        high: u32,
    },
    /// Bernoulli(density) from the counter-based generator.
    Random {
        density: f64,
    },
}

struct TensorStatistics {
    keep: Vec<Keep>,
    /// Per-input factor applied to kept entries (DARE's L1 rescale).
    scale: Vec<f64>,
    /// (s0, s1): output = s0·base + s1·other (slerp); or (1 − t, t) for model stock.
    mix: (f64, f64),
}

/// |x − z| rounded to f32, as bits: the magnitude mergekit ranks by (it works in float32).
fn magnitude_bits(x: f64, z: f64) -> u32 {
    ((x as f32) - (z as f32)).abs().to_bits()
}

impl TensorStatistics {
    fn measure(
        job: &MergeJob,
        index: usize,
        tensor: &Resolved,
        progress: &Progress,
    ) -> Result<Self> {
        let k = tensor.inputs.len();
        let mut stats = TensorStatistics {
            keep: vec![Keep::All; k],
            scale: vec![1.0; k],
            mix: (0.0, 1.0),
        };
        let n = tensor.numel;
        if let Some(sparsification) = job.method.sparsification() {
            let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
            for (i, input) in tensor.recipe.inputs.iter().enumerate() {
                if input.density >= 1.0 {
                    continue;
                }
                stats.keep[i] = match sparsification {
                    Sparsification::Magnitude => {
                        let keep = (input.density * n as f64) as usize;
                        if keep == 0 {
                            return Err(Error::InvalidArgument(format!(
                                "tensor '{}': density {} keeps no element of {n}",
                                tensor.recipe.name, input.density
                            )));
                        }
                        let [low] =
                            order_statistics(base, &tensor.inputs[i], n, [n - keep], progress)?;
                        Keep::Range {
                            low,
                            high: u32::MAX,
                        }
                    }
                    Sparsification::MagnitudeOutliers => {
                        let target = (input.density * n as f64) as i64;
                        let mut top = (input.gamma * n as f64) as i64;
                        let mut bottom = n as i64 - target - top;
                        if bottom < 0 {
                            top += bottom;
                            bottom = 0;
                        }
                        if top <= 0 {
                            // mergekit keeps `indices[n_bot:-n_top]`, an empty slice when n_top is 0.
                            Keep::None
                        } else {
                            let ranks = [bottom as usize, n - top as usize];
                            let [low, high] =
                                order_statistics(base, &tensor.inputs[i], n, ranks, progress)?;
                            Keep::Range { low, high }
                        }
                    }
                    Sparsification::Random => Keep::Random {
                        density: input.density,
                    },
                };
                if let (Keep::Random { density }, true) = (stats.keep[i], job.rescale) {
                    stats.scale[i] = dare_rescale(
                        job.seed,
                        index,
                        i,
                        density,
                        base,
                        &tensor.inputs[i],
                        n,
                        progress,
                    )?;
                }
            }
        }
        match job.method {
            Method::Slerp => {
                let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
                let t = tensor.recipe.t;
                let [aa, bb, ab] =
                    sums_over(n, progress, &[base, &tensor.inputs[0]], |_, values| {
                        let (a, b) = (values[0], values[1]);
                        [
                            a.iter().map(|v| v * v).sum(),
                            b.iter().map(|v| v * v).sum(),
                            a.iter().zip(b).map(|(x, y)| x * y).sum(),
                        ]
                    })?;
                stats.mix = slerp_factors(t, aa, bb, ab);
            }
            Method::ModelStock => {
                let base = tensor.base.as_ref().ok_or_else(|| no_base(job))?;
                let mut all: Vec<&Source> = vec![base];
                all.extend(&tensor.inputs);
                let pairs: Vec<(usize, usize)> =
                    (0..k).flat_map(|i| (i..k).map(move |j| (i, j))).collect();
                let products = sums_over_vec(n, progress, &all, pairs.len(), |_, values, out| {
                    for (p, &(i, j)) in pairs.iter().enumerate() {
                        out[p] = values[0]
                            .iter()
                            .zip(values[i + 1])
                            .zip(values[j + 1])
                            .map(|((z, x), y)| (x - z) * (y - z))
                            .sum();
                    }
                })?;
                let product = |i: usize, j: usize| {
                    products[pairs
                        .iter()
                        .position(|&p| p == (i.min(j), i.max(j)))
                        .expect("pair")]
                };
                let mut cosines = Vec::new();
                for i in 0..k {
                    for j in i + 1..k {
                        let norms = (product(i, i).sqrt() * product(j, j).sqrt()).max(1e-6);
                        cosines.push((product(i, j) / norms).clamp(-1.0, 1.0));
                    }
                }
                let cos = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
                let count = k as f64;
                let t = count * cos / (1.0 + (count - 1.0) * cos);
                stats.mix = (1.0 - t, t);
            }
            _ => {}
        }
        Ok(stats)
    }
}

fn no_base(job: &MergeJob) -> Error {
    Error::InvalidArgument(format!("merge method {:?} needs a base_model", job.method))
}

/// mergekit's slerp factors (s0 for the base, s1 for the other), lerp when nearly colinear.
fn slerp_factors(t: f64, aa: f64, bb: f64, ab: f64) -> (f64, f64) {
    const DOT_THRESHOLD: f64 = 0.9995;
    const EPS: f64 = 1e-8;
    let norm = |sq: f64| if sq.sqrt() > EPS { sq.sqrt() } else { 1.0 };
    let dot = ab / (norm(aa) * norm(bb));
    if dot.abs() > DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let sin_theta = theta.sin();
    let theta_t = theta * t;
    (
        (theta - theta_t).sin() / sin_theta,
        theta_t.sin() / sin_theta,
    )
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

/// Sums computed block by block over the decoded sources (in f64), merged in block order.
fn sums_over<const S: usize>(
    n: usize,
    progress: &Progress,
    sources: &[&Source],
    block_sums: impl Fn(usize, &[&[f64]]) -> [f64; S] + Sync,
) -> Result<[f64; S]> {
    let parts = sums_over_vec(n, progress, sources, S, |first, values, out| {
        out.copy_from_slice(&block_sums(first, values))
    })?;
    Ok(std::array::from_fn(|i| parts[i]))
}

fn sums_over_vec(
    n: usize,
    progress: &Progress,
    sources: &[&Source],
    width: usize,
    block_sums: impl Fn(usize, &[&[f64]], &mut [f64]) + Sync,
) -> Result<Vec<f64>> {
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            progress.check()?;
            let first = b * BLOCK;
            let len = BLOCK.min(n - first);
            let mut buffers: Vec<Vec<f64>> = sources.iter().map(|_| vec![0.0; len]).collect();
            for (s, buf) in sources.iter().zip(&mut buffers) {
                s.read(first, buf);
            }
            let views: Vec<&[f64]> = buffers.iter().map(Vec::as_slice).collect();
            let mut out = vec![0.0; width];
            block_sums(first, &views, &mut out);
            progress
                .done
                .fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
            Ok(out)
        })
        .collect::<Result<_>>()?;
    let mut total = vec![0.0; width];
    for part in parts {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    Ok(total)
}

/// DARE's L1 rescale: ‖δ‖₁ / ‖δ·mask‖₁, or 1 when either is below mergekit's 1e-7.
#[allow(clippy::too_many_arguments)]
fn dare_rescale(
    seed: u64,
    tensor: usize,
    input: usize,
    density: f64,
    base: &Source,
    source: &Source,
    n: usize,
    progress: &Progress,
) -> Result<f64> {
    let [before, after] = sums_over(n, progress, &[base, source], |first, values| {
        let mut sums = [0.0, 0.0];
        for (e, (z, x)) in values[0].iter().zip(values[1]).enumerate() {
            let magnitude = (x - z).abs();
            sums[0] += magnitude;
            if uniform(seed, tensor, input, first + e) < density {
                sums[1] += magnitude;
            }
        }
        sums
    })?;
    Ok(if before < 1e-7 || after < 1e-7 {
        1.0
    } else {
        before / after
    })
}

/// Exact order statistics of |x − z| (as f32 bits): for each 0-based ascending `rank`, the bit
/// pattern of the element at that rank. Two streamed histogram passes (radix select on the upper
/// then the lower 16 bits), so memory stays bounded whatever the tensor size.
fn order_statistics<const R: usize>(
    base: &Source,
    input: &Source,
    n: usize,
    ranks: [usize; R],
    progress: &Progress,
) -> Result<[u32; R]> {
    let histogram = |select: &(dyn Fn(u32) -> Option<usize> + Sync)| -> Result<Vec<u64>> {
        let bytes_per_element = (base.dtype.size() + input.dtype.size()) as u64;
        (0..n.div_ceil(BLOCK))
            .into_par_iter()
            .map(|b| {
                progress.check()?;
                let first = b * BLOCK;
                let len = BLOCK.min(n - first);
                let (mut z, mut x) = (vec![0.0; len], vec![0.0; len]);
                base.read(first, &mut z);
                input.read(first, &mut x);
                let mut counts = vec![0u64; 1 << 16];
                for (x, z) in x.iter().zip(&z) {
                    if let Some(bin) = select(magnitude_bits(*x, *z)) {
                        counts[bin] += 1;
                    }
                }
                progress
                    .done
                    .fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
                Ok(counts)
            })
            .try_reduce(
                || vec![0u64; 1 << 16],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    Ok(a)
                },
            )
    };
    let locate = |counts: &[u64], rank: u64| -> (usize, u64) {
        let mut seen = 0u64;
        for (bin, &c) in counts.iter().enumerate() {
            if seen + c > rank {
                return (bin, rank - seen);
            }
            seen += c;
        }
        (counts.len() - 1, 0)
    };
    let high = histogram(&|bits| Some((bits >> 16) as usize))?;
    let mut out = [0u32; R];
    for (slot, &rank) in out.iter_mut().zip(&ranks) {
        let rank = rank.min(n.saturating_sub(1)) as u64;
        let (top, within) = locate(&high, rank);
        let low =
            histogram(&|bits| ((bits >> 16) as usize == top).then_some((bits & 0xFFFF) as usize))?;
        let (bottom, _) = locate(&low, within);
        *slot = ((top as u32) << 16) | bottom as u32;
    }
    Ok(out)
}

/// The output pass: merges the tensor block by block, writes it, and returns the moments of the
/// parents' deltas against the base (for kinship) when there is a base.
fn write_tensor(
    job: &MergeJob,
    index: usize,
    tensor: &Resolved,
    stats: &TensorStatistics,
    writer: &mut ShardedWriter,
    progress: &Progress,
) -> Result<Option<Moments>> {
    let n = tensor.numel;
    let blocks = n.div_ceil(BLOCK);
    let bytes_per_element: u64 = tensor
        .base
        .iter()
        .chain(&tensor.inputs)
        .map(|s| s.dtype.size() as u64)
        .sum();
    let mut moments = tensor
        .base
        .as_ref()
        .map(|_| Moments::empty(tensor.inputs.len()));
    for batch in (0..blocks).collect::<Vec<_>>().chunks(BLOCKS_IN_FLIGHT) {
        let outputs: Vec<(Vec<u8>, Option<Moments>)> = batch
            .par_iter()
            .map(|&b| {
                progress.check()?;
                let first = b * BLOCK;
                let len = BLOCK.min(n - first);
                let out = merge_block(job, index, tensor, stats, first, len);
                progress
                    .done
                    .fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
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
    let inputs: Vec<Vec<f64>> = tensor
        .inputs
        .iter()
        .map(|s| {
            let mut values = vec![0.0; len];
            s.read(first, &mut values);
            values
        })
        .collect();
    let base = tensor.base.as_ref().map(|s| {
        let mut values = vec![0.0; len];
        s.read(first, &mut values);
        values
    });
    let weights: Vec<f64> = tensor.recipe.inputs.iter().map(|i| i.weight).collect();
    let mut merged = vec![0.0f64; len];
    match (job.method, &base) {
        (Method::Passthrough, _) => merged.copy_from_slice(&inputs[0]),
        (Method::Linear, _) => {
            let total: f64 = weights.iter().sum();
            for (e, out) in merged.iter_mut().enumerate() {
                let sum: f64 = inputs.iter().zip(&weights).map(|(x, w)| w * x[e]).sum();
                *out = if job.normalize { sum / total } else { sum };
            }
        }
        (Method::Slerp | Method::ModelStock, Some(z)) => {
            let (s0, s1) = stats.mix;
            let count = inputs.len() as f64;
            for (e, out) in merged.iter_mut().enumerate() {
                let other = if job.method == Method::Slerp {
                    inputs[0][e]
                } else {
                    inputs.iter().map(|x| x[e]).sum::<f64>() / count
                };
                *out = s0 * z[e] + s1 * other;
            }
        }
        (method, Some(z)) if method.task_vectors() => {
            let k = inputs.len();
            let mut contributions = vec![0.0f64; k];
            for (e, out) in merged.iter_mut().enumerate() {
                for i in 0..k {
                    let (x, zz) = (inputs[i][e], z[e]);
                    let kept = match stats.keep[i] {
                        Keep::All => true,
                        Keep::None => false,
                        Keep::Range { low, high } => {
                            let bits = magnitude_bits(x, zz);
                            bits >= low && bits < high
                        }
                        Keep::Random { density } => {
                            uniform(job.seed, index, i, first + e) < density
                        }
                    };
                    contributions[i] = if kept {
                        weights[i] * (x - zz) * stats.scale[i]
                    } else {
                        0.0
                    };
                }
                let (mixed, divisor) = if method.sign_consensus() {
                    let majority = if contributions.iter().sum::<f64>() >= 0.0 {
                        1.0
                    } else {
                        -1.0
                    };
                    let mut mixed = 0.0;
                    let mut divisor = 0.0;
                    for (c, w) in contributions.iter().zip(&weights) {
                        if c.signum() == majority && *c != 0.0 {
                            mixed += c;
                            divisor += w;
                        }
                    }
                    (mixed, if divisor == 0.0 { 1.0 } else { divisor })
                } else {
                    let divisor: f64 = weights.iter().sum();
                    (
                        contributions.iter().sum::<f64>(),
                        if divisor.abs() < 1e-8 { 1.0 } else { divisor },
                    )
                };
                let mixed = if job.normalize {
                    mixed / divisor
                } else {
                    mixed
                };
                *out = z[e] + mixed * job.lambda;
            }
        }
        _ => merged.copy_from_slice(&inputs[0]),
    }
    let mut bytes = Vec::with_capacity(len * job.out_dtype.size());
    encode(job.out_dtype, &merged, &mut bytes);
    let moments = base.as_ref().map(|z| {
        let mut deltas = inputs;
        let mut means = Vec::with_capacity(deltas.len());
        for d in &mut deltas {
            let sum = crate::kernel::subtract_and_sum(d, z);
            means.push(sum / len as f64);
        }
        let views: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
        Moments::from_chunk(&views, &means)
    });
    (bytes, moments)
}

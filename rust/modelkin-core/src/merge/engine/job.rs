//! The merge job as the Python layer sends it (read by serde, unknown keys refused): the models,
//! the method and its global options, the precision, and every output tensor's recipe.

use std::path::PathBuf;

use serde::Deserialize;

use crate::io::encode::OutDtype;
use crate::io::error::Error;
use crate::merge::engine::method::Method;
use crate::merge::torch::half_ops;
use crate::merge::torch::trig::Trig;

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
    /// arcee_fusion: draws mergekit's process made from torch's generator (seeded with the job's
    /// seed) before this tensor, whose quartiles it then estimates from a sample as mergekit does
    /// (tensors past a million entries). None: the exact quartiles.
    #[serde(default)]
    pub draws_before: Option<u64>,
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

// RAM's options live with the job that holds them (not in ram.rs): ram.rs imports the job.
/// RAM's options (mergekit's defaults when absent).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RamOptions {
    /// Magnitude above which a task-vector entry contributes.
    pub epsilon: f64,
    /// RAM+: strength of the shared-to-unique rescale.
    pub r: f64,
    /// RAM+: cap of the shared-to-unique ratio.
    pub alpha: f64,
}

impl Default for RamOptions {
    fn default() -> Self {
        RamOptions { epsilon: 1e-5, r: 0.1, alpha: 0.2 }
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
    /// memory ([`MergeReport::model`](super::run::MergeReport::model)).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// Largest shard size in bytes.
    pub max_shard_bytes: u64,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// MKL's runtime library (`libmkl_rt`): float32 angles then come from its vector math, as in
    /// torch's MKL builds; none takes them from the C library.
    #[serde(default)]
    pub mkl: Option<PathBuf>,
    /// The float32 angles' source, loaded from `mkl` when the merge starts.
    #[serde(skip)]
    pub(crate) trig: Trig,
    /// The output tensors, in writing order.
    pub tensors: Vec<TensorRecipe>,
}

/// The error of a method that needs a base when the job has none.
pub(crate) fn no_base(job: &MergeJob) -> Error {
    Error::InvalidArgument(format!("merge method {} needs a base_model", job.method.name()))
}

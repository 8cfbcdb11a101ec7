//! Running a merge job: the models opened (or taken open), then tensor by tensor the statistics
//! passes and the output pass, written to shards or held in memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::io::error::{Error, Result};
use crate::io::model::Model;
use crate::io::progress::Progress;
use crate::io::threads::with_threads;
use crate::io::writer::{MemoryWriter, OutputTensor, ShardedWriter, TensorSink};
use crate::kinship::report::{KinshipReport, TensorStats};
use crate::merge::engine::combine;
use crate::merge::engine::job::MergeJob;
use crate::merge::engine::method::{Method, Sparsification, Statistics};
use crate::merge::engine::source::{read_bytes, resolve};
use crate::merge::engine::statistics::TensorStatistics;
use crate::merge::methods::karcher;
use crate::merge::torch::sort_order;
use crate::merge::torch::trig;

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

/// Runs a merge job: reads every input tensor once for the output (plus one streamed statistics
/// pass where the method needs it) and writes the shards into `job.out_dir`, or, without one,
/// into memory (the merged model's size, plus the engine's bounded working set).
pub fn run_merge(job: &MergeJob, progress: &Progress) -> Result<MergeReport> {
    run_merge_opened(job, &[], progress)
}

/// [`run_merge`] on models the caller already has open: `opened[i]` stands for `job.models[i]`
/// (and must have been opened from that path); the models after them are opened here. A process
/// merging many candidates of the same parents keeps them open instead of mapping and parsing
/// every file again per merge. The pages a merge read are let go when it ends, so a model kept
/// open holds no memory between merges.
pub fn run_merge_opened(job: &MergeJob, opened: &[Arc<Model>], progress: &Progress) -> Result<MergeReport> {
    if opened.len() > job.models.len() {
        return Err(Error::InvalidArgument(format!(
            "{} opened models given for a job of {}",
            opened.len(),
            job.models.len()
        )));
    }
    let models = job
        .models
        .iter()
        .enumerate()
        .map(|(i, path)| match opened.get(i) {
            Some(model) if model.path == *path => Ok(Arc::clone(model)),
            Some(model) => Err(Error::InvalidArgument(format!(
                "model {i} of the job is {} but the model opened for it is {}",
                path.display(),
                model.path.display()
            ))),
            None => Model::open(path).map(Arc::new),
        })
        .collect::<Result<Vec<_>>>()?;
    // The float32 angles' library, loaded (once per process) before any tensor needs it.
    let with_trig;
    let job = match &job.mkl {
        Some(path) => {
            with_trig = MergeJob { trig: trig::Trig::load(Some(path))?, ..job.clone() };
            &with_trig
        }
        None => job,
    };
    let report = with_threads(job.threads, || merge_models(job, &models, progress));
    models.iter().for_each(|m| m.release_pending());
    report
}

/// The label a merged model held in memory goes by in messages.
pub const IN_MEMORY_LABEL: &str = "<merged model in memory>";

fn merge_models(job: &MergeJob, models: &[Arc<Model>], progress: &Progress) -> Result<MergeReport> {
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
        // nuslerp in a working dtype: norms, then cosines (see methods/nuslerp.rs).
        (Statistics::Norms, _) if job.method == Method::Nuslerp && job.compute.float32_order() => 2,
        // karcher in a half dtype: norms, the first mean, then two sweeps per iteration at most.
        (Statistics::Norms, _) if job.method == Method::Karcher && karcher::applies(job) => {
            2 + 2 * job.spherical.max_iter as u64
        }
        // multislerp in a working dtype: four sequential sweeps (see methods/multislerp.rs).
        (Statistics::Norms, _) if job.method == Method::Multislerp && job.compute.float32_order() => 4,
        (Statistics::Norms, _) => 1,
        // The rows' KL divergences, then the two histogram passes of the quartiles.
        (Statistics::Importance, _) => 3,
        (Statistics::None, _) => 0,
    }
}

//! `run_merge`: a whole merge job, handed over as the typed `MergeJob` dict the `.pyi` declares,
//! run off the GIL; the merged model comes back on disk or held in memory ([`ModelHandle`]).
//! `open_model` (in `model.rs`) opens a model once for many merges.

use std::sync::Arc;

use modelkin_core::{run_merge_opened, Error, MergeJob, Model};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;
use crate::kinship::KinshipStats;
use crate::model::ModelHandle;
use crate::progress::run_watched;

/// What a merge produced besides its files.
#[pyclass(module = "modelkin._core", frozen, get_all)]
pub struct MergeOutcome {
    /// Bytes of tensor data written (to disk or memory).
    pub bytes_written: u64,
    /// The parents' kinship against the base, measured while merging (none without a base).
    pub kinship: Option<Py<KinshipStats>>,
    /// The merged model, when the job had no output directory.
    pub model: Option<Py<ModelHandle>>,
    /// Seconds the engine spent on the tensors, after opening the models and resolving the job.
    pub tensor_seconds: f64,
}

/// Runs the merge described by `job` (a `MergeJob` dict: see `_core.pyi`) with the GIL released;
/// `models[i]`, already open, stands for `job["models"][i]`.
#[pyfunction]
#[pyo3(signature = (job, *, models = Vec::new(), progress = None))]
pub fn run_merge<'py>(
    py: Python<'py>,
    job: Bound<'py, PyDict>,
    models: Vec<Py<ModelHandle>>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<MergeOutcome> {
    let job: MergeJob = pythonize::depythonize(&job)
        .map_err(|e| to_py(Error::InvalidArgument(format!("invalid merge job: {e}"))))?;
    let opened: Vec<Arc<Model>> = models.iter().map(|m| Arc::clone(&m.get().model)).collect();
    let report = run_watched(py, job.threads, progress.as_ref(), |p| run_merge_opened(&job, &opened, p))?;
    let kinship = report.kinship.map(|report| Py::new(py, KinshipStats { report })).transpose()?;
    let model = report.model.map(|model| Py::new(py, ModelHandle { model: Arc::new(model) })).transpose()?;
    Ok(MergeOutcome {
        bytes_written: report.bytes_written,
        kinship,
        model,
        tensor_seconds: report.tensor_seconds,
    })
}

//! `run_merge`: a whole merge job, handed over as the typed `MergeJob` dict the `.pyi` declares,
//! run off the GIL; the merged model comes back on disk or held in memory ([`MergedTensors`]).

use std::path::PathBuf;
use std::sync::Arc;

use modelkin_core::writer::save_model;
use modelkin_core::{run_merge as core_run_merge, Error, MergeJob, Model};
use numpy::ndarray::ArrayView1;
use numpy::PyArray1;
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;
use crate::kinship::KinshipStats;
use crate::progress::run_watched;

/// What a merge produced besides its files.
#[pyclass(module = "modelkin._core", frozen, get_all)]
pub struct MergeOutcome {
    /// Bytes of tensor data written (to disk or memory).
    pub bytes_written: u64,
    /// The parents' kinship against the base, measured while merging (none without a base).
    pub kinship: Option<Py<KinshipStats>>,
    /// The merged model, when the job had no output directory.
    pub model: Option<Py<MergedTensors>>,
    /// Seconds the engine spent on the tensors, after opening the models and resolving the job.
    pub tensor_seconds: f64,
}

/// A merged model held in memory: one safetensors image, read by numpy arrays without copies.
#[pyclass(module = "modelkin._core", frozen)]
pub struct MergedTensors {
    pub(crate) model: Arc<Model>,
}

#[pymethods]
impl MergedTensors {
    /// Tensor names in storage order.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.model.tensor_names().into_iter().map(str::to_string).collect()
    }

    /// (shape, safetensors dtype name) of a tensor; `KeyError` naming it when there is none.
    fn info(&self, name: &str) -> PyResult<(Vec<usize>, String)> {
        let entry = self.model.tensor(name).ok_or_else(|| missing(name))?;
        Ok((entry.shape.clone(), format!("{:?}", entry.dtype)))
    }

    /// The stored bytes of a tensor as a uint8 array sharing this object's memory (no
    /// copy); the array keeps the model alive.
    fn raw<'py>(this: Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let model = Arc::clone(&this.get().model);
        let entry = model.tensor(name).ok_or_else(|| missing(name))?;
        let bytes = model.shards[entry.shard].bytes(entry.start, entry.end);
        let view = ArrayView1::from(bytes);
        // SAFETY: the bytes belong to `this`'s model, which is immutable and which the array's
        // base object (`this`) keeps alive for as long as the array lives.
        Ok(unsafe { PyArray1::borrow_from_array(&view, this.into_any()) })
    }

    /// Bytes of tensor data held.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.model
            .tensor_names()
            .iter()
            .map(|n| self.model.tensor(n).map_or(0, |e| e.end - e.start) as u64)
            .sum()
    }

    /// Writes the tensors into `directory` (which must exist) as `modelkin merge` writes them;
    /// returns the bytes of tensor data written.
    fn save(&self, py: Python<'_>, directory: PathBuf, max_shard_bytes: u64) -> PyResult<u64> {
        py.detach(|| save_model(&self.model, &directory, max_shard_bytes)).map_err(to_py)
    }
}

fn missing(name: &str) -> PyErr {
    PyKeyError::new_err(format!("the merged model has no tensor '{name}'"))
}

/// Runs the merge described by `job` (a `MergeJob` dict: see `_core.pyi`) with the GIL released.
#[pyfunction]
#[pyo3(signature = (job, *, progress = None))]
pub fn run_merge<'py>(
    py: Python<'py>,
    job: Bound<'py, PyDict>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<MergeOutcome> {
    let job: MergeJob = pythonize::depythonize(&job)
        .map_err(|e| to_py(Error::InvalidArgument(format!("invalid merge job: {e}"))))?;
    let report = run_watched(py, progress.as_ref(), |p| core_run_merge(&job, p))?;
    let kinship = report.kinship.map(|report| Py::new(py, KinshipStats { report })).transpose()?;
    let model =
        report.model.map(|model| Py::new(py, MergedTensors { model: Arc::new(model) })).transpose()?;
    Ok(MergeOutcome {
        bytes_written: report.bytes_written,
        kinship,
        model,
        tensor_seconds: report.tensor_seconds,
    })
}

//! `run_merge`: a whole merge job, handed over as the typed `MergeJob` dict the `.pyi` declares,
//! run off the GIL; the merged model comes back on disk or held in memory ([`ModelHandle`]).
//! `open_model` opens a model once for many merges.

use std::path::PathBuf;
use std::sync::Arc;

use modelkin_core::writer::save_model;
use modelkin_core::{run_merge_opened, Error, MergeJob, Model};
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
    pub model: Option<Py<ModelHandle>>,
    /// Seconds the engine spent on the tensors, after opening the models and resolving the job.
    pub tensor_seconds: f64,
}

/// A model the core holds open: memory-mapped safetensors files ([`open_model`]), or a merged
/// model held in memory (one safetensors image). Its tensors are read by numpy arrays without
/// copies.
#[pyclass(module = "modelkin._core", frozen)]
pub struct ModelHandle {
    pub(crate) model: Arc<Model>,
}

#[pymethods]
impl ModelHandle {
    /// The path it was opened from (for a merged model, the label it goes by in messages).
    #[getter]
    fn path(&self) -> PathBuf {
        self.model.path.clone()
    }

    /// (name, shape, dtype) of every tensor, in storage order.
    fn tensors(&self) -> Vec<(String, Vec<usize>, String)> {
        listing(&self.model)
    }

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

/// (name, shape, safetensors dtype name) of every tensor of a model, in storage order.
fn listing(model: &Model) -> Vec<(String, Vec<usize>, String)> {
    model
        .tensor_names()
        .into_iter()
        .map(|name| {
            let entry = model.tensor(name).expect("listed name");
            (name.to_string(), entry.shape.clone(), format!("{:?}", entry.dtype))
        })
        .collect()
}

/// Opens a model (a safetensors file or a directory of shards): its files mapped and headers
/// read, for any number of merges and kinship passes.
#[pyfunction]
pub fn open_model(py: Python<'_>, path: PathBuf) -> PyResult<ModelHandle> {
    let model = py.detach(|| Model::open(&path)).map_err(to_py)?;
    Ok(ModelHandle { model: Arc::new(model) })
}

fn missing(name: &str) -> PyErr {
    PyKeyError::new_err(format!("the merged model has no tensor '{name}'"))
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

//! The models Python holds: a model the core keeps open ([`ModelHandle`], from [`open_model`] or
//! a merge held in memory) and a model argument that is either one of those or a path
//! ([`ModelArg`]). Below the kinship and merge bindings, which both take and return models.

use std::path::PathBuf;
use std::sync::Arc;

use modelkin_core::io::writer::save_model;
use modelkin_core::Model;
use numpy::ndarray::ArrayView1;
use numpy::PyArray1;
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;

use crate::errors::to_py;

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

/// A model as Python hands it over: a path, or a model the core holds open (a merged model in
/// memory included).
#[derive(FromPyObject)]
pub enum ModelArg {
    /// A model already open.
    Opened(Py<ModelHandle>),
    /// A safetensors file or directory.
    Path(String),
}

impl ModelArg {
    /// Opens the path, or shares the model in memory.
    pub fn open(self) -> modelkin_core::Result<Arc<Model>> {
        match self {
            ModelArg::Opened(handle) => Ok(Arc::clone(&handle.get().model)),
            ModelArg::Path(path) => Model::open(path).map(Arc::new),
        }
    }
}

/// One part of a composed model: a model and the (new name, name there) of the tensors it gives.
type Part = (Py<ModelHandle>, Vec<(String, String)>);

/// A model made of views of others: each part a model and the (new name, name there) of the
/// tensors it gives; a later part's tensor replaces an earlier one's of the same name. Nothing is
/// copied (files are mapped again, bytes in memory shared).
#[pyfunction]
pub fn compose_model(parts: Vec<Part>, label: String) -> PyResult<ModelHandle> {
    let mut composed: Option<Model> = None;
    for (handle, names) in &parts {
        let view = handle.get().model.view(&label, names).map_err(to_py)?;
        composed = Some(match composed {
            None => view,
            Some(model) => model.overlaid(&label, view),
        });
    }
    let model =
        composed.ok_or_else(|| to_py(modelkin_core::Error::InvalidArgument("no parts to compose".into())))?;
    Ok(ModelHandle { model: Arc::new(model) })
}

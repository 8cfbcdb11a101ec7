//! Python classes over a kinship pass: the plan (models opened, tensors matched) and its result.

use std::sync::Arc;

use modelkin_core::{
    kinship_pass, plan, Family, KinshipReport, Metric, Mode, Moments, PassOptions, Plan, PlannedTensor,
    SkippedTensor, Source, TensorStats,
};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::model::ModelArg;
use crate::progress::run_watched;

fn parse_metric(name: &str) -> PyResult<Metric> {
    Metric::ALL
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| PyValueError::new_err(format!("unknown metric '{name}' (choose from pcc, cs, ed)")))
}

fn parse_mode(name: &str) -> PyResult<Mode> {
    match name {
        "full" => Ok(Mode::Full),
        "split" => Ok(Mode::Split),
        _ => Err(PyValueError::new_err(format!("unknown mode '{name}' (choose full or split)"))),
    }
}

/// Moments of one block of one tensor, as the torch path hands them over:
/// (tensor index, n, `means[k]`, `comoment[k, k]`, `sqdist[k, k]`).
type MomentBlock<'py> =
    (usize, u64, PyReadonlyArray1<'py, f64>, PyReadonlyArray2<'py, f64>, PyReadonlyArray2<'py, f64>);

/// A base and its fine-tunes, opened and matched tensor by tensor, ready for a pass.
#[pyclass(module = "modelkin._core", frozen)]
pub struct KinshipPlan {
    family: Arc<Family>,
    plan: Plan,
    options: PassOptions,
}

impl KinshipPlan {
    /// A planned tensor and one model's copy of it (0 is the base, 1.. the fine-tunes).
    fn source(&self, tensor: usize, source: usize) -> PyResult<(&PlannedTensor, &Source)> {
        let planned = self
            .plan
            .tensors
            .get(tensor)
            .ok_or_else(|| PyIndexError::new_err("tensor index out of range"))?;
        let source =
            planned.sources.get(source).ok_or_else(|| PyIndexError::new_err("source index out of range"))?;
        Ok((planned, source))
    }
}

#[pymethods]
impl KinshipPlan {
    #[new]
    #[pyo3(signature = (base, models, *, skip_missing = false, count_tied_embeddings_twice = false))]
    fn new(
        py: Python<'_>,
        base: ModelArg,
        models: Vec<ModelArg>,
        skip_missing: bool,
        count_tied_embeddings_twice: bool,
    ) -> PyResult<Self> {
        let options = PassOptions { skip_missing, count_tied_embeddings_twice, ..PassOptions::default() };
        py.detach(|| {
            let base = base.open()?;
            let models = models.into_iter().map(ModelArg::open).collect::<modelkin_core::Result<Vec<_>>>()?;
            let family = Family::new(base, models)?;
            let plan = plan(&family, &options)?;
            Ok(KinshipPlan { family: Arc::new(family), plan, options })
        })
        .map_err(to_py)
    }

    /// Number of fine-tunes.
    #[getter]
    fn k(&self) -> usize {
        self.family.k()
    }

    /// (name, shape after the row cut, element count) of every tensor the pass visits.
    #[getter]
    fn tensors(&self) -> Vec<(String, Vec<usize>, usize)> {
        self.plan.tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.numel)).collect()
    }

    /// (name, reason) of tensors left out while planning.
    #[getter]
    fn skipped(&self) -> Vec<(String, String)> {
        self.plan.skipped.iter().map(|s| (s.name.clone(), s.reason.clone())).collect()
    }

    /// Total bytes of tensor data one pass reads.
    #[getter]
    fn tensor_bytes(&self) -> u64 {
        self.plan
            .tensors
            .iter()
            .flat_map(|t| t.sources.iter().map(move |s| (t.numel * s.dtype.size()) as u64))
            .sum()
    }

    /// Elements `first..first+count` of one model's copy of a planned tensor, widened to float64.
    /// `source` 0 is the base, 1.. the fine-tunes.
    fn read<'py>(
        &self,
        py: Python<'py>,
        tensor: usize,
        source: usize,
        first: usize,
        count: usize,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let (planned, source) = self.source(tensor, source)?;
        if first.checked_add(count).is_none_or(|end| end > planned.numel) {
            return Err(PyIndexError::new_err(format!(
                "elements {first}..{} past the end of '{}'",
                first + count,
                planned.name
            )));
        }
        let mut out = vec![0.0f64; count];
        py.detach(|| self.family.read_f64(source, first, &mut out));
        Ok(PyArray1::from_vec(py, out))
    }

    /// The file holding one model's copy of a planned tensor.
    fn file_of(&self, tensor: usize, source: usize) -> PyResult<String> {
        let (_, source) = self.source(tensor, source)?;
        Ok(self.family.file_of(source).display().to_string())
    }

    /// The exception the Rust pass raises for NaN/Inf in one model's copy of a planned tensor, for
    /// the torch path to raise the same.
    fn nonfinite_error(&self, py: Python<'_>, tensor: usize, source: usize) -> PyResult<Py<PyAny>> {
        let (planned, source) = self.source(tensor, source)?;
        let error = modelkin_core::Error::NonFinite {
            path: self.family.file_of(source).to_path_buf(),
            tensor: planned.name.clone(),
        };
        Ok(to_py(error).into_value(py).into_any())
    }

    /// Runs the streaming pass in Rust (GIL released; Ctrl-C stops it).
    #[pyo3(signature = (*, low_precision = None, skip_nonfinite = false, threads = 0, progress = None))]
    fn run(
        &self,
        py: Python<'_>,
        low_precision: Option<&str>,
        skip_nonfinite: bool,
        threads: usize,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<KinshipStats> {
        let options = PassOptions {
            low_precision: low_precision.map(parse_mode).transpose()?,
            skip_nonfinite,
            threads,
            ..self.options.clone()
        };
        let report = run_watched(py, threads, progress.as_ref(), |p| {
            kinship_pass(&self.family, &self.plan, &options, p)
        })?;
        Ok(KinshipStats { report })
    }

    /// Builds a result from moments computed elsewhere (the torch path). Each block is
    /// (tensor index, n, `means[k]`, `comoment[k, k]`, `sqdist[k, k]`); blocks of one tensor are
    /// merged in the order given. Tensors named in `skipped` are left out with their reason.
    fn report(&self, blocks: Vec<MomentBlock<'_>>, skipped: Vec<(String, String)>) -> PyResult<KinshipStats> {
        let k = self.family.k();
        let mut merged: Vec<Option<Moments>> = vec![None; self.plan.tensors.len()];
        for (tensor, n, mean, comoment, sqdist) in blocks {
            let slot =
                merged.get_mut(tensor).ok_or_else(|| PyIndexError::new_err("tensor index out of range"))?;
            let block = Moments {
                n,
                mean: mean.as_slice()?.to_vec(),
                comoment: comoment.as_slice()?.to_vec(),
                sqdist: sqdist.as_slice()?.to_vec(),
            };
            if block.mean.len() != k || block.comoment.len() != k * k || block.sqdist.len() != k * k {
                return Err(PyValueError::new_err(format!(
                    "moments must have shapes ({k},), ({k}, {k}), ({k}, {k})"
                )));
            }
            slot.get_or_insert_with(|| Moments::empty(k)).merge(&block);
        }
        let tensors = self
            .plan
            .tensors
            .iter()
            .zip(merged)
            .filter(|(t, _)| !skipped.iter().any(|(name, _)| *name == t.name))
            .map(|(t, m)| TensorStats {
                name: t.name.clone(),
                shape: t.shape.clone(),
                moments: m.unwrap_or_else(|| Moments::empty(k)),
            })
            .collect();
        let mut all_skipped = self.plan.skipped.clone();
        all_skipped.extend(skipped.into_iter().map(|(name, reason)| SkippedTensor { name, reason }));
        Ok(KinshipStats { report: KinshipReport::new(k, tensors, all_skipped) })
    }
}

/// The moments one pass measured, per tensor and overall; metrics are derived on demand.
#[pyclass(module = "modelkin._core", frozen)]
pub struct KinshipStats {
    pub(crate) report: KinshipReport,
}

#[pymethods]
impl KinshipStats {
    /// Number of fine-tunes.
    #[getter]
    fn k(&self) -> usize {
        self.report.k
    }

    /// Elements per delta vector (all measured tensors, after the row cut).
    #[getter]
    fn elements(&self) -> u64 {
        self.report.total.n
    }

    /// Names of the measured tensors, in reading order.
    #[getter]
    fn tensor_names(&self) -> Vec<String> {
        self.report.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// Shapes of the measured tensors after the row cut.
    #[getter]
    fn tensor_shapes(&self) -> Vec<Vec<usize>> {
        self.report.tensors.iter().map(|t| t.shape.clone()).collect()
    }

    /// Element counts of the measured tensors.
    #[getter]
    fn tensor_elements(&self) -> Vec<u64> {
        self.report.tensors.iter().map(|t| t.moments.n).collect()
    }

    /// (name, reason) of tensors left out.
    #[getter]
    fn skipped(&self) -> Vec<(String, String)> {
        self.report.skipped.iter().map(|s| (s.name.clone(), s.reason.clone())).collect()
    }

    /// The k×k matrix of one metric ("pcc", "cs", "ed") in "full" or "split" mode.
    fn matrix<'py>(&self, py: Python<'py>, metric: &str, mode: &str) -> PyResult<Bound<'py, PyAny>> {
        let k = self.report.k;
        let values = self.report.matrix(parse_metric(metric)?, parse_mode(mode)?);
        Ok(PyArray1::from_vec(py, values).reshape([k, k])?.into_any())
    }

    /// One entry (i, j) of [`Self::matrix`], as a float: a pair's kinship without numpy.
    fn value(&self, metric: &str, mode: &str, i: usize, j: usize) -> PyResult<f64> {
        let k = self.report.k;
        if i >= k || j >= k {
            return Err(PyValueError::new_err(format!("model index out of range: ({i}, {j}) of {k}")));
        }
        Ok(self.report.matrix(parse_metric(metric)?, parse_mode(mode)?)[i * k + j])
    }

    /// The metric for every tensor: an array of shape (tensors, k, k); NaN where undefined.
    fn per_tensor<'py>(&self, py: Python<'py>, metric: &str) -> PyResult<Bound<'py, PyAny>> {
        let metric = parse_metric(metric)?;
        let k = self.report.k;
        let values: Vec<f64> = self.report.tensors.iter().flat_map(|t| t.moments.matrix(metric)).collect();
        Ok(PyArray1::from_vec(py, values).reshape([self.report.tensors.len(), k, k])?.into_any())
    }
}

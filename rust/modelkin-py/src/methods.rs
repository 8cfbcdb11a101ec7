//! The method table of the core, as frozen Python objects: `modelkin._core.methods()`.

use modelkin_core::merge::{DefaultValue, Parameter, METHODS};
use modelkin_core::MethodSpec;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};

/// One parameter of a merge method.
#[pyclass(module = "modelkin._core", frozen, get_all)]
pub struct ParameterInfo {
    /// Its key in recipes.
    pub name: &'static str,
    /// "global" (top-level `parameters:`) or "per_model" (`models[i].parameters`).
    pub scope: &'static str,
    /// Whether a recipe must give it.
    pub required: bool,
    /// Its default (None when required): a float, an int or a bool.
    pub default: Option<Py<PyAny>>,
    /// (low, high, low_open, high_open) when its values are limited.
    pub range: Option<(f64, f64, bool, bool)>,
    /// The range in interval notation, as messages print it: "[0, 1]".
    pub range_text: Option<String>,
    /// What it does.
    pub help: &'static str,
    /// Why it is accepted and has no effect (mergekit declares it and ignores it), if so.
    pub ignored: Option<&'static str>,
}

/// One merge method: a row of the core's method table.
#[pyclass(module = "modelkin._core", frozen, get_all)]
pub struct MethodInfo {
    /// Its name in recipes.
    pub name: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// What it does with base_model: "required", "optional", "input" or "ignored".
    pub base: &'static str,
    /// Fewest models merged besides the base.
    pub min_models: usize,
    /// Most models merged besides the base (None: no limit).
    pub max_models: Option<usize>,
    /// Its parameters.
    pub parameters: Vec<Py<ParameterInfo>>,
    /// Its whole-tensor statistics: "none", "sparsification", "norms", "variance", "importance".
    pub statistics: &'static str,
    /// Its task-vector pruning ("magnitude", "random", "magnitude_outliers", "della"), if any.
    pub sparsification: Option<&'static str>,
    /// Whether task vectors are combined with sign election.
    pub sign_consensus: bool,
    /// Whether it combines weighted task vectors.
    pub task_vectors: bool,
    /// Whether its result is float32 even from half-precision inputs (a float32 factor promotes it).
    pub float32_result: bool,
}

fn parameter(py: Python<'_>, p: &Parameter) -> PyResult<ParameterInfo> {
    let default = match p.default {
        DefaultValue::Required => None,
        DefaultValue::Number(v) => Some(PyFloat::new(py, v).into_any().unbind()),
        DefaultValue::Integer(v) => Some(PyInt::new(py, v).into_any().unbind()),
        DefaultValue::Flag(v) => Some(PyBool::new(py, v).to_owned().into_any().unbind()),
    };
    Ok(ParameterInfo {
        name: p.name,
        scope: p.scope.name(),
        required: p.default == DefaultValue::Required,
        default,
        range: p.range.map(|r| (r.low, r.high, r.low_open, r.high_open)),
        range_text: p.range.map(|r| r.text()),
        help: p.help,
        ignored: p.ignored,
    })
}

fn method(py: Python<'_>, spec: &MethodSpec) -> PyResult<MethodInfo> {
    use modelkin_core::merge::Sparsification as S;
    Ok(MethodInfo {
        name: spec.name,
        summary: spec.summary,
        base: spec.base.name(),
        min_models: spec.inputs.min,
        max_models: (spec.inputs.max != usize::MAX).then_some(spec.inputs.max),
        parameters: spec
            .parameters
            .iter()
            .map(|p| Py::new(py, parameter(py, p)?))
            .collect::<PyResult<_>>()?,
        statistics: spec.statistics.name(),
        sparsification: spec.sparsification.map(|s| match s {
            S::Magnitude => "magnitude",
            S::Random => "random",
            S::MagnitudeOutliers => "magnitude_outliers",
            S::DellaMagprune => "della",
        }),
        sign_consensus: spec.sign_consensus,
        task_vectors: spec.task_vectors,
        float32_result: spec.float32_result,
    })
}

/// Every merge method, in the table's order.
#[pyfunction]
pub fn methods(py: Python<'_>) -> PyResult<Vec<MethodInfo>> {
    METHODS.iter().map(|spec| method(py, spec)).collect()
}

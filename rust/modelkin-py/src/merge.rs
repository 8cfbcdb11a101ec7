//! `run_merge`: a whole merge job, described as JSON by the Python layer, run off the GIL.

use modelkin_core::{run_merge as core_run_merge, Error, MergeJob, Metric, Mode};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::progress::run_watched;

/// Runs the merge described by `job` (JSON, see `modelkin-core`'s `MergeJob`) and returns
/// `{"bytes_written": int, "kinship": {"pcc": [[...]], "cs": ..., "ed": ...} | None}`.
#[pyfunction]
#[pyo3(signature = (job, *, progress = None))]
pub fn run_merge<'py>(
    py: Python<'py>,
    job: &str,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let job: MergeJob = serde_json::from_str(job)
        .map_err(|e| crate::errors::to_py(Error::InvalidArgument(format!("invalid merge job: {e}"))))?;
    let report = run_watched(py, progress.as_ref(), |p| core_run_merge(&job, p))?;
    let out = PyDict::new(py);
    out.set_item("bytes_written", report.bytes_written)?;
    match report.kinship {
        Some(kinship) => {
            let k = kinship.k;
            let matrices = PyDict::new(py);
            for metric in Metric::ALL {
                let values = kinship.matrix(metric, Mode::Full);
                let rows: Vec<Vec<f64>> = values.chunks(k.max(1)).map(<[f64]>::to_vec).collect();
                matrices.set_item(metric.name(), rows)?;
            }
            out.set_item("kinship", matrices)?;
        }
        None => out.set_item("kinship", py.None())?,
    }
    Ok(out)
}

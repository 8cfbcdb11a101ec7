//! `modelkin._core`: the thin PyO3 layer over modelkin-core. Heavy work runs with the GIL released.

mod adapter;
mod errors;
mod kinship;
mod merge;
mod methods;
mod model;
mod progress;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    module.add_class::<kinship::KinshipPlan>()?;
    module.add_class::<kinship::KinshipStats>()?;
    module.add_class::<merge::MergeOutcome>()?;
    module.add_class::<model::ModelHandle>()?;
    module.add_function(wrap_pyfunction!(model::open_model, module)?)?;
    module.add_function(wrap_pyfunction!(adapter::apply_adapter, module)?)?;
    module.add_function(wrap_pyfunction!(model::compose_model, module)?)?;
    module.add_class::<methods::MethodInfo>()?;
    module.add_class::<methods::ParameterInfo>()?;
    module.add_function(wrap_pyfunction!(merge::run_merge, module)?)?;
    module.add_function(wrap_pyfunction!(methods::methods, module)?)?;
    errors::register(module)?;
    Ok(())
}

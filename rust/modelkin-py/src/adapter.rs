//! A LoRA adapter applied to its base, as a model the core holds ([`apply_adapter`]).

use std::path::PathBuf;
use std::sync::Arc;

use modelkin_core::io::adapter::{self, DeltaRounding, LoraLayout, LoraTarget, Replacement};
use modelkin_core::io::error::Error;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::model::ModelHandle;

/// One of an option's named values, or an error listing them.
fn choice<T: Copy>(what: &str, name: &str, values: &[(&str, T)]) -> PyResult<T> {
    values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| {
        let known: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
        to_py(Error::InvalidArgument(format!("unknown {what} '{name}' ({})", known.join(", "))))
    })
}

const LAYOUTS: &[(&str, LoraLayout)] =
    &[("plain", LoraLayout::Plain), ("transposed", LoraLayout::Transposed)];
const ROUNDINGS: &[(&str, DeltaRounding)] =
    &[("sum", DeltaRounding::Sum), ("delta_first", DeltaRounding::DeltaFirst)];

/// A target as Python gives it: (tensor, A, B, scale, layout, rounding).
type TargetArg = (String, String, String, f64, String, String);

/// The base model with the adapter applied as PEFT's `merge_and_unload` applies it (see the core's
/// `io::adapter`), with the GIL released: the changed tensors in memory, the rest mapped.
#[pyfunction]
#[pyo3(signature = (base, adapter, targets, replacements, label))]
pub fn apply_adapter(
    py: Python<'_>,
    base: PathBuf,
    adapter: PathBuf,
    targets: Vec<TargetArg>,
    replacements: Vec<(String, String)>,
    label: String,
) -> PyResult<ModelHandle> {
    let targets = targets
        .into_iter()
        .map(|(tensor, a, b, scale, l, r)| {
            Ok(LoraTarget {
                tensor,
                a,
                b,
                scale,
                layout: choice("LoRA layout", &l, LAYOUTS)?,
                rounding: choice("delta rounding", &r, ROUNDINGS)?,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let replacements: Vec<Replacement> =
        replacements.into_iter().map(|(tensor, source)| Replacement { tensor, source }).collect();
    let model = py
        .detach(|| adapter::apply_adapter(&base, &adapter, &targets, &replacements, &label))
        .map_err(to_py)?;
    Ok(ModelHandle { model: Arc::new(model) })
}

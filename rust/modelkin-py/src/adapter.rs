//! A LoRA adapter applied to its base, as a model the core holds ([`apply_adapter`]).

use std::path::PathBuf;
use std::sync::Arc;

use modelkin_core::io::adapter::{self, DeltaRounding, LoraLayout, LoraTarget, Replacement};
use modelkin_core::io::error::Error;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::model::ModelHandle;

fn layout(name: &str) -> PyResult<LoraLayout> {
    match name {
        "plain" => Ok(LoraLayout::Plain),
        "transposed" => Ok(LoraLayout::Transposed),
        other => {
            Err(to_py(Error::InvalidArgument(format!("unknown LoRA layout '{other}' (plain, transposed)"))))
        }
    }
}

fn rounding(name: &str) -> PyResult<DeltaRounding> {
    match name {
        "sum" => Ok(DeltaRounding::Sum),
        "delta_first" => Ok(DeltaRounding::DeltaFirst),
        other => {
            Err(to_py(Error::InvalidArgument(format!("unknown delta rounding '{other}' (sum, delta_first)"))))
        }
    }
}

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
            Ok(LoraTarget { tensor, a, b, scale, layout: layout(&l)?, rounding: rounding(&r)? })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let replacements: Vec<Replacement> =
        replacements.into_iter().map(|(tensor, source)| Replacement { tensor, source }).collect();
    let model = py
        .detach(|| adapter::apply_adapter(&base, &adapter, &targets, &replacements, &label))
        .map_err(to_py)?;
    Ok(ModelHandle { model: Arc::new(model) })
}

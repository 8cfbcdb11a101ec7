//! A LoRA adapter applied to its base, as a model: the base's files mapped, and every tensor the
//! adapter changes computed in memory the way PEFT's `merge_and_unload` computes it (which is what
//! mergekit's `model+lora` loads), bit for bit:
//!
//! - ΔW = (B·A)·s with B·A in float32, each element one chain of fused multiply-adds over the rank
//!   in order (what MKL's sgemm does for these shapes), and s rounded to float32 first (torch's
//!   tensor × Python float);
//! - a linear layer: `W += ΔW`, the sum taken in float32 and rounded once to W's dtype;
//! - an embedding: `W += ΔW.to(W.dtype)`, ΔW rounded to W's dtype before the sum;
//! - a tensor the adapter stores whole (`modules_to_save`, an embedding's `base_layer`) replaces
//!   the base's, rounded to its dtype as `load_state_dict` rounds it.
//!
//! The factors may be stored in float32, bfloat16 or float16: PEFT upcasts the last two exactly.

use std::path::Path;

use rayon::prelude::*;

use crate::io::dtype::FloatDtype;
use crate::io::encode::{encode, OutDtype};
use crate::io::error::{Error, Result};
use crate::io::model::Model;
use crate::io::writer::{MemoryWriter, OutputTensor, TensorSink};

/// How B·A lies against the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// W is out × in, B·A has its shape (a linear layer).
    Plain,
    /// W is (B·A)ᵀ-shaped: an embedding (vocab × dim), or GPT-2's Conv1D (`fan_in_fan_out`).
    Transposed,
}

/// Where ΔW is rounded to the weight's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaRounding {
    /// The float32 sum W + ΔW is rounded once (a linear layer).
    Sum,
    /// ΔW is rounded to W's dtype first, then added (an embedding).
    DeltaFirst,
}

/// One tensor of the base the adapter's factors change.
#[derive(Debug, Clone)]
pub struct LoraTarget {
    /// The base tensor's name.
    pub tensor: String,
    /// The adapter's A tensor (r × in; r × vocab for an embedding).
    pub a: String,
    /// The adapter's B tensor (out × r; dim × r for an embedding).
    pub b: String,
    /// lora_alpha / r (or / √r), as PEFT holds it.
    pub scale: f64,
    /// How B·A lies against the weight.
    pub layout: LoraLayout,
    /// Where the delta is rounded.
    pub rounding: DeltaRounding,
}

/// A base tensor the adapter stores whole.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The base tensor's name.
    pub tensor: String,
    /// The adapter's tensor that replaces it.
    pub source: String,
}

fn factor(adapter: &Model, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let entry = adapter
        .tensor(name)
        .ok_or_else(|| Error::MissingTensor { path: adapter.path.clone(), tensor: name.to_string() })?;
    let dtype = adapter.float_dtype(name, entry)?;
    if !matches!(dtype, FloatDtype::F32 | FloatDtype::BF16 | FloatDtype::F16) || entry.shape.len() != 2 {
        return Err(Error::invalid_file(
            adapter.file_of(entry),
            format!("LoRA factor '{name}' must be a 2-D float32, bfloat16 or float16 tensor"),
        ));
    }
    let mut wide = vec![0f64; entry.numel()];
    adapter.read_f64(entry, dtype, 0, &mut wide);
    Ok((wide.into_iter().map(|v| v as f32).collect(), entry.shape.clone()))
}

fn weight_dtype(base: &Model, name: &str) -> Result<(FloatDtype, OutDtype, Vec<usize>)> {
    let entry = base
        .tensor(name)
        .ok_or_else(|| Error::MissingTensor { path: base.path.clone(), tensor: name.to_string() })?;
    let dtype = base.float_dtype(name, entry)?;
    let out = OutDtype::from_safetensors(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
        path: base.file_of(entry).to_path_buf(),
        tensor: name.to_string(),
        dtype: format!(
            "{:?} (an adapter is applied to float64, float32, bfloat16 or float16 weights)",
            entry.dtype
        ),
    })?;
    Ok((dtype, out, entry.shape.clone()))
}

/// Rounds values to `dtype` (torch's `.to(dtype)`: round to nearest even), in place. They are
/// float32 numbers here (a float32 sum or delta), so rounding from f32 is the one rounding torch
/// makes; nothing is encoded and decoded again.
fn round_to(dtype: OutDtype, values: &mut [f64]) {
    match dtype {
        OutDtype::F64 => {}
        OutDtype::F32 => values.iter_mut().for_each(|v| *v = f64::from(*v as f32)),
        OutDtype::BF16 => {
            values.iter_mut().for_each(|v| *v = f64::from(half::bf16::from_f32(*v as f32).to_f32()))
        }
        OutDtype::F16 => {
            values.iter_mut().for_each(|v| *v = f64::from(half::f16::from_f32(*v as f32).to_f32()))
        }
    }
}

/// The weight with one adapter target applied, as f64 values of its dtype's numbers.
fn applied(
    weight: &mut [f64],
    dtype: OutDtype,
    shape: &[usize],
    adapter: &Model,
    target: &LoraTarget,
) -> Result<()> {
    let (a, a_shape) = factor(adapter, &target.a)?;
    let (b, b_shape) = factor(adapter, &target.b)?;
    let (rank, outer, inner) = (a_shape[0], b_shape[0], a_shape[1]);
    let expected = match target.layout {
        LoraLayout::Plain => [outer, inner],
        LoraLayout::Transposed => [inner, outer],
    };
    if b_shape[1] != rank || shape != expected {
        return Err(Error::invalid_file(
            &adapter.path,
            format!(
                "LoRA factors {} {a_shape:?} and {} {b_shape:?} do not fit '{}' {shape:?}",
                target.a, target.b, target.tensor
            ),
        ));
    }
    let scale = target.scale as f32;
    let cols = shape[1];
    weight.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        let mut delta: Vec<f64> = (0..cols)
            .map(|j| {
                let (o, n) = match target.layout {
                    LoraLayout::Plain => (i, j),
                    LoraLayout::Transposed => (j, i),
                };
                let mut acc = 0f32;
                for k in 0..rank {
                    acc = b[o * rank + k].mul_add(a[k * inner + n], acc);
                }
                f64::from(acc * scale)
            })
            .collect();
        if target.rounding == DeltaRounding::DeltaFirst {
            round_to(dtype, &mut delta);
        }
        for (w, d) in row.iter_mut().zip(&delta) {
            // torch adds in float32 for the half types and float32, in float64 for float64.
            *w = if dtype == OutDtype::F64 { *w + d } else { f64::from(*w as f32 + *d as f32) };
        }
        round_to(dtype, row);
    });
    Ok(())
}

/// The model at `base` with the adapter at `adapter` (its safetensors file) applied: `targets` and
/// `replacements` name what it changes. The changed tensors are held in memory, the rest read from
/// the base's files; `label` names the result in messages.
pub fn apply_adapter(
    base: &Path,
    adapter: &Path,
    targets: &[LoraTarget],
    replacements: &[Replacement],
    label: &str,
) -> Result<Model> {
    let base = Model::open(base)?;
    let adapter = Model::open(adapter)?;
    let mut names: Vec<&str> = replacements.iter().map(|r| r.tensor.as_str()).collect();
    names.extend(targets.iter().map(|t| t.tensor.as_str()));
    names.sort_unstable();
    names.dedup();
    let mut outputs = Vec::with_capacity(names.len());
    let mut encoded = Vec::with_capacity(names.len());
    for name in names {
        let (stored, dtype, shape) = weight_dtype(&base, name)?;
        let entry = base.tensor(name).expect("checked by weight_dtype");
        let mut weight = vec![0f64; entry.numel()];
        match replacements.iter().find(|r| r.tensor == name) {
            Some(replacement) => {
                let source = adapter.tensor(&replacement.source).ok_or_else(|| Error::MissingTensor {
                    path: adapter.path.clone(),
                    tensor: replacement.source.clone(),
                })?;
                if source.shape != shape {
                    return Err(Error::ShapeMismatch {
                        path: adapter.file_of(source).to_path_buf(),
                        tensor: replacement.source.clone(),
                        expected: shape,
                        found: source.shape.clone(),
                    });
                }
                let from = adapter.float_dtype(&replacement.source, source)?;
                adapter.read_f64(source, from, 0, &mut weight);
                round_to(dtype, &mut weight);
            }
            None => base.read_f64(entry, stored, 0, &mut weight),
        }
        for target in targets.iter().filter(|t| t.tensor == name) {
            applied(&mut weight, dtype, &shape, &adapter, target)?;
        }
        // Held in the weight's dtype: one tensor at a time is ever widened to f64.
        let mut bytes = Vec::with_capacity(weight.len() * dtype.size());
        encode(dtype, &weight, &mut bytes);
        outputs.push(OutputTensor { name: name.to_string(), shape, dtype });
        encoded.push(bytes);
    }
    let mut writer = MemoryWriter::create(&outputs);
    for (index, bytes) in encoded.iter().enumerate() {
        writer.begin_tensor(index)?;
        writer.write(bytes)?;
    }
    let changed = writer.finish(label)?;
    Ok(base.overlaid(label, changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        let mut v = [1.0 + 2f64.powi(-8), 1.0 + 3.0 * 2f64.powi(-8)];
        round_to(OutDtype::BF16, &mut v);
        assert_eq!(v, [1.0, 1.0 + 2.0 * 2f64.powi(-7)]);
    }
}

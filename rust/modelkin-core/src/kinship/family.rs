//! A model family (a base and its fine-tunes) opened together, and the plan of a pass over it:
//! which tensors every model has, cut to the base's vocabulary rows, and where each copy lives.

use std::path::Path;
use std::sync::Arc;

use crate::io::dtype::FloatDtype;
use crate::io::error::{Error, Result};
use crate::io::model::{Model, TensorEntry};
use crate::kinship::kernel;
use crate::kinship::options::PassOptions;
use crate::kinship::report::SkippedTensor;

const LM_HEAD: &str = "lm_head.weight";
const EMBED_SUFFIX: &str = "embed_tokens.weight";

/// Models opened together: the base first, then the fine-tunes.
#[derive(Debug)]
pub struct Family {
    /// The base at index 0, then the fine-tunes.
    pub models: Vec<Arc<Model>>,
}

impl Family {
    /// Groups a base and its fine-tunes, refusing the same model twice.
    pub fn new(base: Arc<Model>, fine_tunes: Vec<Arc<Model>>) -> Result<Self> {
        if fine_tunes.is_empty() {
            return Err(Error::InvalidArgument("at least one model besides the base is needed".to_string()));
        }
        let models: Vec<Arc<Model>> = std::iter::once(base).chain(fine_tunes).collect();
        for (i, model) in models.iter().enumerate() {
            if models[..i].iter().any(|other| other.same_as(model)) {
                return Err(Error::DuplicateModel { path: model.path.clone() });
            }
        }
        Ok(Family { models })
    }

    /// Number of fine-tunes.
    pub fn k(&self) -> usize {
        self.models.len() - 1
    }

    /// Widens `out.len()` elements of a source tensor, starting at element `first`.
    pub fn read_f64(&self, source: &Source, first: usize, out: &mut [f64]) {
        self.models[source.model].read_f64(&source.entry, source.dtype, first, out);
    }

    /// out ← (`out.len()` elements of a source tensor from element `first`) − `base`, returning
    /// Σ out.
    pub fn read_delta(&self, source: &Source, first: usize, base: &[f64], out: &mut [f64]) -> f64 {
        kernel::stored_delta_and_sum(source.dtype, self.raw_bytes(source, first, out.len()), base, out)
    }

    /// The stored bytes of `count` elements of a source tensor, starting at element `first`.
    pub fn raw_bytes(&self, source: &Source, first: usize, count: usize) -> &[u8] {
        self.models[source.model].raw_bytes(&source.entry, source.dtype, first, count)
    }

    /// The file holding a source tensor.
    pub fn file_of(&self, source: &Source) -> &Path {
        self.models[source.model].file_of(&source.entry)
    }
}

/// Where one model's copy of a planned tensor lives.
#[derive(Debug, Clone)]
pub struct Source {
    /// Index into [`Family::models`].
    pub model: usize,
    /// Location of the data.
    pub entry: TensorEntry,
    /// Storage format.
    pub dtype: FloatDtype,
}

/// A tensor every model has, with the shape all deltas share after the vocabulary row cut.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name in the base model.
    pub name: String,
    /// Shape after the row cut (a prefix of each stored tensor).
    pub shape: Vec<usize>,
    /// Elements after the row cut.
    pub numel: usize,
    /// The base first, then the fine-tunes.
    pub sources: Vec<Source>,
}

impl PlannedTensor {
    pub(crate) fn bytes(&self) -> u64 {
        self.sources.iter().map(|s| (self.numel * s.dtype.size()) as u64).sum()
    }
}

/// The tensors a pass visits, in reading order, and those it leaves out.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Tensors to measure.
    pub tensors: Vec<PlannedTensor>,
    /// Tensors left out (missing from a fine-tune, with `skip_missing`).
    pub skipped: Vec<SkippedTensor>,
}

/// The number of rows every tensor is cut to: the base's vocabulary size.
pub(crate) fn vocab_rows(base: &Model) -> Option<usize> {
    let names = base.tensor_names();
    let name =
        names.iter().find(|n| **n == LM_HEAD).or_else(|| names.iter().find(|n| n.ends_with(EMBED_SUFFIX)))?;
    base.tensor(name).and_then(|e| e.shape.first().copied())
}

pub(crate) fn cut_shape(shape: &[usize], rows: Option<usize>) -> Vec<usize> {
    let mut shape = shape.to_vec();
    if let (Some(first), Some(rows)) = (shape.first_mut(), rows) {
        *first = (*first).min(rows);
    }
    shape
}

/// Decides which tensors a pass visits and where each model's copy lives.
pub fn plan(family: &Family, options: &PassOptions) -> Result<Plan> {
    let base = &family.models[0];
    let rows = vocab_rows(base);
    let mut names: Vec<(String, &str)> =
        base.tensor_names().into_iter().map(|n| (n.to_string(), n)).collect();
    if options.count_tied_embeddings_twice && base.tensor(LM_HEAD).is_none() {
        if let Some(embed) = base.tensor_names().into_iter().find(|n| n.ends_with(EMBED_SUFFIX)) {
            names.push((LM_HEAD.to_string(), embed));
        }
    }
    let mut tensors = Vec::with_capacity(names.len());
    let mut skipped = Vec::new();
    'tensors: for (name, stored_as) in names {
        let entry = base.tensor(stored_as).expect("name comes from the base");
        let shape = cut_shape(&entry.shape, rows);
        let mut sources =
            vec![Source { model: 0, entry: entry.clone(), dtype: base.float_dtype(stored_as, entry)? }];
        for (index, model) in family.models.iter().enumerate().skip(1) {
            // An aliased tied embedding reads the fine-tune's own lm_head when it stores one.
            let found = model
                .tensor(&name)
                .map(|e| (&name[..], e))
                .or_else(|| model.tensor(stored_as).map(|e| (stored_as, e)));
            let Some((found_name, entry)) = found else {
                if options.skip_missing {
                    skipped.push(SkippedTensor {
                        name: name.clone(),
                        reason: format!("missing from {}", model.path.display()),
                    });
                    continue 'tensors;
                }
                return Err(Error::MissingTensor { path: model.path.clone(), tensor: name });
            };
            let model_shape = cut_shape(&entry.shape, rows);
            if model_shape != shape {
                return Err(Error::ShapeMismatch {
                    path: model.file_of(entry).to_path_buf(),
                    tensor: name,
                    expected: shape,
                    found: model_shape,
                });
            }
            sources.push(Source {
                model: index,
                entry: entry.clone(),
                dtype: model.float_dtype(found_name, entry)?,
            });
        }
        let numel = shape.iter().product();
        tensors.push(PlannedTensor { name, shape, numel, sources });
    }
    Ok(Plan { tensors, skipped })
}

/// Lets the pages of every source of a finished tensor go.
pub(crate) fn release(family: &Family, tensor: &PlannedTensor) {
    for s in &tensor.sources {
        family.models[s.model].release(&s.entry);
    }
}

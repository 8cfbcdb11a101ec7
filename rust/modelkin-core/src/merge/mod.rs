//! Merging models tensor by tensor, with mergekit's method definitions, in bounded memory. Three
//! folders: the engine runs a job and calls the methods, whose arithmetic follows torch's numerics
//! bit for bit. May import: io and kinship (a merge measures the parents' kinship while it reads
//! them); nothing above merge.
//!
//! Every output tensor is computed in row blocks. A method that needs a whole-tensor statistic
//! (a magnitude threshold, an L1 norm, a norm or cosine) takes it in a first streamed pass over
//! that tensor; nothing holds a model's tensor decoded in full. The parents' deltas against the
//! base are measured for kinship while the output pass reads them.

mod engine;
mod methods;
mod torch;

pub use engine::{
    run_merge, run_merge_opened, BaseUse, Compute, DefaultValue, Inputs, MergeInput, MergeJob, MergeReport,
    Method, MethodSpec, Parameter, RamOptions, Range, Scope, Sparsification, SphericalOptions, Statistics,
    TensorRecipe, IN_MEMORY_LABEL, METHODS,
};

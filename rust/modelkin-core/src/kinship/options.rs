//! The knobs of a kinship pass. The plan ([`super::family::plan`]) and the pass itself
//! ([`super::pass::kinship_pass`]) both read them, so they live below both, in their own file:
//! neither has to import the other.

use crate::kinship::stats::Mode;

/// Knobs of a kinship pass.
#[derive(Debug, Clone, Default)]
pub struct PassOptions {
    /// Quantise deltas to int8 like the original tool's `--low-precision`; the scale is taken over
    /// the whole delta vector (`Full`) or per tensor (`Split`).
    pub low_precision: Option<Mode>,
    /// Leave out tensors holding NaN/Inf instead of failing.
    pub skip_nonfinite: bool,
    /// Leave out tensors that a fine-tune lacks instead of failing (the original tool's behaviour).
    pub skip_missing: bool,
    /// With tied embeddings (no `lm_head.weight` stored), count the embedding a second time as
    /// `lm_head.weight`, as `model.state_dict()` does in the original tool.
    pub count_tied_embeddings_twice: bool,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
}

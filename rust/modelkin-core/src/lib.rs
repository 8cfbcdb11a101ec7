//! modelkin-core: exact, streaming kinship statistics between fine-tuned models.
//!
//! Models are memory-mapped safetensors shards; a pass decodes every tensor chunk by chunk,
//! widens it exactly to f64 and accumulates centred moments of the deltas against a base, for all
//! models at once. Nothing here knows about Python.
#![deny(missing_docs)]

pub mod dtype;
pub mod encode;
pub mod error;
mod gram;
pub mod kernel;
pub mod kinship;
pub mod merge;
pub mod model;
mod simd;
pub mod stats;
pub mod writer;

pub use error::{Error, Result};
pub use kinship::{
    kinship_pass, plan, Family, KinshipReport, PassOptions, Plan, PlannedTensor, Progress, SkippedTensor,
    Source, TensorStats,
};
pub use merge::{run_merge, Compute, MergeJob, MergeReport, Method};
pub use model::Model;
pub use stats::{Metric, Mode, Moments};

//! modelkin-core: exact, streaming kinship statistics between fine-tuned models.
//!
//! Models are memory-mapped safetensors shards; a pass decodes every tensor chunk by chunk,
//! widens it exactly to f64 and accumulates centred moments of the deltas against a base, for all
//! models at once. Nothing here knows about Python.
#![deny(missing_docs)]

pub mod dtype;
pub mod encode;
pub mod error;
pub mod family;
mod gram;
pub mod kernel;
pub mod kinship;
pub mod merge;
pub mod model;
pub mod progress;
pub mod report;
mod simd;
pub mod stats;
pub mod threads;
pub mod writer;

pub use error::{Error, Result};
pub use family::{plan, Family, Plan, PlannedTensor, Source};
pub use kinship::{kinship_pass, PassOptions};
pub use merge::{run_merge, run_merge_opened, Compute, MergeJob, MergeReport, Method, MethodSpec, METHODS};
pub use model::Model;
pub use progress::Progress;
pub use report::{KinshipReport, SkippedTensor, TensorStats};
pub use stats::{Metric, Mode, Moments};

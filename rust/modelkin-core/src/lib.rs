//! modelkin-core: exact, streaming kinship statistics between fine-tuned models.
//!
//! Models are memory-mapped safetensors shards; a pass decodes every tensor chunk by chunk,
//! widens it exactly to f64 and accumulates centred moments of the deltas against a base, for all
//! models at once. Nothing here knows about Python.
//!
//! Three layers, each a folder, each importing only itself and the layers below it: [`io`]
//! (models, dtypes, writing, errors, progress, threads) < [`kinship`] (the pass and its
//! statistics) < [`merge`] (the merge engine, its methods and torch's numerics).
#![deny(missing_docs)]

pub mod io;
pub mod kinship;
pub mod merge;

pub use io::error::{Error, Result};
pub use io::model::Model;
pub use io::progress::Progress;
pub use kinship::family::{plan, Family, Plan, PlannedTensor, Source};
pub use kinship::options::PassOptions;
pub use kinship::pass::kinship_pass;
pub use kinship::report::{KinshipReport, SkippedTensor, TensorStats};
pub use kinship::stats::{Metric, Mode, Moments};
pub use merge::{run_merge, run_merge_opened, Compute, MergeJob, MergeReport, Method, MethodSpec, METHODS};

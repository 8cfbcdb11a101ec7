//! The merge engine: the job as the Python layer sends it (`job`), the method table (`method`,
//! `table`), each output tensor's inputs resolved and decoded block by block (`source`, `scratch`,
//! `sums`), the whole-tensor statistics passes (`statistics`), the output pass (`combine`) with
//! the parents' kinship it measures (`moments`), and the run that drives them (`run`). May
//! import: io, kinship, the methods and torch's numerics. Those in turn import only the engine's lower files: the job (`job`, `method`), the resolved
//! sources (`source`, `scratch`, `sums`) and, for the task-vector family, the statistics a pass
//! measured (`statistics`); nothing below the engine imports `combine`, `run` or `table`.

mod combine;
pub(crate) mod job;
mod method;
mod moments;
mod run;
pub(crate) mod scratch;
pub(crate) mod source;
pub(crate) mod statistics;
pub(crate) mod sums;
mod table;
#[cfg(test)]
mod tests;

pub use job::{Compute, MergeInput, MergeJob, RamOptions, SphericalOptions, TensorRecipe};
pub use method::{
    BaseUse, DefaultValue, Inputs, Method, MethodSpec, Parameter, Range, Scope, Sparsification, Statistics,
};
pub use run::{run_merge, run_merge_opened, MergeReport, IN_MEMORY_LABEL};
pub use table::METHODS;

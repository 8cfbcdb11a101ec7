//! The merge methods' arithmetic, one file per method or family of methods: what each measures
//! in its statistics pass and how it combines a block of the output. May import: io, kinship,
//! torch's numerics and the engine's lower files (the job, the resolved sources, the block sums
//! and, for the task-vector family, the statistics a pass measured); never the engine's output
//! pass or its run, which call the methods.

pub(crate) mod fusion;
pub(crate) mod karcher;
pub(crate) mod model_stock;
pub(crate) mod multislerp;
pub(crate) mod nuslerp;
pub(crate) mod ram;
pub(crate) mod sce;
pub(crate) mod spherical;
pub(crate) mod task_vectors;

//! Kinship statistics: a base and its fine-tunes opened and planned together ([`family`]), the
//! streaming pass over them ([`pass`], with its [`options`]), the SIMD reductions and all-pairs
//! sweeps it runs ([`kernel`], `simd`, `gram`), the centred moments it accumulates ([`stats`]) and
//! what it reports ([`report`]). May import: io only; merge imports it (a merge measures the
//! parents' kinship while it reads them).

pub mod family;
pub(crate) mod gram;
pub mod kernel;
pub mod options;
pub mod pass;
pub mod report;
mod simd;
pub mod stats;

pub use options::PassOptions;
pub use pass::kinship_pass;

//! The lowest layer: safetensors models memory-mapped and read ([`model`]), a LoRA adapter
//! applied to its base as a model ([`adapter`]), stored formats widened
//! exactly to f64 ([`dtype`]) and narrowed back ([`encode`]), tensors written as shards or held in
//! memory ([`writer`]), and the machinery every layer shares: the error type ([`error`]), progress
//! and cancellation ([`progress`]) and the worker pools ([`threads`]). May import: nothing of
//! this crate (std and external crates only); kinship and merge import it.

pub mod adapter;
pub mod dtype;
pub mod encode;
pub mod error;
pub mod model;
pub mod progress;
pub mod threads;
pub mod writer;

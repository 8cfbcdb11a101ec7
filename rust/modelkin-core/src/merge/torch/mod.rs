//! torch's numerics reproduced bit for bit: float32 norms and sums in torch's order, the rounding
//! of half-precision arithmetic, the stable sort order and top-k selection torch ranks by, a
//! streamed radix select for what the sort cannot hold, the float32 angles, torch's thread count,
//! and the counter-based random numbers. May import: io, and from the engine only the stored
//! tensors these reductions sweep (its sources and scratch buffers); never the methods or the
//! engine's passes.

pub(crate) mod float32;
pub(crate) mod half_ops;
pub(crate) mod outer_sum;
pub(crate) mod radix;
pub(crate) mod random;
pub(crate) mod sort_order;
pub(crate) mod threads;
pub(crate) mod topk;
pub(crate) mod trig;

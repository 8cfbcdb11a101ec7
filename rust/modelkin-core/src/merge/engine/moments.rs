//! The parents' kinship measured while a merge reads them: the moments of each block's deltas
//! against the base, from the stored bytes, by the kinship pass's own kernels (the pair kernel for
//! two parents of one dtype, the all-pairs sums for more), merged block by block in order.

use rayon::prelude::*;

use crate::io::dtype::{decode, FloatDtype};
use crate::kinship::gram::{stored_chunk_sums, BLOCK as GRAM_BLOCK};
use crate::kinship::kernel::{centred_dot_and_squared_distance, pair_delta_sums_stored};
use crate::kinship::stats::{raw_sum_relative_error, Moments};
use crate::merge::engine::scratch::Scratch;
use crate::merge::engine::source::Resolved;

/// The moments of the parents' deltas against the base over one block, from the stored bytes
/// (the base's as stored, not as the arithmetic loads it), as the kinship pass measures them:
/// two parents of one dtype through the pair kernel, more through the all-pairs sums.
pub(super) fn block_moments(tensor: &Resolved, first: usize, len: usize) -> Moments {
    let sources: Vec<(FloatDtype, &[u8])> =
        tensor.sources().iter().map(|s| (s.dtype, s.model.raw_bytes(s.entry, s.dtype, first, len))).collect();
    if let Some([z, x, y]) = pair_sources(&sources) {
        return Moments::from_pair_sums(len, pair_delta_sums_stored(z.0, x.1, y.1, z.1));
    }
    let mut scratch = Scratch::take::<f64>(1, sources.len() * GRAM_BLOCK);
    let (sums, products) =
        stored_chunk_sums(&sources, len, None, scratch.one::<f64>(sources.len() * GRAM_BLOCK));
    Moments::from_raw_sums(len, &sums, &products)
}

/// The base and two parents when they share a dtype: the pair kernel reads them directly and
/// sums the distance itself.
fn pair_sources<'a>(sources: &[(FloatDtype, &'a [u8])]) -> Option<[(FloatDtype, &'a [u8]); 3]> {
    let pair: [(FloatDtype, &[u8]); 3] = sources.try_into().ok()?;
    pair.iter().all(|s| s.0 == pair[0].0).then_some(pair)
}

/// Replaces the parents' distances that may have cancelled in the all-pairs sums' identity with
/// ones swept directly, as the kinship pass does (two parents that are nearly the same model).
pub(super) fn recheck_distances(tensor: &Resolved, moments: &mut Moments) {
    let k = tensor.inputs.len();
    let tolerance = raw_sum_relative_error(tensor.block);
    let sources: Vec<(FloatDtype, &[u8])> = tensor
        .sources()
        .iter()
        .map(|s| (s.dtype, s.model.raw_bytes(s.entry, s.dtype, 0, tensor.numel)))
        .collect();
    if pair_sources(&sources).is_some() {
        // The pair kernel summed the distance itself.
        return;
    }
    let inputs = &sources[sources.len() - k..];
    for i in 0..k {
        for j in i + 1..k {
            if moments.distance_may_have_cancelled(i, j, tolerance) {
                moments.set_squared_distance(i, j, squared_distance(inputs[i], inputs[j], tensor.block));
            }
        }
    }
}

/// Σ(x − y)² over two stored tensors, block by block in parallel, the blocks summed in order.
fn squared_distance(x: (FloatDtype, &[u8]), y: (FloatDtype, &[u8]), block: usize) -> f64 {
    let n = x.1.len() / x.0.size();
    let parts: Vec<f64> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let (first, len) = (b * block, block.min(n - b * block));
            let mut scratch = Scratch::take::<f64>(2, len);
            let [a, c] = &mut scratch.views::<f64>(len)[..] else { unreachable!("two buffers") };
            for ((dtype, bytes), out) in [(x, &mut *a), (y, &mut *c)] {
                decode(dtype, &bytes[first * dtype.size()..(first + len) * dtype.size()], out);
            }
            centred_dot_and_squared_distance(a, c, 0.0, 0.0).1
        })
        .collect();
    parts.iter().sum()
}

//! Whole-tensor sums over the decoded sources, block by block and merged in block order: the Gram
//! matrix of the inputs, and the sums the statistics passes take. Their own file because the
//! statistics passes and model_stock both take them, and the statistics passes call model_stock.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::source::{with_block, Resolved, Source};

/// The Gram matrix Σ vᵢ·vⱼ of the inputs, or of their task vectors when there is a base.
pub(crate) fn gram(tensor: &Resolved, progress: &Progress) -> Result<Vec<f64>> {
    let k = tensor.inputs.len();
    let relative = tensor.base.is_some();
    sums_over_vec(&tensor.sources(), tensor.block, tensor.numel, k * k, progress, |_, v, out| {
        add_gram_block(v, k, relative, out)
    })
}

/// Adds one block's Σ vᵢ·vⱼ to `out` (k×k); with `relative`, `v[0]` is the base and the products
/// are of the task vectors `v[i + 1] − v[0]`.
fn add_gram_block(v: &[&[f64]], k: usize, relative: bool, out: &mut [f64]) {
    let offset = usize::from(relative);
    for i in 0..k {
        for j in i..k {
            let (x, y) = (v[i + offset], v[j + offset]);
            let dot: f64 = if relative {
                x.iter().zip(y).zip(v[0]).map(|((a, b), z)| (a - z) * (b - z)).sum()
            } else {
                x.iter().zip(y).map(|(a, b)| a * b).sum()
            };
            out[i * k + j] += dot;
            if j != i {
                out[j * k + i] += dot;
            }
        }
    }
}

/// Sums computed block by block over the decoded sources, merged in block order.
pub(super) fn sums_over<const S: usize>(
    sources: &[&Source],
    block: usize,
    n: usize,
    progress: &Progress,
    block_sums: impl Fn(usize, &[&[f64]]) -> [f64; S] + Sync,
) -> Result<[f64; S]> {
    let parts = sums_over_vec(sources, block, n, S, progress, |first, v, out| {
        out.copy_from_slice(&block_sums(first, v))
    })?;
    Ok(std::array::from_fn(|i| parts[i]))
}

fn sums_over_vec(
    sources: &[&Source],
    block: usize,
    n: usize,
    width: usize,
    progress: &Progress,
    block_sums: impl Fn(usize, &[&[f64]], &mut [f64]) + Sync,
) -> Result<Vec<f64>> {
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            progress.check()?;
            let first = b * block;
            let len = block.min(n - first);
            let mut out = vec![0.0; width];
            with_block(sources, first, len, |views| block_sums(first, views, &mut out));
            progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
            Ok(out)
        })
        .collect::<Result<_>>()?;
    let mut total = vec![0.0; width];
    for part in parts {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    Ok(total)
}

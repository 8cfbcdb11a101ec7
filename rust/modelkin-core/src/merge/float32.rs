//! The norms mergekit takes in float32, reproduced bit for bit.
//!
//! With `dtype: float32`, mergekit's slerp and model_stock derive their factors from torch float32
//! norms, and torch sums the squares in eight f32 lanes of fused multiply-adds, one after another.
//! Over millions of elements that drifts: on a 32000×256 tensor torch's norm is 57.240738 where the
//! exact one is 57.238481 (4e-5 apart), which moves the factors, and so the bf16 outputs, of a few
//! tenths of a percent of the elements. modelkin follows the same order so that its outputs match.

use rayon::prelude::*;

use super::{with_block, Source, BLOCK};
use crate::error::Result;
use crate::kinship::Progress;

const LANES: usize = 8;

/// torch's float32 2-norm of a contiguous run (`torch.linalg.vector_norm` on CPU): squares
/// accumulated with fused multiply-adds in eight f32 lanes over the whole groups of eight, the
/// lanes then added in order, and the last `len % 8` squares added one by one.
#[derive(Debug, Clone)]
pub(super) struct LaneNorm {
    lanes: [f32; LANES],
    grouped: usize,
    seen: usize,
    tail: Vec<f32>,
}

impl LaneNorm {
    /// A norm over a run of `len` values.
    pub(super) fn new(len: usize) -> Self {
        LaneNorm { lanes: [0.0; LANES], grouped: len - len % LANES, seen: 0, tail: Vec::new() }
    }

    /// Adds the next values of the run, in order.
    pub(super) fn add(&mut self, values: impl IntoIterator<Item = f32>) {
        for v in values {
            if self.seen < self.grouped {
                let lane = &mut self.lanes[self.seen % LANES];
                *lane = v.mul_add(v, *lane);
            } else {
                self.tail.push(v);
            }
            self.seen += 1;
        }
    }

    pub(super) fn finish(&self) -> f32 {
        let mut sum = self.lanes[0];
        for lane in &self.lanes[1..] {
            sum += lane;
        }
        for v in &self.tail {
            sum = v.mul_add(*v, sum);
        }
        sum.sqrt()
    }
}

/// mergekit's chunked float32 slerp norm of each source: the norm of the norms of its runs of
/// `run` elements (runs in parallel, each swept in order).
pub(super) fn chunked_norms(
    sources: &[&Source],
    n: usize,
    run: usize,
    progress: &Progress,
) -> Result<Vec<f64>> {
    let per_run: Vec<Vec<f32>> = (0..n.div_ceil(run))
        .into_par_iter()
        .map(|r| {
            let (first, len) = (r * run, run.min(n - r * run));
            let mut norms = vec![LaneNorm::new(len); sources.len()];
            for start in (first..first + len).step_by(BLOCK) {
                progress.check()?;
                with_block(sources, start, BLOCK.min(first + len - start), |v| {
                    for (norm, x) in norms.iter_mut().zip(v) {
                        norm.add(x.iter().map(|x| *x as f32));
                    }
                });
            }
            Ok(norms.iter().map(LaneNorm::finish).collect())
        })
        .collect::<Result<_>>()?;
    Ok((0..sources.len())
        .map(|i| {
            let mut total = LaneNorm::new(per_run.len());
            total.add(per_run.iter().map(|norms| norms[i]));
            f64::from(total.finish())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::LaneNorm;

    #[test]
    fn lanes_then_tail_in_torch_order() {
        let values: Vec<f32> = (0..19).map(|v| 1.0 + v as f32 / 3.0).collect();
        let mut norm = LaneNorm::new(values.len());
        norm.add(values[..5].iter().copied());
        norm.add(values[5..].iter().copied());
        let mut lanes = [0f32; 8];
        for (e, v) in values[..16].iter().enumerate() {
            lanes[e % 8] = v.mul_add(*v, lanes[e % 8]);
        }
        let mut sum = lanes.iter().skip(1).fold(lanes[0], |s, l| s + l);
        for v in &values[16..] {
            sum = v.mul_add(*v, sum);
        }
        assert_eq!(norm.finish(), sum.sqrt());
    }
}

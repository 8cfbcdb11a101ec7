//! mergekit's `karcher` in a half working dtype (`dtype: bfloat16`, `float16`): every torch step of
//! mergekit's iteration in its order, each result rounded as torch stores it, so the output has
//! mergekit's bits.
//!
//! Each iteration's mean direction is defined element by element from the previous one through
//! rounded steps, so it is held (one f32 per element of the tensor being merged, freed with it),
//! and so is the tangent. Each iteration sweeps the inputs twice (the dots with every unit vector,
//! then the tangent and its norm) and steps the mean in memory. The norms are torch's float32 2-norms of the tensor
//! as float32; the dots are torch's reduced-precision `dot` ([`HalfDot`]); a float32 scalar times a
//! half tensor is first rounded to the half type, as torch casts a CPU scalar that comes first.
//!
//! With `dtype: float32` mergekit's `torch.dot` goes through the BLAS library (MKL's `sdot` in
//! torch's wheels), whose order is not published: where MKL is loaded ([`Trig::dot`]) the unit
//! vectors are held too and MKL takes the dots, as in torch; otherwise float32, like float64,
//! keeps the exact coefficients of `spherical.rs`.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::job::{Compute, MergeJob};
use crate::merge::engine::source::{sweep_in_order, Resolved};
use crate::merge::torch::float32::LaneNorm;
use crate::merge::torch::half_ops::{Bf16Rounding, F16Rounding, Half, NoRounding, Rounding};
use crate::merge::torch::trig::Trig;

/// Whether this module takes the merge: karcher in a half working dtype, or in float32 with
/// MKL's `sdot` at hand.
pub(crate) fn applies(job: &MergeJob) -> bool {
    job.compute.half().is_some() || (job.compute == Compute::Float32 && job.trig.has_dot())
}

/// torch's dot product of two contiguous half vectors on the CPU (`dot_with_fp32_arith`): whole
/// blocks of 64 fused-multiply-added into eight 8-lane float32 registers (register r takes the
/// block's elements 8r..8r+8), the registers added pairwise as a tree and the lanes reduced as
/// AVX2's `vec_reduce_all` does; then whole vectors of 16 into one more register, reduced the same
/// way and added; then the last `len % 16` products fused-added one by one.
#[derive(Debug, Clone)]
pub(super) struct HalfDot {
    blocks: usize,
    vectors: usize,
    registers: [[f32; 8]; 8],
    tail: [f32; 8],
    rest: Vec<(f32, f32)>,
    seen: usize,
}

/// AVX2's `vec_reduce_all` of eight lanes: halves added, then pairs, then neighbours.
fn reduce_lanes(l: &[f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (a[0] + a[2]) + (a[1] + a[3])
}

impl HalfDot {
    pub(super) fn new(len: usize) -> Self {
        HalfDot {
            blocks: len & !63,
            vectors: len & !15,
            registers: [[0.0; 8]; 8],
            tail: [0.0; 8],
            rest: Vec::new(),
            seen: 0,
        }
    }

    /// Adds the next pairs of elements, in order (`xs[i]·ys[i]`).
    pub(super) fn add_all(&mut self, xs: &[f32], ys: &[f32]) {
        add_pairs(self, xs, ys);
    }

    /// Adds the next pair of elements, in order.
    #[inline(always)]
    pub(super) fn add(&mut self, x: f32, y: f32) {
        let p = self.seen;
        self.seen += 1;
        if p < self.blocks {
            let slot = &mut self.registers[(p % 64) / 8][p % 8];
            *slot = x.mul_add(y, *slot);
        } else if p < self.vectors {
            let slot = &mut self.tail[p % 8];
            *slot = x.mul_add(y, *slot);
        } else {
            self.rest.push((x, y));
        }
    }

    pub(super) fn finish(&self) -> f32 {
        let mut r = self.registers;
        for offset in [4, 2, 1] {
            let (low, high) = r.split_at_mut(offset);
            for (into, from) in low.iter_mut().zip(high.iter()) {
                into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
            }
        }
        let mut sum = reduce_lanes(&r[0]);
        sum += reduce_lanes(&self.tail);
        for (x, y) in &self.rest {
            sum = x.mul_add(*y, sum);
        }
        sum
    }
}

/// [`HalfDot::add`] over slices, compiled with FMA where the CPU has it (else `mul_add` is a
/// library call per element).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn add_pairs(dot: &mut HalfDot, xs: &[f32], ys: &[f32]) {
    xs.iter().zip(ys).for_each(|(&x, &y)| dot.add(x, y));
}

/// What the merged tensor is.
#[derive(Debug)]
enum Output {
    /// One input: mergekit returns it.
    Input,
    /// No input's norm is above `tol`: zeros.
    Zero,
    /// `scale` times the mean direction.
    Mean { scale: f32, mean: Vec<f32> },
}

/// The merged tensor of one karcher merge.
#[derive(Debug)]
pub(crate) struct Karcher {
    /// The working dtype's half type (float32 when none).
    half: Option<Half>,
    output: Output,
}

impl Karcher {
    /// The merged values of the block of elements `first..` in `out`.
    pub(crate) fn block(&self, first: usize, inputs: &[&[f64]], out: &mut [f64]) {
        match &self.output {
            Output::Input => out.copy_from_slice(&inputs[0][..out.len()]),
            Output::Zero => out.fill(0.0),
            Output::Mean { scale, mean } => {
                for (slot, m) in out.iter_mut().zip(&mean[first..]) {
                    *slot = f64::from(self.half.map_or(scale * m, |h| h.round(scale * m)));
                }
            }
        }
    }
}

/// One unit vector's step of an iteration: its dot with the mean, and its tangent factor
/// alpha·θ/sin θ (both as the half type holds them).
#[derive(Debug, Clone, Copy)]
struct Pull {
    model: usize,
    dot: f32,
    factor: f32,
}

/// Runs mergekit's `karcher_merge_tensors` over the tensor's inputs (uniform alphas).
pub(crate) fn measure(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<Karcher> {
    let half = job.compute.half();
    let output = match half {
        Some(Half::Bf16) => iterate::<Bf16Rounding>(job, tensor, progress)?,
        Some(Half::F16) => iterate::<F16Rounding>(job, tensor, progress)?,
        None => iterate::<NoRounding>(job, tensor, progress)?,
    };
    Ok(Karcher { half, output })
}

/// Elements per parallel chunk of a block's elementwise steps.
const CHUNK: usize = 4096;

/// `out[e] = value(e)` for a block, in parallel: the elementwise steps are independent, only the
/// reductions that follow need torch's order.
fn fill(out: &mut [f32], value: impl Fn(usize) -> f32 + Sync) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        chunk.iter_mut().enumerate().for_each(|(i, slot)| *slot = value(c * CHUNK + i));
    });
}

/// Sweeps the tensor's blocks in order; for each, `values` fills a buffer of `width` values per
/// element from the inputs and the block of `mean` (in parallel), then `reduce` takes the block
/// of `mean` (to update it) and the buffer, in order.
fn sweep_values(
    tensor: &Resolved,
    progress: &Progress,
    width: usize,
    mean: &mut [f32],
    values: impl Fn(&[&[f64]], &[f32], &mut [f32]) + Sync,
    mut reduce: impl FnMut(&mut [f32], &[f32]),
) -> Result<()> {
    let mut buffer = Vec::new();
    sweep_in_order(tensor, progress, |first, _, inputs| {
        let block = &mut mean[first..first + inputs[0].len()];
        buffer.resize(width * block.len(), 0.0);
        values(inputs, block, &mut buffer);
        reduce(block, &buffer);
    })
}

fn iterate<R: Rounding>(job: &MergeJob, tensor: &Resolved, progress: &Progress) -> Result<Output> {
    let h = R::round;
    let k = tensor.inputs.len();
    if k == 1 {
        return Ok(Output::Input);
    }
    let n = tensor.numel;
    let tol = job.spherical.tol;
    let alpha = 1.0 / k as f64;
    // 1. Each input's float32 norm (not rounded: mergekit keeps it a float32 tensor).
    let mut norms = vec![LaneNorm::new(n); k];
    sweep_in_order(tensor, progress, |_, _, inputs| {
        for e in 0..inputs[0].len() {
            norms.iter_mut().zip(inputs).for_each(|(norm, x)| norm.add([x[e] as f32]));
        }
    })?;
    let norms: Vec<f32> = norms.iter().map(LaneNorm::finish).collect();
    let valid: Vec<usize> = (0..k).filter(|&i| f64::from(norms[i]) > tol).collect();
    if valid.is_empty() {
        return Ok(Output::Zero);
    }
    // Python floats: the valid alphas renormalised in float64, then float32 against a tensor.
    let alpha_sum: f64 = valid.iter().map(|_| alpha).sum();
    let alphas: Vec<f32> = valid.iter().map(|_| (alpha / alpha_sum) as f32).collect();
    let unit = |i: usize, x: f64| h(x as f32 / norms[i]);
    // float32: the angles are torch's float32 ones, and MKL takes the dots over the held units.
    let float32 = job.compute.half().is_none();
    let angles = if float32 { job.trig.clone() } else { Trig::Libm };
    let mut held: Vec<Vec<f32>> = Vec::new();
    if float32 {
        held = valid.iter().map(|_| vec![0.0f32; n]).collect();
        sweep_in_order(tensor, progress, |first, _, inputs| {
            for (units, &i) in held.iter_mut().zip(&valid) {
                let block = &mut units[first..first + inputs[0].len()];
                block.iter_mut().zip(inputs[i]).for_each(|(u, &x)| *u = unit(i, x));
            }
        })?;
    }
    // 2. The alpha-weighted sum of the unit vectors, normalised (or the first unit vector).
    let mut mean = vec![0.0f32; n];
    let mut mean_norm = LaneNorm::new(n);
    let weighted = |inputs: &[&[f64]], _: &[f32], out: &mut [f32]| {
        fill(out, |e| valid.iter().zip(&alphas).fold(0.0, |m, (&i, a)| h(m + h(unit(i, inputs[i][e]) * a))));
    };
    sweep_values(tensor, progress, 1, &mut mean, weighted, |block, values| {
        block.copy_from_slice(values);
        mean_norm.add(values.iter().copied());
    })?;
    let mean_norm = mean_norm.finish();
    if f64::from(mean_norm) < tol {
        let first_unit = |inputs: &[&[f64]], _: &[f32], out: &mut [f32]| {
            fill(out, |e| unit(valid[0], inputs[valid[0]][e]));
        };
        sweep_values(tensor, progress, 1, &mut mean, first_unit, |block, values| {
            block.copy_from_slice(values)
        })?;
    } else {
        mean.par_iter_mut().for_each(|m| *m = h(*m / mean_norm));
    }
    let mut tangent_buffer: Vec<f32> = Vec::with_capacity(n);
    for _ in 0..job.spherical.max_iter {
        // a. Each unit vector's dot with the mean (units laid out model by model per block).
        let dots: Vec<f32> = if float32 {
            held.iter().map(|units| angles.dot(&mean, units).expect("karcher::applies")).collect()
        } else {
            let mut dots = vec![HalfDot::new(n); valid.len()];
            let units = |inputs: &[&[f64]], _: &[f32], out: &mut [f32]| {
                let len = inputs[0].len();
                for (j, &i) in valid.iter().enumerate() {
                    fill(&mut out[j * len..(j + 1) * len], |e| unit(i, inputs[i][e]));
                }
            };
            sweep_values(tensor, progress, valid.len(), &mut mean, units, |block, values| {
                for (dot, units) in dots.iter_mut().zip(values.chunks_exact(block.len())) {
                    dot.add_all(block, units);
                }
            })?;
            dots.iter().map(HalfDot::finish).collect()
        };
        let mut pulls = Vec::with_capacity(valid.len());
        for ((dot, &model), a) in dots.iter().zip(&valid).zip(&alphas) {
            let dot = h(*dot).clamp(-1.0, 1.0);
            let theta = h(angles.acos(dot));
            if f64::from(theta) < tol {
                continue;
            }
            let factor = h(h(theta / h(angles.sin(theta))) * a);
            pulls.push(Pull { model, dot, factor });
        }
        // The tangent at element e: Σ factor·(unit − dot·mean), accumulated in the half type.
        let tangent = |inputs: &[&[f64]], e: usize, m: f32| {
            pulls
                .iter()
                .fold(0.0, |t, p| h(t + h(p.factor * h(unit(p.model, inputs[p.model][e]) - h(p.dot * m)))))
        };
        // b. The tangent (held: the step needs it whole once its norm is known) and its f32 norm.
        let mut tangent_norm = LaneNorm::new(n);
        let tangents = |inputs: &[&[f64]], block: &[f32], out: &mut [f32]| {
            fill(out, |e| tangent(inputs, e, block[e]));
        };
        let mut held_tangent = std::mem::take(&mut tangent_buffer);
        held_tangent.clear();
        sweep_values(tensor, progress, 1, &mut mean, tangents, |_, values| {
            held_tangent.extend_from_slice(values);
            tangent_norm.add(values.iter().copied())
        })?;
        tangent_buffer = held_tangent;
        let tangent_norm = tangent_norm.finish();
        if f64::from(tangent_norm) < tol {
            break;
        }
        // c. The step along the tangent, in memory, then the new mean's norm (in order).
        // The tangent's norm is a float32 tensor: its cosine and sine are torch's float32 ones.
        let (cos, sin) = (h(job.trig.cos(tangent_norm)), h(job.trig.sin(tangent_norm)));
        mean.par_chunks_mut(CHUNK).zip(tangent_buffer.par_chunks(CHUNK)).for_each(|(means, tangents)| {
            for (m, &t) in means.iter_mut().zip(tangents) {
                *m = h(h(cos * *m) + h(sin * h(t / tangent_norm)));
            }
        });
        let mut unit_norm = LaneNorm::new(n);
        unit_norm.add(mean.iter().copied());
        let unit_norm = unit_norm.finish();
        if f64::from(unit_norm) > tol {
            mean.par_iter_mut().for_each(|m| *m = h(*m / unit_norm));
        }
    }
    // Σ alpha·norm over every input, a float32 tensor, rounded to the half type by the product.
    let scale = norms.iter().fold(0.0f32, |s, norm| s + alpha as f32 * norm);
    Ok(Output::Mean { scale: h(scale), mean })
}

#[cfg(test)]
mod tests {
    use super::HalfDot;

    /// Where order matters: x has 1e8 first, −1e8 at 64 and ones elsewhere (83 values, y = 1).
    /// The first block's 63 ones meet 1e8 in the register tree as 1, 2 and 4 (absorbed, ties to
    /// even) and then in the lanes as 8 + 16 + 32: 100000056. The tail vector's −1e8 absorbs its
    /// 1 and 2 and ends −99999992 after the lanes' 8. Their sum, 64, then takes the last three ones.
    /// (In order the sum is 18; exactly it is 81.)
    #[test]
    fn dot_blocks_registers_then_tail() {
        let x: Vec<f32> = (0..83)
            .map(|i| {
                if i == 0 {
                    1e8
                } else if i == 64 {
                    -1e8
                } else {
                    1.0
                }
            })
            .collect();
        let mut dot = HalfDot::new(x.len());
        dot.add_all(&x[..40], &[1.0; 40]);
        x[40..].iter().for_each(|&v| dot.add(v, 1.0));
        assert_eq!(dot.finish(), 67.0);
    }
}

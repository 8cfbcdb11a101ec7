//! mergekit's `nuslerp` in its working dtype (`dtype: float32`, `bfloat16`, `float16`): each step
//! of mergekit's function in its order, each result rounded as torch stores it and each reduction
//! in torch's order, so the output has mergekit's bits.
//!
//! The interpolation runs over the flattened tensor (`nuslerp_flatten`, the default) or over each
//! row along the last axis. Two sequential sweeps take each run's reductions (the two vectors'
//! norms, then their unit vectors' dot product); the output pass applies the run's factors.
//! `nuslerp_row_wise` on a matrix (vectors along its first axis, which torch reduces strided) is
//! left to the float64 factors of `statistics.rs`.

use super::float32::{torch_threads, LaneNorm, TorchSum};
use super::half_ops::Half;
use super::source::sweep_in_order;
use super::{Compute, MergeJob, Resolved};
use crate::error::Result;
use crate::progress::Progress;

/// One run's factors: out = (s0·v0 + s1·v1) / sin θ, or the lerp where the vectors are colinear.
#[derive(Debug, Clone, Copy)]
struct Run {
    s0: f32,
    s1: f32,
    sin_theta: f32,
    colinear: bool,
}

/// The factors of every run of one tensor.
pub(super) struct Nuslerp {
    half: Option<Half>,
    /// 1 − t and t as torch multiplies a tensor by a Python float (in float32).
    one_minus_t: f32,
    t: f32,
    /// Elements per run: the whole tensor when flattened, else a row.
    run: usize,
    runs: Vec<Run>,
}

/// Whether this module takes the tensor: any flattened one, and rows along the last axis (a
/// vector's own axis when row-wise on a 1-D tensor).
pub(super) fn applies(job: &MergeJob, tensor: &Resolved) -> bool {
    job.compute != Compute::Float64
        && (job.spherical.flatten || !job.spherical.row_wise || tensor.shape.len() < 2)
}

impl Nuslerp {
    fn h(&self, v: f32) -> f32 {
        self.half.map_or(v, |h| h.round(v))
    }

    /// The two vectors (task vectors with a base) at element `e` of a block.
    fn vectors(&self, base: Option<&[f64]>, inputs: &[&[f64]], e: usize) -> [f32; 2] {
        match base {
            Some(z) => [0, 1].map(|i| self.h(inputs[i][e] as f32 - z[e] as f32)),
            None => [0, 1].map(|i| inputs[i][e] as f32),
        }
    }

    /// The merged values of the block of elements `first..` in `out`.
    pub(super) fn block(&self, first: usize, base: Option<&[f64]>, inputs: &[&[f64]], out: &mut [f64]) {
        let h = |v: f32| self.h(v);
        for (e, slot) in out.iter_mut().enumerate() {
            let [v0, v1] = self.vectors(base, inputs, e);
            let run = self.runs[(first + e) / self.run];
            let merged = if run.colinear {
                h(h(self.one_minus_t * v0) + h(self.t * v1))
            } else {
                h(h(h(run.s0 * v0) + h(run.s1 * v1)) / run.sin_theta)
            };
            *slot = f64::from(base.map_or(merged, |z| h(z[e] as f32 + merged)));
        }
    }
}

/// Sweeps the tensor's blocks in order, handing `visit` each element's index and two vectors.
fn sweep(
    tensor: &Resolved,
    state: &Nuslerp,
    progress: &Progress,
    mut visit: impl FnMut(usize, [f32; 2]),
) -> Result<()> {
    sweep_in_order(tensor, progress, |first, base, inputs| {
        for e in 0..inputs[0].len() {
            visit(first + e, state.vectors(base, inputs, e));
        }
    })
}

/// Takes the factors of every run of one tensor (mergekit's `nuslerp` with the two `weights`).
pub(super) fn measure(
    job: &MergeJob,
    tensor: &Resolved,
    weights: &[f64],
    progress: &Progress,
) -> Result<Nuslerp> {
    let half = job.compute.half();
    let h = |v: f32| half.map_or(v, |h| h.round(v));
    let total = weights[0] + weights[1];
    let t = if total.abs() < 1e-6 { 0.5 } else { weights[1] / total };
    let n = tensor.numel;
    let run = if job.spherical.flatten || tensor.shape.len() < 2 {
        n
    } else {
        tensor.shape.last().copied().unwrap_or(1).max(1)
    };
    let count = n / run;
    let mut state =
        Nuslerp { half, one_minus_t: (1.0 - t) as f32, t: t as f32, run, runs: Vec::with_capacity(count) };
    // 1. Each run's two norms (torch's last-dim 2-norm), clamped below at 1e-7 (as the dtype holds it).
    let floor = h(1e-7);
    let mut norms: Vec<[f32; 2]> = Vec::with_capacity(count);
    let mut current = [LaneNorm::for_dtype(run, half), LaneNorm::for_dtype(run, half)];
    sweep(tensor, &state, progress, |g, v| {
        current.iter_mut().zip(v).for_each(|(norm, x)| norm.add([x]));
        if (g + 1) % run == 0 {
            norms.push(current.clone().map(|norm| h(norm.finish()).max(floor)));
            current = [LaneNorm::for_dtype(run, half), LaneNorm::for_dtype(run, half)];
        }
    })?;
    // 2. Each run's cosine: torch's sum of the unit vectors' products along the run (split over
    //    torch's threads when the run is the whole reduction).
    let threads = if count == 1 { torch_threads() } else { 1 };
    let mut cosines: Vec<f32> = Vec::with_capacity(count);
    let mut sum = TorchSum::new(run, threads);
    sweep(tensor, &state, progress, |g, [v0, v1]| {
        let [n0, n1] = norms[g / run];
        sum.add([h(h(v0 / n0) * h(v1 / n1))]);
        if (g + 1) % run == 0 {
            cosines.push(h(sum.finish()).clamp(-1.0, 1.0));
            sum = TorchSum::new(run, threads);
        }
    })?;
    // The factors, each step rounded to the dtype (the scalars are Python floats: float32).
    let tolerance = h(1e-16);
    for cos in cosines {
        let colinear = h(1.0 - h(cos * cos)) <= tolerance;
        let theta = h(if colinear { 0.0f32 } else { cos }.acos());
        state.runs.push(Run {
            s0: h(h(state.one_minus_t * theta).sin()),
            s1: h(h(state.t * theta).sin()),
            sin_theta: h(theta.sin()),
            colinear,
        });
    }
    Ok(state)
}

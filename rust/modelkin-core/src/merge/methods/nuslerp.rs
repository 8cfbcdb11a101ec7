//! mergekit's `nuslerp` in its working dtype (`dtype: float32`, `bfloat16`, `float16`): each step
//! of mergekit's function in its order, each result rounded as torch stores it and each reduction
//! in torch's order, so the output has mergekit's bits.
//!
//! The interpolation runs over the flattened tensor (`nuslerp_flatten`, the default), over each
//! row along the last axis, or (`nuslerp_row_wise`) over each column of a matrix. Two sequential
//! sweeps take each run's reductions (the two vectors' norms, then their unit vectors' dot
//! product); the output pass applies the run's factors. A column's norm is torch's generic strided
//! reduction (squares added row after row in float32) and its dot product torch's outer sum
//! ([`OuterSum`]). Row-wise on tensors of three or more axes the vectors run along the first axis
//! too: the columns of the tensor seen as a (first axis, the rest) matrix.

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::job::{Compute, MergeJob};
use crate::merge::engine::source::{sweep_in_order, Resolved};
use crate::merge::torch::float32::{LaneNorm, TorchSum};
use crate::merge::torch::half_ops::Half;
use crate::merge::torch::outer_sum::OuterSum;
use crate::merge::torch::threads::torch_threads;
use crate::merge::torch::trig::Trig;

/// One run's factors: out = (s0·v0 + s1·v1) / sin θ, or the lerp where the vectors are colinear.
#[derive(Debug, Clone, Copy)]
struct Run {
    s0: f32,
    s1: f32,
    sin_theta: f32,
    colinear: bool,
}

/// How a tensor's elements fall into runs.
#[derive(Debug, Clone, Copy)]
enum Runs {
    /// Consecutive runs of this many elements: the whole tensor when flattened, else a row.
    Consecutive(usize),
    /// The columns of a row-major matrix with this many columns (element e is in column e % cols).
    Columns(usize),
}

/// The factors of every run of one tensor.
pub(crate) struct Nuslerp {
    half: Option<Half>,
    /// 1 − t and t as torch multiplies a tensor by a Python float (in float32).
    one_minus_t: f32,
    t: f32,
    layout: Runs,
    runs: Vec<Run>,
}

/// Whether this module takes the tensor: every one in a working dtype (flattened, rows along the
/// last axis, or row-wise vectors along the first axis); float64 takes the exact factors.
pub(crate) fn applies(job: &MergeJob) -> bool {
    job.compute != Compute::Float64
}

impl Runs {
    fn of(job: &MergeJob, tensor: &Resolved) -> Runs {
        let n = tensor.numel;
        match tensor.shape.as_slice() {
            _ if job.spherical.flatten => Runs::Consecutive(n),
            [] | [_] => Runs::Consecutive(n),
            // One column is one contiguous run, which torch reduces as such.
            [_, 1] if job.spherical.row_wise => Runs::Consecutive(n),
            [_, cols] if job.spherical.row_wise => Runs::Columns(*cols),
            // Row-wise on three or more axes: mergekit moves axis 0 last (a transposed view), and
            // torch's reductions coalesce the other axes, which are contiguous in memory, into
            // one: the vectors are the columns of the tensor seen as (first axis, the rest).
            [first, ..] if job.spherical.row_wise => match n / (*first).max(1) {
                1 => Runs::Consecutive(n),
                rest => Runs::Columns(rest),
            },
            [.., last] => Runs::Consecutive((*last).max(1)),
        }
    }

    /// The run element `g` of the tensor belongs to.
    fn index(self, g: usize) -> usize {
        match self {
            Runs::Consecutive(run) => g / run,
            Runs::Columns(cols) => g % cols,
        }
    }
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
    pub(crate) fn block(&self, first: usize, base: Option<&[f64]>, inputs: &[&[f64]], out: &mut [f64]) {
        let h = |v: f32| self.h(v);
        for (e, slot) in out.iter_mut().enumerate() {
            let [v0, v1] = self.vectors(base, inputs, e);
            let run = self.runs[self.layout.index(first + e)];
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
pub(crate) fn measure(
    job: &MergeJob,
    tensor: &Resolved,
    weights: &[f64],
    progress: &Progress,
) -> Result<Nuslerp> {
    let half = job.compute.half();
    let h = |v: f32| half.map_or(v, |h| h.round(v));
    let total = weights[0] + weights[1];
    let t = if total.abs() < 1e-6 { 0.5 } else { weights[1] / total };
    let layout = Runs::of(job, tensor);
    let mut state = Nuslerp { half, one_minus_t: (1.0 - t) as f32, t: t as f32, layout, runs: Vec::new() };
    let cosines = match layout {
        Runs::Consecutive(run) => consecutive_cosines(tensor, &state, run, progress)?,
        Runs::Columns(cols) => column_cosines(tensor, &state, cols, progress)?,
    };
    // The factors, each step rounded to the dtype (the scalars are Python floats: float32). torch
    // takes float32 angles from MKL where it was built with it (`job.trig`); a half dtype's own.
    let trig = if half.is_none() { job.trig.clone() } else { Trig::Libm };
    let tolerance = h(1e-16);
    state.runs.reserve(cosines.len());
    for cos in cosines {
        let colinear = h(1.0 - h(cos * cos)) <= tolerance;
        let theta = h(trig.acos(if colinear { 0.0f32 } else { cos }));
        state.runs.push(Run {
            s0: h(trig.sin(h(state.one_minus_t * theta))),
            s1: h(trig.sin(h(state.t * theta))),
            sin_theta: h(trig.sin(theta)),
            colinear,
        });
    }
    Ok(state)
}

/// The clamped norms floor: 1e-7 as the dtype holds it.
fn norm_floor(state: &Nuslerp) -> f32 {
    state.h(1e-7)
}

/// Each consecutive run's cosine: torch's last-dim 2-norms, then torch's sum of the unit vectors'
/// products along the run (split over torch's threads when the run is the whole reduction).
fn consecutive_cosines(
    tensor: &Resolved,
    state: &Nuslerp,
    run: usize,
    progress: &Progress,
) -> Result<Vec<f32>> {
    let (half, h) = (state.half, |v: f32| state.h(v));
    let count = tensor.numel / run;
    let floor = norm_floor(state);
    let mut norms: Vec<[f32; 2]> = Vec::with_capacity(count);
    let mut current = [LaneNorm::for_dtype(run, half), LaneNorm::for_dtype(run, half)];
    sweep(tensor, state, progress, |g, v| {
        current.iter_mut().zip(v).for_each(|(norm, x)| norm.add([x]));
        if (g + 1) % run == 0 {
            norms.push(current.clone().map(|norm| h(norm.finish()).max(floor)));
            current = [LaneNorm::for_dtype(run, half), LaneNorm::for_dtype(run, half)];
        }
    })?;
    let threads = if count == 1 { torch_threads() } else { 1 };
    let mut cosines: Vec<f32> = Vec::with_capacity(count);
    let mut sum = TorchSum::new(run, threads);
    sweep(tensor, state, progress, |g, [v0, v1]| {
        let [n0, n1] = norms[g / run];
        sum.add([h(h(v0 / n0) * h(v1 / n1))]);
        if (g + 1) % run == 0 {
            cosines.push(h(sum.finish()).clamp(-1.0, 1.0));
            sum = TorchSum::new(run, threads);
        }
    })?;
    Ok(cosines)
}

/// Each column's cosine: torch's strided 2-norm (`NormTwoOps`: the squares added row after row in
/// float32, serially whatever the thread count), then its outer sum of the unit vectors' products.
fn column_cosines(tensor: &Resolved, state: &Nuslerp, cols: usize, progress: &Progress) -> Result<Vec<f32>> {
    let h = |v: f32| state.h(v);
    let floor = norm_floor(state);
    let mut squares = vec![[0.0f32; 2]; cols];
    sweep(tensor, state, progress, |g, v| {
        let acc = &mut squares[g % cols];
        acc.iter_mut().zip(v).for_each(|(a, x)| *a += x * x);
    })?;
    let norms: Vec<[f32; 2]> = squares.iter().map(|acc| acc.map(|a| h(a.sqrt()).max(floor))).collect();
    let vector = if state.half.is_some() { 16 } else { 8 };
    let mut sum = OuterSum::new(tensor.numel / cols, cols, vector);
    sweep(tensor, state, progress, |g, [v0, v1]| {
        let [n0, n1] = norms[g % cols];
        sum.add(h(h(v0 / n0) * h(v1 / n1)));
    })?;
    Ok(sum.finish().into_iter().map(|s| h(s).clamp(-1.0, 1.0)).collect())
}

//! mergekit's `multislerp` in its working dtype (`dtype: float32`, `bfloat16`, `float16`): every
//! torch step of mergekit's function in its order, each result rounded as torch stores it and each
//! reduction in torch's order, so the output has mergekit's bits.
//!
//! The steps need four whole-tensor reductions, each over values the previous ones define, so four
//! sequential sweeps take them before the output pass: the task vectors' norms; the norm of their
//! weighted mean direction; each unit vector's dot with that direction; the norm of the weighted
//! tangent. Each sweep recomputes the elementwise steps before it from the inputs, so nothing of
//! the tensor is held.

use crate::io::error::{Error, Result};
use crate::io::progress::Progress;
use crate::merge::engine::job::{Compute, MergeJob};
use crate::merge::engine::source::{sweep_in_order, Resolved};
use crate::merge::torch::float32::{row_sum, LaneNorm, TorchSum};
use crate::merge::torch::half_ops::Half;
use crate::merge::torch::trig::Trig;

/// The reductions of one tensor, taken in the working dtype.
pub(crate) struct Multislerp {
    half: Option<Half>,
    /// The weights as a tensor of the working dtype (normalised when asked).
    weights: Vec<f32>,
    /// ‖tvᵢ‖ + eps: each unit vector's divisor.
    divisors: Vec<f32>,
    /// ‖weighted mean of the unit vectors‖; `None` below eps, where two models are lerped.
    mean_norm: Option<f32>,
    /// Each unit vector's dot with the mean direction.
    dots: Vec<f32>,
    /// cos(‖tangent‖ + eps), and sin(‖tangent‖ + eps) / (‖tangent‖ + eps).
    exp_map: (f32, f32),
    /// Σ ‖tvᵢ‖·wᵢ: the output's norm.
    average_norm: f32,
}

impl Multislerp {
    /// Rounds an f32 result to the working dtype.
    fn h(&self, v: f32) -> f32 {
        self.half.map_or(v, |h| h.round(v))
    }

    /// The task vectors (the models, without a base) of element `e` of a block.
    fn vectors(&self, base: Option<&[f64]>, inputs: &[&[f64]], e: usize, out: &mut Vec<f32>) {
        out.clear();
        match base {
            Some(z) => out.extend(inputs.iter().map(|x| self.h(x[e] as f32 - z[e] as f32))),
            None => out.extend(inputs.iter().map(|x| x[e] as f32)),
        }
    }

    /// Unit vectors in place, and the (unnormalised) weighted mean of them.
    fn units_and_mean(&self, vectors: &mut [f32]) -> f32 {
        for (x, d) in vectors.iter_mut().zip(&self.divisors) {
            *x = self.h(*x / d);
        }
        self.h(row_sum(vectors.iter().zip(&self.weights).map(|(u, w)| self.h(u * w))))
    }

    /// The weighted tangent of element e from its unit vectors and the mean direction.
    fn tangent(&self, units: &[f32], mean: f32) -> f32 {
        let products = units
            .iter()
            .zip(&self.dots)
            .zip(&self.weights)
            .map(|((u, dot), w)| self.h(self.h(u - self.h(dot * mean)) * w));
        self.h(row_sum(products))
    }

    /// The merged values of a block, in `out`.
    pub(crate) fn block(&self, base: Option<&[f64]>, inputs: &[&[f64]], out: &mut [f64]) {
        let mut vectors = Vec::new();
        for (e, slot) in out.iter_mut().enumerate() {
            self.vectors(base, inputs, e, &mut vectors);
            let merged = match self.mean_norm {
                None => {
                    // mergekit's fallback for two models whose mean direction vanishes: a lerp.
                    self.h(self.h(vectors[0] * self.weights[0]) + self.h(vectors[1] * self.weights[1]))
                }
                Some(mean_norm) => {
                    let mean = self.h(self.units_and_mean(&mut vectors) / mean_norm);
                    let tangent = self.tangent(&vectors, mean);
                    let (cos, sin_over) = self.exp_map;
                    let point = self.h(self.h(mean * cos) + self.h(tangent * sin_over));
                    self.h(point * self.average_norm)
                }
            };
            *slot = f64::from(base.map_or(merged, |z| self.h(merged + z[e] as f32)));
        }
    }
}

/// Takes the reductions of one tensor (mergekit's `multislerp` with `weights` and its options).
pub(crate) fn measure(
    job: &MergeJob,
    tensor: &Resolved,
    weights: &[f64],
    progress: &Progress,
) -> Result<Multislerp> {
    debug_assert!(job.compute != Compute::Float64);
    let half = job.compute.half();
    let h = |v: f32| half.map_or(v, |h| h.round(v));
    // `eps`, a Python float: float32 in torch's arithmetic with a tensor.
    let eps = job.spherical.eps as f32;
    let n = tensor.numel;
    // torch.tensor(weights, dtype=...): each Python float rounded to the working dtype.
    let mut weights: Vec<f32> = weights.iter().map(|&w| h(w as f32)).collect();
    if job.spherical.normalize_weights {
        let total = h(row_sum(weights.iter().copied()));
        weights.iter_mut().for_each(|w| *w = h(*w / total));
    }
    let k = weights.len();
    let mut state = Multislerp {
        half,
        weights,
        divisors: vec![1.0; k],
        mean_norm: Some(1.0),
        dots: vec![0.0; k],
        exp_map: (1.0, 1.0),
        average_norm: 0.0,
    };
    let mut vectors = Vec::new();
    // 1. The task vectors' norms (torch's last-dim 2-norm of each row).
    let mut norms = vec![LaneNorm::for_dtype(n, half); k];
    sweep_in_order(tensor, progress, |_, base, inputs| {
        for e in 0..inputs[0].len() {
            state.vectors(base, inputs, e, &mut vectors);
            norms.iter_mut().zip(&vectors).for_each(|(norm, x)| norm.add([*x]));
        }
    })?;
    let norms: Vec<f32> = norms.iter().map(|norm| h(norm.finish())).collect();
    state.divisors = norms.iter().map(|norm| h(norm + eps)).collect();
    // 2. The norm of the weighted mean of the unit vectors.
    let mut mean_norm = LaneNorm::for_dtype(n, half);
    sweep_in_order(tensor, progress, |_, base, inputs| {
        for e in 0..inputs[0].len() {
            state.vectors(base, inputs, e, &mut vectors);
            mean_norm.add([state.units_and_mean(&mut vectors)]);
        }
    })?;
    let mean_norm = h(mean_norm.finish());
    if mean_norm < eps {
        if k != 2 {
            return Err(Error::InvalidArgument(format!(
                "tensor '{}': the weighted sum of the input tensors is zero (antipodal models with \
                 balancing weights); try other weights",
                tensor.recipe.name
            )));
        }
        state.mean_norm = None;
        return Ok(state);
    }
    state.mean_norm = Some(mean_norm);
    // 3. Each unit vector's dot with the mean direction (torch's sum along each row).
    let mut dots = vec![TorchSum::new(n, 1); k];
    sweep_in_order(tensor, progress, |_, base, inputs| {
        for e in 0..inputs[0].len() {
            state.vectors(base, inputs, e, &mut vectors);
            let mean = h(state.units_and_mean(&mut vectors) / mean_norm);
            dots.iter_mut().zip(&vectors).for_each(|(dot, u)| dot.add([h(u * mean)]));
        }
    })?;
    state.dots = dots.iter().map(|dot| h(dot.finish())).collect();
    // 4. The norm of the weighted tangent, then the exponential map's factors.
    let mut tangent_norm = LaneNorm::for_dtype(n, half);
    sweep_in_order(tensor, progress, |_, base, inputs| {
        for e in 0..inputs[0].len() {
            state.vectors(base, inputs, e, &mut vectors);
            let mean = h(state.units_and_mean(&mut vectors) / mean_norm);
            tangent_norm.add([state.tangent(&vectors, mean)]);
        }
    })?;
    let theta = h(h(tangent_norm.finish()) + eps);
    // float32 angles are MKL's where torch was built with it (`job.trig`); a half dtype's its own.
    let trig = if half.is_none() { job.trig.clone() } else { Trig::Libm };
    state.exp_map = (h(trig.cos(theta)), h(h(trig.sin(theta)) / theta));
    state.average_norm = h(row_sum(norms.iter().zip(&state.weights).map(|(norm, w)| h(norm * w))));
    Ok(state)
}

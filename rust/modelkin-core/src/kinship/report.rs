//! What a kinship pass measured: per-tensor moments, tensors left out, and their merged total.

use crate::kinship::stats::{split_matrix, Metric, Mode, Moments};

/// The moments of one tensor's deltas (after the vocabulary row cut).
#[derive(Debug, Clone)]
pub struct TensorStats {
    /// Tensor name, as in the base model.
    pub name: String,
    /// Shape after the row cut.
    pub shape: Vec<usize>,
    /// Moments of the k deltas.
    pub moments: Moments,
}

/// A tensor left out of the pass, and why.
#[derive(Debug, Clone)]
pub struct SkippedTensor {
    /// Tensor name.
    pub name: String,
    /// One line saying why.
    pub reason: String,
}

/// Everything one pass measured: per-tensor moments and their merge.
#[derive(Debug, Clone)]
pub struct KinshipReport {
    /// Number of fine-tunes.
    pub k: usize,
    /// Per-tensor statistics, in reading order.
    pub tensors: Vec<TensorStats>,
    /// Tensors left out.
    pub skipped: Vec<SkippedTensor>,
    /// Moments of the concatenated deltas.
    pub total: Moments,
}

impl KinshipReport {
    /// Builds a report from per-tensor statistics (merging them in order, so the result does not
    /// depend on thread scheduling).
    pub fn new(k: usize, tensors: Vec<TensorStats>, skipped: Vec<SkippedTensor>) -> Self {
        let mut total = Moments::empty(k);
        for t in &tensors {
            total.merge(&t.moments);
        }
        KinshipReport { k, tensors, skipped, total }
    }

    /// The k×k matrix of a metric, row-major.
    pub fn matrix(&self, metric: Metric, mode: Mode) -> Vec<f64> {
        match mode {
            Mode::Full => self.total.matrix(metric),
            Mode::Split => split_matrix(self.tensors.iter().map(|t| &t.moments), self.k, metric),
        }
    }
}

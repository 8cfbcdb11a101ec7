//! Sufficient statistics of k delta vectors and the kinship metrics derived from them.
//!
//! Moments are kept centred (means and co-moments, merged with Chan et al.'s pairwise update)
//! because raw sums lose the Pearson correlation to cancellation when a delta has a large mean.

use crate::kinship::simd::LANES;

/// A kinship metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Pearson correlation of the deltas.
    Pcc,
    /// Signed cosine similarity of the deltas.
    Cs,
    /// Euclidean distance between the deltas.
    Ed,
}

impl Metric {
    /// All metrics, in display order.
    pub const ALL: [Metric; 3] = [Metric::Pcc, Metric::Cs, Metric::Ed];

    /// The short name used by the CLI and the original tool.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Pcc => "pcc",
            Metric::Cs => "cs",
            Metric::Ed => "ed",
        }
    }
}

/// How per-tensor statistics are combined into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All deltas concatenated into one vector per model.
    Full,
    /// The metric per tensor, averaged with element-count weights over tensors where it is defined.
    Split,
}

/// Centred first and second moments of k vectors of equal length, plus their pairwise squared
/// distances. Matrices are k×k, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// Number of elements per vector.
    pub n: u64,
    /// Mean of each vector.
    pub mean: Vec<f64>,
    /// Σ (xᵢ − x̄ᵢ)(xⱼ − x̄ⱼ).
    pub comoment: Vec<f64>,
    /// Σ (xᵢ − xⱼ)², accumulated directly rather than through the cancelling identity.
    pub sqdist: Vec<f64>,
}

impl Moments {
    /// The statistics of k empty vectors.
    pub fn empty(k: usize) -> Self {
        Moments { n: 0, mean: vec![0.0; k], comoment: vec![0.0; k * k], sqdist: vec![0.0; k * k] }
    }

    /// Number of vectors.
    pub fn k(&self) -> usize {
        self.mean.len()
    }

    /// Statistics of one chunk of two vectors from their raw sums
    /// [Σa, Σb, Σa², Σb², Σab, Σ(a − b)²] (see [`crate::kinship::kernel::pair_delta_sums`]).
    pub(crate) fn from_pair_sums(n: usize, sums: [f64; 6]) -> Self {
        let [sa, sb, saa, sbb, sab, sdd] = sums;
        let (ma, mb) = (sa / n as f64, sb / n as f64);
        let cab = sab - sa * mb;
        Moments {
            n: n as u64,
            mean: vec![ma, mb],
            // Clamped: rounding must not make a variance negative.
            comoment: vec![(saa - sa * ma).max(0.0), cab, cab, (sbb - sb * mb).max(0.0)],
            sqdist: vec![0.0, sdd, sdd, 0.0],
        }
    }

    /// Statistics of one chunk of k vectors from their raw sums Σxᵢ and Σxᵢxⱼ (a full symmetric
    /// k×k matrix). Distances come from Σ(xᵢ − xⱼ)² = Σxᵢ² + Σxⱼ² − 2Σxᵢxⱼ, which cancels when two
    /// vectors nearly coincide: see [`Moments::distance_may_have_cancelled`].
    pub(crate) fn from_raw_sums(n: usize, sums: &[f64], products: &[f64]) -> Self {
        let k = sums.len();
        let mean: Vec<f64> = sums.iter().map(|s| s / n as f64).collect();
        let mut moments = Moments { n: n as u64, mean, ..Moments::empty(k) };
        for i in 0..k {
            for j in 0..k {
                let idx = i * k + j;
                moments.comoment[idx] = products[idx] - sums[i] * moments.mean[j];
                if i != j {
                    moments.sqdist[idx] =
                        (products[i * k + i] + products[j * k + j] - 2.0 * products[idx]).max(0.0);
                }
            }
            // Clamped: rounding must not make a variance negative.
            moments.comoment[i * k + i] = moments.comoment[i * k + i].max(0.0);
        }
        moments
    }

    /// Whether the squared distance of pair (i, j), if it came from raw sums whose relative
    /// rounding error is at most `relative_error`, could be off by more than 1e-7 of itself.
    pub(crate) fn distance_may_have_cancelled(&self, i: usize, j: usize, relative_error: f64) -> bool {
        // The identity's error is at most relative_error · (Σxᵢ² + Σxⱼ² + 2|Σxᵢxⱼ|)
        // ≤ 2 · relative_error · (Σxᵢ² + Σxⱼ²).
        let bound = 2.0 * relative_error * (self.inner(i, i) + self.inner(j, j));
        bound > 1e-7 * self.sqdist[i * self.k() + j]
    }

    /// Replaces the squared distance of pair (i, j) with one measured directly.
    pub(crate) fn set_squared_distance(&mut self, i: usize, j: usize, value: f64) {
        let k = self.k();
        self.sqdist[i * k + j] = value;
        self.sqdist[j * k + i] = value;
    }

    /// Adds another sample of the same k vectors (Chan's parallel update).
    pub fn merge(&mut self, other: &Moments) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            self.clone_from(other);
            return;
        }
        let k = self.k();
        let (na, nb) = (self.n as f64, other.n as f64);
        let n = na + nb;
        let delta: Vec<f64> = (0..k).map(|i| other.mean[i] - self.mean[i]).collect();
        for i in 0..k {
            for j in 0..k {
                let idx = i * k + j;
                self.comoment[idx] += other.comoment[idx] + delta[i] * delta[j] * na * nb / n;
                self.sqdist[idx] += other.sqdist[idx];
            }
        }
        for (mean, d) in self.mean.iter_mut().zip(&delta) {
            *mean += d * nb / n;
        }
        self.n += other.n;
    }

    /// Σ xᵢ·xⱼ, the raw (uncentred) inner product.
    fn inner(&self, i: usize, j: usize) -> f64 {
        self.comoment[i * self.k() + j] + self.n as f64 * self.mean[i] * self.mean[j]
    }

    /// One metric for the pair (i, j); NaN where it is undefined (a zero-variance or zero delta).
    pub fn metric(&self, metric: Metric, i: usize, j: usize) -> f64 {
        let k = self.k();
        match metric {
            Metric::Pcc => {
                ratio(self.comoment[i * k + j], self.comoment[i * k + i] * self.comoment[j * k + j])
            }
            Metric::Cs => ratio(self.inner(i, j), self.inner(i, i) * self.inner(j, j)),
            Metric::Ed => self.sqdist[i * k + j].sqrt(),
        }
    }

    /// The k×k matrix of one metric.
    pub fn matrix(&self, metric: Metric) -> Vec<f64> {
        let k = self.k();
        (0..k * k).map(|idx| self.metric(metric, idx / k, idx % k)).collect()
    }
}

/// Worst relative rounding error of raw sums over a chunk of `len` elements: each of the
/// [`LANES`] partial sums adds len / LANES terms, then the lanes and the distance identity add a
/// few roundings more. See [`Moments::distance_may_have_cancelled`].
pub(crate) fn raw_sum_relative_error(len: usize) -> f64 {
    (len / LANES + LANES + 4) as f64 * f64::EPSILON / 2.0
}

fn ratio(numerator: f64, squared_denominator: f64) -> f64 {
    if squared_denominator > 0.0 && squared_denominator.is_finite() {
        numerator / squared_denominator.sqrt()
    } else {
        f64::NAN
    }
}

/// The element-count-weighted mean of a metric over tensors, skipping tensors where it is NaN.
pub fn split_matrix<'a>(
    tensors: impl IntoIterator<Item = &'a Moments>,
    k: usize,
    metric: Metric,
) -> Vec<f64> {
    let mut weighted = vec![0.0; k * k];
    let mut weights = vec![0.0; k * k];
    for moments in tensors {
        for (idx, value) in moments.matrix(metric).into_iter().enumerate() {
            if !value.is_nan() {
                weighted[idx] += value * moments.n as f64;
                weights[idx] += moments.n as f64;
            }
        }
    }
    weighted.iter().zip(&weights).map(|(w, n)| if *n > 0.0 { w / n } else { f64::NAN }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two-pass moments of one sample, plainly.
    fn moments_of(vectors: &[Vec<f64>]) -> Moments {
        let k = vectors.len();
        let n = vectors[0].len();
        let mean: Vec<f64> = vectors.iter().map(|v| v.iter().sum::<f64>() / n as f64).collect();
        let mut moments = Moments { n: n as u64, mean: mean.clone(), ..Moments::empty(k) };
        for i in 0..k {
            for j in 0..k {
                let (x, y) = (&vectors[i], &vectors[j]);
                moments.comoment[i * k + j] =
                    x.iter().zip(y).map(|(a, b)| (a - mean[i]) * (b - mean[j])).sum();
                if i != j {
                    moments.sqdist[i * k + j] = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
                }
            }
        }
        moments
    }

    #[test]
    fn merged_chunks_equal_the_whole() {
        let a: Vec<f64> = (0..100).map(|i| 1e3 + (i as f64 * 0.7).sin()).collect();
        let b: Vec<f64> = (0..100).map(|i| -2.0 + (i as f64 * 0.3).cos()).collect();
        let whole = moments_of(&[a.clone(), b.clone()]);
        let mut merged = moments_of(&[a[..37].to_vec(), b[..37].to_vec()]);
        merged.merge(&moments_of(&[a[37..].to_vec(), b[37..].to_vec()]));
        for m in Metric::ALL {
            let (x, y) = (whole.metric(m, 0, 1), merged.metric(m, 0, 1));
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{m:?}: {x} vs {y}");
        }
        let ed: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
        assert!((merged.metric(Metric::Ed, 0, 1) - ed).abs() < 1e-9);
    }

    #[test]
    fn zero_delta_is_undefined_for_correlations_but_not_distance() {
        let m = moments_of(&[vec![0.0; 8], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0]]);
        assert!(m.metric(Metric::Pcc, 0, 1).is_nan());
        assert!(m.metric(Metric::Cs, 0, 1).is_nan());
        assert!(m.metric(Metric::Ed, 0, 1) > 0.0);
    }
}

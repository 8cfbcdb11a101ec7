//! The spherical methods reduced to k-dimensional algebra: every vector they form lies in the span
//! of the inputs, so one Gram matrix (a single streamed pass) gives the exact coefficients of the
//! output as a combination of the inputs.

use crate::merge::engine::job::SphericalOptions;

fn at(gram: &[f64], k: usize, i: usize, j: usize) -> f64 {
    gram[i * k + j]
}

/// mergekit's nuslerp over the flattened tensors: t = w₁ / (w₀ + w₁), normalised vectors, lerp when
/// colinear. Returns the coefficients of the two vectors.
pub(crate) fn nuslerp(gram: &[f64], weights: &[f64]) -> Vec<f64> {
    let total = weights[0] + weights[1];
    let t = if total.abs() < 1e-6 { 0.5 } else { weights[1] / total };
    let norm = |i: usize| at(gram, 2, i, i).sqrt().max(1e-7);
    let cos = (at(gram, 2, 0, 1) / (norm(0) * norm(1))).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return vec![1.0 - t, t];
    }
    let theta = cos.acos();
    let sin = theta.sin();
    vec![((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin]
}

/// mergekit's multislerp: the weighted mean direction of the unit vectors, scaled by the weighted
/// mean norm. (Its tangent-space step sums projections that cancel exactly, so it is omitted.)
pub(crate) fn multislerp(
    gram: &[f64],
    weights: &[f64],
    options: &SphericalOptions,
) -> Result<Vec<f64>, String> {
    let k = weights.len();
    if k == 1 {
        return Ok(vec![1.0]);
    }
    let total: f64 = weights.iter().sum();
    let w: Vec<f64> =
        weights.iter().map(|x| if options.normalize_weights { x / total } else { *x }).collect();
    let norms: Vec<f64> = (0..k).map(|i| at(gram, k, i, i).sqrt()).collect();
    let unit = |i: usize| w[i] / (norms[i] + options.eps);
    let mean_norm = (0..k)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| unit(i) * unit(j) * at(gram, k, i, j))
        .sum::<f64>()
        .sqrt();
    if mean_norm < options.eps {
        if k == 2 {
            return Ok(w);
        }
        return Err("the weighted sum of the input directions is zero (antipodal inputs?)".to_string());
    }
    let scale: f64 = (0..k).map(|i| norms[i] * w[i]).sum();
    Ok((0..k).map(|i| unit(i) / mean_norm * scale).collect())
}

/// mergekit's karcher: the Riemannian mean of the unit directions (uniform weights), iterated in
/// the coordinates of the unit vectors, scaled by the mean norm.
pub(crate) fn karcher(gram: &[f64], options: &SphericalOptions) -> Vec<f64> {
    let k = (gram.len() as f64).sqrt() as usize;
    if k == 1 {
        return vec![1.0];
    }
    let tol = options.tol;
    let alpha = 1.0 / k as f64;
    let norms: Vec<f64> = (0..k).map(|i| at(gram, k, i, i).sqrt()).collect();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; k];
    }
    // Gram matrix of the unit vectors.
    let unit_dot = |i: usize, j: usize| at(gram, k, i, j) / (norms[i] * norms[j]);
    let quad = |c: &[f64]| -> f64 {
        (0..k)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .filter(|&(i, j)| c[i] != 0.0 && c[j] != 0.0)
            .map(|(i, j)| c[i] * c[j] * unit_dot(i, j))
            .sum::<f64>()
            .max(0.0)
            .sqrt()
    };
    let share = 1.0 / valid.len() as f64;
    let mut mean = vec![0.0; k];
    for &i in &valid {
        mean[i] = share;
    }
    let mean_norm = quad(&mean);
    if mean_norm < tol {
        mean = vec![0.0; k];
        mean[valid[0]] = 1.0;
    } else {
        mean.iter_mut().for_each(|c| *c /= mean_norm);
    }
    for _ in 0..options.max_iter {
        let mut tangent = vec![0.0; k];
        for &i in &valid {
            let dot =
                (0..k).map(|j| mean[j] * if mean[j] != 0.0 { unit_dot(j, i) } else { 0.0 }).sum::<f64>();
            let dot = dot.clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let factor = share * theta / theta.sin();
            tangent[i] += factor;
            for j in 0..k {
                tangent[j] -= factor * dot * mean[j];
            }
        }
        let tangent_norm = quad(&tangent);
        if tangent_norm < tol {
            break;
        }
        for j in 0..k {
            mean[j] = tangent_norm.cos() * mean[j] + tangent_norm.sin() * tangent[j] / tangent_norm;
        }
        let unit_norm = quad(&mean);
        if unit_norm > tol {
            mean.iter_mut().for_each(|c| *c /= unit_norm);
        }
    }
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    (0..k).map(|j| if norms[j] > 0.0 { scale * mean[j] / norms[j] } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::{karcher, multislerp, nuslerp};
    use crate::merge::engine::job::SphericalOptions;

    /// The Gram matrix of vectors given by their coordinates.
    fn gram(vectors: &[&[f64]]) -> Vec<f64> {
        let k = vectors.len();
        let mut g = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                g[i * k + j] = vectors[i].iter().zip(vectors[j]).map(|(a, b)| a * b).sum();
            }
        }
        g
    }

    fn combine(coefficients: &[f64], vectors: &[&[f64]]) -> Vec<f64> {
        (0..vectors[0].len()).map(|d| coefficients.iter().zip(vectors).map(|(c, v)| c * v[d]).sum()).collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn nuslerp_of_orthogonal_unit_vectors_walks_the_quarter_circle() {
        let (x, y): (&[f64], &[f64]) = (&[1.0, 0.0], &[0.0, 1.0]);
        // t = w1 / (w0 + w1) = 1/3: a third of the way, at angle π/6.
        let c = nuslerp(&gram(&[x, y]), &[2.0, 1.0]);
        let angle = std::f64::consts::FRAC_PI_6;
        close(&combine(&c, &[x, y]), &[angle.cos(), angle.sin()]);
        // Colinear inputs fall back to the linear blend.
        close(&nuslerp(&gram(&[x, &[2.0, 0.0]]), &[1.0, 1.0]), &[0.5, 0.5]);
    }

    #[test]
    fn multislerp_is_the_mean_direction_scaled_by_the_mean_norm() {
        let (x, y): (&[f64], &[f64]) = (&[2.0, 0.0], &[0.0, 4.0]);
        let c = multislerp(&gram(&[x, y]), &[1.0, 1.0], &SphericalOptions { eps: 0.0, ..Default::default() })
            .expect("defined");
        // Mean of the unit directions is (1, 1)/2, direction (1, 1)/√2; mean norm 3.
        let s = 3.0 / 2f64.sqrt();
        close(&combine(&c, &[x, y]), &[s, s]);
        let antipodal = multislerp(
            &gram(&[&[1.0, 0.0], &[-1.0, 0.0], &[0.0, 0.0]]),
            &[1.0, 1.0, 0.0],
            &Default::default(),
        );
        assert!(antipodal.is_err());
    }

    #[test]
    fn karcher_of_symmetric_directions_is_their_bisector() {
        let (x, y): (&[f64], &[f64]) = (&[1.0, 0.0], &[0.0, 3.0]);
        let options = SphericalOptions { max_iter: 50, tol: 1e-12, ..Default::default() };
        let merged = combine(&karcher(&gram(&[x, y]), &options), &[x, y]);
        // The mean direction bisects the angle; the length is the mean norm, 2.
        let s = 2.0 / 2f64.sqrt();
        close(&merged, &[s, s]);
        // One input is itself.
        close(&karcher(&gram(&[x]), &options), &[1.0]);
    }
}

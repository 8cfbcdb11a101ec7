//! The merge orchestration end to end on small files: a job read as the Python layer sends it,
//! run to disk and into memory, against values computed here.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::io::encode::OutDtype;
use crate::io::error::Error;
use crate::io::model::Model;
use crate::io::progress::Progress;
use crate::io::writer::{save_model, OutputTensor, ShardedWriter, TensorSink};
use crate::kinship::stats::{Metric, Mode};
use crate::merge::engine::job::{MergeJob, TensorRecipe};
use crate::merge::engine::run::run_merge;

/// Writes a float32 model of the given tensors into `dir`.
fn write_model(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|(name, shape, _)| OutputTensor {
            name: name.to_string(),
            shape: shape.clone(),
            dtype: OutDtype::F32,
        })
        .collect();
    let mut writer = ShardedWriter::create(dir, &outputs, u64::MAX).expect("create");
    for (i, (_, _, values)) in tensors.iter().enumerate() {
        writer.begin_tensor(i).expect("begin");
        writer.write(bytemuck::cast_slice(values)).expect("write");
    }
    writer.finish().expect("finish");
    dir.to_path_buf()
}

fn values(model: &Model, name: &str) -> Vec<f32> {
    let entry = model.tensor(name).expect("tensor");
    model.shards[entry.shard]
        .bytes(entry.start, entry.end)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A base and two fine-tunes of two tensors, and a job over them.
fn family(root: &Path, method: &str, weights: [f64; 2], out_dir: Option<&Path>) -> MergeJob {
    let base: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    let a: Vec<f32> = base.iter().enumerate().map(|(i, v)| v + 0.25 * (i as f32 - 2.0)).collect();
    let b: Vec<f32> = base.iter().enumerate().map(|(i, v)| v - 0.125 * (i % 3) as f32).collect();
    let models: Vec<PathBuf> = [("base", &base), ("a", &a), ("b", &b)]
        .iter()
        .map(|(name, w)| {
            let bias: Vec<f32> = w[..3].to_vec();
            write_model(&root.join(name), &[("w", vec![2, 3], w.to_vec()), ("bias", vec![3], bias)])
        })
        .collect();
    let tensor = |name: &str| {
        json!({"name": name, "base_tensor": name, "inputs": [
            {"model": 1, "tensor": name, "weight": weights[0]},
            {"model": 2, "tensor": name, "weight": weights[1]}
        ]})
    };
    serde_json::from_value(json!({
        "models": models, "base": 0, "method": method, "normalize": false, "rescale": false,
        "lambda": 1.0, "seed": 0, "out_dtype": "F32", "compute": "float64",
        "out_dir": out_dir, "max_shard_bytes": 1u64 << 30, "threads": 0,
        "tensors": [tensor("w"), tensor("bias")]
    }))
    .expect("a valid job")
}

#[test]
fn task_arithmetic_in_memory_equals_the_disk_output_and_the_formula() {
    let root = tempfile::tempdir().expect("tempdir");
    let out = root.path().join("out");
    std::fs::create_dir(&out).expect("out");
    let to_disk = family(root.path(), "task_arithmetic", [0.5, 1.5], Some(&out));
    let report = run_merge(&to_disk, &Progress::default()).expect("disk merge");
    assert!(report.model.is_none());
    assert_eq!(report.bytes_written, (6 + 3) * 4);
    let in_memory = MergeJob { out_dir: None, ..to_disk.clone() };
    let memory = run_merge(&in_memory, &Progress::default()).expect("memory merge");
    let merged = memory.model.expect("a model in memory");
    let written = Model::open(&out).expect("written model");
    let base = Model::open(root.path().join("base")).expect("base");
    let (a, b) =
        (Model::open(root.path().join("a")).expect("a"), Model::open(root.path().join("b")).expect("b"));
    for name in ["w", "bias"] {
        assert_eq!(values(&merged, name), values(&written, name), "{name}");
        let expected: Vec<f32> = values(&base, name)
            .iter()
            .zip(values(&a, name).iter().zip(values(&b, name)))
            .map(|(z, (x, y))| {
                let z = f64::from(*z);
                (z + 0.5 * (f64::from(*x) - z) + 1.5 * (f64::from(y) - z)) as f32
            })
            .collect();
        assert_eq!(values(&merged, name), expected, "{name}");
    }
    // Saving the model held in memory writes the disk output's bytes.
    let saved = root.path().join("saved");
    std::fs::create_dir(&saved).expect("saved");
    save_model(&merged, &saved, 1 << 30).expect("save");
    assert_eq!(
        std::fs::read(saved.join("model.safetensors")).expect("read"),
        std::fs::read(out.join("model.safetensors")).expect("read")
    );
    // The parents' kinship, measured in the same pass, is the same either way.
    let (k1, k2) = (report.kinship.expect("kinship"), memory.kinship.expect("kinship"));
    assert_eq!(k1.k, 2);
    assert_eq!(k1.matrix(Metric::Pcc, Mode::Full), k2.matrix(Metric::Pcc, Mode::Full));
    assert!((k1.matrix(Metric::Pcc, Mode::Full)[0] - 1.0).abs() < 1e-12);
}

#[test]
fn a_task_vector_method_without_a_base_is_an_invalid_argument() {
    let root = tempfile::tempdir().expect("tempdir");
    let job = MergeJob { base: None, ..family(root.path(), "ties", [1.0, 1.0], None) };
    match run_merge(&job, &Progress::default()) {
        Err(Error::InvalidArgument(message)) => assert_eq!(message, "merge method ties needs a base_model"),
        other => panic!("expected InvalidArgument, got {:?}", other.map(|r| r.bytes_written)),
    }
}

#[test]
fn a_job_with_a_key_the_engine_does_not_know_is_refused() {
    let job = json!({"models": [], "base": null, "method": "linear", "normalize": true, "rescale": false,
        "lambda": 1.0, "seed": 0, "out_dtype": "F32", "max_shard_bytes": 1, "threads": 0, "tensors": [],
        "lamda": 2.0});
    let error = serde_json::from_value::<MergeJob>(job).expect_err("refused");
    assert!(error.to_string().contains("unknown field `lamda`"), "{error}");
}

#[test]
fn a_cancelled_merge_stops_with_cancelled() {
    let root = tempfile::tempdir().expect("tempdir");
    let job = family(root.path(), "linear", [0.5, 0.5], None);
    let progress = Progress::default();
    progress.cancel();
    assert!(matches!(run_merge(&job, &progress), Err(Error::Cancelled)));
}

/// A base and two fine-tunes of one 8-element tensor with the given changes (distinct magnitudes,
/// so that no pruning threshold falls inside a tie), and a job of `method` over them.
fn changed(root: &Path, method: &str, deltas: [[f32; 8]; 2], weights: [f64; 2], density: f64) -> MergeJob {
    let base: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
    let mut models = vec![write_model(&root.join("base"), &[("w", vec![2, 4], base.clone())])];
    for (name, delta) in ["a", "b"].iter().zip(deltas) {
        let tuned: Vec<f32> = base.iter().zip(delta).map(|(z, d)| z + d).collect();
        models.push(write_model(&root.join(name), &[("w", vec![2, 4], tuned)]));
    }
    serde_json::from_value(json!({
        "models": models, "base": 0, "method": method, "normalize": false, "rescale": false,
        "lambda": 1.0, "seed": 0, "out_dtype": "F32", "compute": "float64",
        "out_dir": null, "max_shard_bytes": 1u64 << 30, "threads": 0,
        "tensors": [{"name": "w", "base_tensor": "w", "t": 0.3, "inputs": [
            {"model": 1, "tensor": "w", "weight": weights[0], "density": density},
            {"model": 2, "tensor": "w", "weight": weights[1], "density": density}
        ]}]
    }))
    .expect("a valid job")
}

/// The stored values of `w` in the job's models, widened: base, then the two fine-tunes.
fn stored(job: &MergeJob) -> Vec<Vec<f64>> {
    job.models
        .iter()
        .map(|p| values(&Model::open(p).expect("model"), "w").into_iter().map(f64::from).collect())
        .collect()
}

const DELTAS: [[f32; 8]; 2] =
    [[0.3, -0.1, 0.7, -0.2, 0.05, 0.4, -0.65, 0.12], [-0.6, 0.15, 0.25, 0.35, -0.45, 0.55, -0.02, 0.8]];

/// TIES as mergekit defines it, in float64: each task vector keeps its `int(density · n)` largest
/// magnitudes, the weighted vectors elect a sign per element (their sum's, + at zero), and the
/// agreeing ones are summed onto the base.
fn ties_reference(values: &[Vec<f64>], weights: [f64; 2], density: f64) -> Vec<f32> {
    let (base, n) = (&values[0], values[0].len());
    let keep = (density * n as f64) as usize;
    let weighted: Vec<Vec<f64>> = values[1..]
        .iter()
        .zip(weights)
        .map(|(tuned, w)| {
            let delta: Vec<f64> = tuned.iter().zip(base).map(|(x, z)| x - z).collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&i, &j| delta[j].abs().total_cmp(&delta[i].abs()));
            let mut kept = vec![0.0; n];
            order[..keep].iter().for_each(|&i| kept[i] = delta[i] * w);
            kept
        })
        .collect();
    (0..n)
        .map(|e| {
            let sign = if weighted.iter().map(|v| v[e]).sum::<f64>() >= 0.0 { 1.0 } else { -1.0 };
            let agreed: f64 = weighted.iter().map(|v| v[e]).filter(|v| v.signum() == sign && *v != 0.0).sum();
            (base[e] + agreed) as f32
        })
        .collect()
}

#[test]
fn ties_prunes_elects_and_sums_as_the_reference_whether_the_threshold_is_sorted_or_radix_selected() {
    let root = tempfile::tempdir().expect("tempdir");
    let weights = [0.7, 1.3];
    for density in [0.25, 0.5, 0.75, 1.0] {
        let job = changed(root.path(), "ties", DELTAS, weights, density);
        let expected = ties_reference(&stored(&job), weights, density);
        // The threshold from replaying torch's sort, then from the streamed radix select (no
        // memory allowed for the sort): with distinct magnitudes both keep the same elements.
        for sort_order_bytes in [job.sort_order_bytes, 0] {
            let job = MergeJob { sort_order_bytes, ..job.clone() };
            let merged = run_merge(&job, &Progress::default()).expect("merge").model.expect("in memory");
            assert_eq!(
                values(&merged, "w"),
                expected,
                "density {density}, sort_order_bytes {sort_order_bytes}"
            );
        }
    }
}

#[test]
fn slerp_rotates_from_the_base_toward_the_other_model_by_t() {
    let root = tempfile::tempdir().expect("tempdir");
    let job = changed(root.path(), "slerp", DELTAS, [1.0, 1.0], 1.0);
    let job = MergeJob {
        tensors: vec![TensorRecipe { inputs: job.tensors[0].inputs[..1].to_vec(), ..job.tensors[0].clone() }],
        ..job
    };
    let inputs = stored(&job);
    let (v0, v1, t) = (&inputs[0], &inputs[1], 0.3);
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let dot: f64 = v0.iter().zip(v1).map(|(a, b)| a * b).sum::<f64>() / (norm(v0) * norm(v1));
    let theta = dot.acos();
    let (s0, s1) = (((1.0 - t) * theta).sin() / theta.sin(), (t * theta).sin() / theta.sin());
    let expected: Vec<f32> = v0.iter().zip(v1).map(|(a, b)| (s0 * a + s1 * b) as f32).collect();
    let merged = run_merge(&job, &Progress::default()).expect("merge").model.expect("in memory");
    assert_eq!(values(&merged, "w"), expected);
}

#[test]
fn dare_at_density_one_is_task_arithmetic_and_below_it_keeps_a_subset_of_the_changes() {
    let root = tempfile::tempdir().expect("tempdir");
    let weights = [0.5, 1.0];
    let arithmetic = changed(root.path(), "task_arithmetic", DELTAS, weights, 1.0);
    let full = run_merge(&arithmetic, &Progress::default()).expect("merge").model.expect("in memory");
    let dare = MergeJob { method: crate::merge::engine::method::Method::DareLinear, ..arithmetic.clone() };
    let same = run_merge(&dare, &Progress::default()).expect("merge").model.expect("in memory");
    assert_eq!(values(&same, "w"), values(&full, "w"));
    // At density 0.5 (no rescale) every element is the base plus a subset of the weighted changes,
    // and some are pruned.
    let half = changed(root.path(), "dare_linear", DELTAS, weights, 0.5);
    let values_in = stored(&half);
    let merged =
        values(&run_merge(&half, &Progress::default()).expect("merge").model.expect("in memory"), "w");
    for (e, got) in merged.iter().enumerate() {
        let z = values_in[0][e];
        let d: Vec<f64> = (1..3).map(|i| (values_in[i][e] - z) * weights[i - 1]).collect();
        let subsets = [0.0, d[0], d[1], d[0] + d[1]].map(|s| (z + s) as f32);
        assert!(subsets.contains(got), "element {e}: {got} is no subset of the changes {d:?}");
    }
    assert_ne!(merged, values(&full, "w"), "nothing was pruned");
}

//! The merge orchestration end to end on small files: a job read as the Python layer sends it,
//! run to disk and into memory, against values computed here.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{run_merge, MergeJob};
use crate::encode::OutDtype;
use crate::error::Error;
use crate::model::Model;
use crate::progress::Progress;
use crate::stats::{Metric, Mode};
use crate::writer::{save_model, OutputTensor, ShardedWriter, TensorSink};

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

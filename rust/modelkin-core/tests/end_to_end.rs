//! The core on real safetensors files, without Python: a kinship pass and a merge, each against a
//! naive float64 computation.

use std::collections::HashMap;
use std::path::Path;

use modelkin_core::{kinship_pass, plan, Family, Metric, Mode, Model, PassOptions, Progress};
use safetensors::tensor::TensorView;

fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            (name.to_string(), TensorView::new(safetensors::Dtype::F32, shape.clone(), data).expect("view"))
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write");
}

fn values(seed: u32, n: usize) -> Vec<f32> {
    // A small deterministic generator: no dependency for random numbers in a test.
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

#[test]
fn kinship_pass_matches_a_naive_float64_computation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 40_000;
    let base = values(1, n);
    let shared = values(2, n);
    let a: Vec<f32> =
        base.iter().zip(&shared).zip(values(3, n)).map(|((z, s), e)| z + 0.1 * s + 0.05 * e).collect();
    let b: Vec<f32> =
        base.iter().zip(&shared).zip(values(4, n)).map(|((z, s), e)| z + 0.1 * s + 0.05 * e).collect();
    for (name, v) in [("base", &base), ("a", &a), ("b", &b)] {
        write(&dir.path().join(format!("{name}.safetensors")), &[("w", vec![200, 200], v.clone())]);
    }
    let open = |name: &str| Model::open(dir.path().join(format!("{name}.safetensors"))).expect("open").into();
    let family = Family::new(open("base"), vec![open("a"), open("b")]).expect("family");
    let options = PassOptions::default();
    let planned = plan(&family, &options).expect("plan");
    let report = kinship_pass(&family, &planned, &options, &Progress::default()).expect("pass");

    let da: Vec<f64> = a.iter().zip(&base).map(|(x, z)| f64::from(*x) - f64::from(*z)).collect();
    let db: Vec<f64> = b.iter().zip(&base).map(|(x, z)| f64::from(*x) - f64::from(*z)).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(&da), mean(&db));
    let cov: f64 = da.iter().zip(&db).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = da.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = db.iter().map(|y| (y - mb) * (y - mb)).sum();
    let pcc = cov / (va * vb).sqrt();
    let ed = da.iter().zip(&db).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();

    let got = report.matrix(Metric::Pcc, Mode::Full)[1];
    assert!((got - pcc).abs() <= 1e-12 * pcc.abs(), "{got} vs {pcc}");
    let got = report.matrix(Metric::Ed, Mode::Full)[1];
    assert!((got - ed).abs() <= 1e-12 * ed, "{got} vs {ed}");
    assert_eq!(report.total.n, n as u64);
}

#[test]
fn a_missing_tensor_names_the_model_and_the_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("base.safetensors"),
        &[("w", vec![4], vec![0.0; 4]), ("v", vec![4], vec![0.0; 4])],
    );
    write(&dir.path().join("a.safetensors"), &[("w", vec![4], vec![1.0; 4])]);
    let family = Family::new(
        Model::open(dir.path().join("base.safetensors")).expect("open").into(),
        vec![Model::open(dir.path().join("a.safetensors")).expect("open").into()],
    )
    .expect("family");
    let message = plan(&family, &PassOptions::default()).expect_err("missing tensor").to_string();
    assert!(message.contains("a.safetensors") && message.contains("'v'"), "{message}");
}

#[test]
fn the_same_model_twice_is_refused_on_disk_and_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("base.safetensors"), &[("w", vec![4], vec![0.0; 4])]);
    write(&dir.path().join("a.safetensors"), &[("w", vec![4], vec![1.0; 4])]);
    let open = |name: &str| -> std::sync::Arc<Model> {
        Model::open(dir.path().join(format!("{name}.safetensors"))).expect("open").into()
    };
    let error = Family::new(open("base"), vec![open("a"), open("a")]).expect_err("twice");
    assert!(matches!(error, modelkin_core::Error::DuplicateModel { .. }), "{error}");
    let a = open("a");
    assert!(Family::new(open("base"), vec![a.clone(), a]).is_err());
}

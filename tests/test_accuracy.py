"""Every metric, in every mode, against the independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import modelkin
from modelkin.io.safetensors import save_model, stored_values
from modelkin.testing import VOCAB
from reference import deltas, full, split


def assert_close(actual: float, expected: float) -> None:
    assert actual == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("split_mode", [False, True])
def test_metrics_match_reference(family_factory, dtype, shards, split_mode):
    fam = family_factory(dtype=dtype, shards=shards)
    result = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, split=split_mode)
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    reference = split if split_mode else full
    for metric in ("pcc", "cs", "ed"):
        assert_close(result.metrics[metric], reference(da, db, metric))
    assert result.n == sum(d.size for d in da.values())
    assert result.tensors == len(da)


@pytest.mark.parametrize("split_mode", [False, True])
def test_low_precision_matches_reference(family_factory, split_mode):
    fam = family_factory(dtype="BF16", shards=2)
    result = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, split=split_mode, low_precision=True)
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    reference = split if split_mode else full
    for metric in ("pcc", "cs", "ed"):
        assert_close(result.metrics[metric], reference(da, db, metric, low_precision=True))


def test_vocab_extended_fine_tunes_are_cut_to_base_rows(family_factory):
    fam = family_factory(dtype="F32", extra_vocab=(5, 9))
    result = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base)
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    for metric in ("pcc", "cs", "ed"):
        assert_close(result.metrics[metric], full(da, db, metric))


def test_mixed_dtypes_between_base_and_fine_tunes(family_factory):
    fam = family_factory(dtype="BF16", base_dtype="F32", n=4)
    result = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base)
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    assert_close(result.pcc, full(da, db, "pcc"))
    # The matrix of mixed formats takes decode-then-tiles, not the fused sweep.
    matrix = modelkin.kinship_matrix(fam.models, base=fam.base)
    for i in range(4):
        di = deltas(fam.values[i + 1], fam.base_values, VOCAB)
        assert_close(float(matrix["pcc"][0, i]), full(da, di, "pcc"))


def test_large_mean_delta_keeps_pcc_exact(tmp_path):
    # A delta with mean 1e3 times its spread: raw sums would cancel catastrophically in the pcc.
    from modelkin.io.safetensors import save_model

    rng = np.random.default_rng(3)
    base = {"w": np.zeros((64, 256))}
    a = {"w": 1000.0 + rng.normal(0, 1, (64, 256))}
    b = {"w": 1000.0 + 0.5 * (a["w"] - 1000.0) + rng.normal(0, 1, (64, 256))}
    for name, tensors in (("base", base), ("a", a), ("b", b)):
        save_model(tmp_path / name, tensors, "F64")
    result = modelkin.kinship(tmp_path / "a", tmp_path / "b", base=tmp_path / "base")
    assert_close(result.pcc, float(np.corrcoef(a["w"].ravel(), b["w"].ravel())[0, 1]))
    assert_close(result.ed, float(np.linalg.norm(a["w"] - b["w"])))


def test_identical_deltas_give_exact_unit_similarity_and_zero_distance(tmp_path):
    from modelkin.io.safetensors import save_model

    rng = np.random.default_rng(4)
    base = {"w": rng.normal(0, 1, (32, 32))}
    tuned = {"w": base["w"] + rng.normal(0, 1e-3, (32, 32))}
    save_model(tmp_path / "base", base, "F32")
    save_model(tmp_path / "a", tuned, "F32")
    save_model(tmp_path / "b", tuned, "F32")
    result = modelkin.kinship(tmp_path / "a", tmp_path / "b", base=tmp_path / "base")
    assert result.ed == 0.0
    assert_close(result.pcc, 1.0)
    assert_close(result.cs, 1.0)


def test_matrix_distances_of_nearly_equal_fine_tunes_stay_exact(tmp_path):
    # The all-pairs pass takes sum((a - b)^2) from raw sums, which cancels when two fine-tunes nearly
    # coincide; such pairs must be measured directly. "b" differs from "a" in one entry by 1e-6.
    from modelkin.io.safetensors import save_model

    rng = np.random.default_rng(5)
    base = rng.normal(0, 1, (64, 256))
    a = base + rng.normal(0, 1e-2, base.shape)
    b = a.copy()
    b[3, 7] += 1e-6
    c = a + rng.normal(0, 1e-2, base.shape)
    values = {"base": base, "a": a, "b": b, "c": c, "a-again": a}
    for name, w in values.items():
        save_model(tmp_path / name, {"w": w}, "F64")
    names = ["a", "b", "c", "a-again"]
    matrix = modelkin.kinship_matrix([tmp_path / n for n in names], base=tmp_path / "base")
    for i, x in enumerate(names):
        for j, y in enumerate(names):
            dx, dy = (values[x] - base).ravel(), (values[y] - base).ravel()
            # Relative only: the a-b distance (1e-6) is below assert_close's absolute floor.
            assert float(matrix["ed"][i, j]) == pytest.approx(float(np.linalg.norm(dx - dy)), rel=1e-6, abs=0)
            assert_close(float(matrix["pcc"][i, j]), float(np.corrcoef(dx, dy)[0, 1]))
    assert matrix["ed"][0, 3] == 0.0


def test_matrix_keeps_pcc_exact_for_large_mean_deltas(tmp_path):
    from modelkin.io.safetensors import save_model

    rng = np.random.default_rng(6)
    spread = [rng.normal(0, 1, (64, 256)) for _ in range(3)]
    values = [1000.0 + spread[0], 1000.0 + 0.5 * spread[0] + spread[1], 1000.0 - spread[0] + spread[2]]
    save_model(tmp_path / "base", {"w": np.zeros((64, 256))}, "F64")
    for i, w in enumerate(values):
        save_model(tmp_path / f"m{i}", {"w": w}, "F64")
    matrix = modelkin.kinship_matrix([tmp_path / f"m{i}" for i in range(3)], base=tmp_path / "base")
    expected = np.corrcoef(np.stack([w.ravel() for w in values]))
    for i in range(3):
        for j in range(3):
            assert_close(float(matrix["pcc"][i, j]), float(expected[i, j]))


def test_results_do_not_depend_on_thread_count(family_factory):
    fam = family_factory(dtype="BF16", shards=2, n=3)
    one = modelkin.kinship_matrix(fam.models, base=fam.base, threads=1)
    two = modelkin.kinship_matrix(fam.models, base=fam.base, threads=2)
    for metric in ("pcc", "cs", "ed"):
        np.testing.assert_array_equal(one[metric], two[metric])


def test_matrix_matches_pairwise_kinship(family_factory):
    fam = family_factory(dtype="BF16", n=4, shards=2)
    matrix = modelkin.kinship_matrix(fam.models, base=fam.base)
    assert matrix.names == tuple(str(m) for m in fam.models)
    for i in range(4):
        for j in range(4):
            di = deltas(fam.values[i + 1], fam.base_values, VOCAB)
            dj = deltas(fam.values[j + 1], fam.base_values, VOCAB)
            for metric in ("pcc", "cs", "ed"):
                assert_close(float(matrix[metric][i, j]), full(di, dj, metric))


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", [3, 6, 8, 9])
def test_matrix_matches_reference_for_every_width(tmp_path, dtype, n):
    """Up to eight fine-tunes are widened and multiplied in registers, nine go through the tiles;
    odd tensor sizes leave block tails that are decoded separately."""
    rng = np.random.default_rng(n)
    shapes = {"a.weight": (37, 29), "b.weight": (300,), "c.weight": (5,), "d.weight": (2, 520)}
    base = {name: rng.normal(0.0, 0.05, shape) for name, shape in shapes.items()}
    save_model(tmp_path / "base", base, dtype)
    base_values = {name: stored_values(v, dtype) for name, v in base.items()}
    models, deltas_of = [], []
    for i in range(n):
        tensors = {name: v + rng.normal(0.0, 0.01, v.shape) + 0.004 * i for name, v in base.items()}
        models.append(save_model(tmp_path / f"ft{i}", tensors, dtype, shards=2))
        deltas_of.append(deltas({name: stored_values(v, dtype) for name, v in tensors.items()}, base_values, None))
    matrix = modelkin.kinship_matrix(models, base=tmp_path / "base")
    for i in range(n):
        for j in range(n):
            for metric in ("pcc", "cs", "ed"):
                assert_close(float(matrix[metric][i, j]), full(deltas_of[i], deltas_of[j], metric))


def test_per_tensor_breakdown_matches_reference(family_factory):
    fam = family_factory(dtype="F16")
    result = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, per_tensor=True)
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    assert result.per_tensor is not None
    assert {t.name for t in result.per_tensor} == set(da)
    for t in result.per_tensor:
        assert t.n == da[t.name].size
        assert_close(t.pcc, full({t.name: da[t.name]}, {t.name: db[t.name]}, "pcc"))
        assert_close(t.ed, full({t.name: da[t.name]}, {t.name: db[t.name]}, "ed"))

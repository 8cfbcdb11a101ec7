"""The merge_cal drop-in: the original tool's arguments, output lines and quirks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from modelkin.testing import VOCAB, run_cli
from reference import deltas, full, split


def merge_cal(*args: str):
    return run_cli(*args, module="modelkin.kinship.merge_cal")


def test_output_lines_and_absolute_cosine(family_factory):
    fam = family_factory(shared=-0.7, seed=5)
    proc = merge_cal(str(fam.models[0]), str(fam.models[1]), str(fam.base), "pcc ed cs")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["pcc", "ed", "cs"]
    assert lines[0].startswith("pcc: Model Kinship based on Pearson Correlation Coefficient: ")
    assert lines[1].startswith("ed: Model Kinship based on Euclidean Distance: ")
    assert lines[2].startswith("cs: Model Kinship based on Cosine Similarity: ")
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    values = [float(line.rsplit(": ", 1)[1]) for line in lines]
    assert values[0] == pytest.approx(full(da, db, "pcc"), rel=1e-6)
    assert values[1] == pytest.approx(full(da, db, "ed"), rel=1e-6)
    assert values[2] == pytest.approx(abs(full(da, db, "cs")), rel=1e-6)


def test_commas_and_split_output(family_factory):
    fam = family_factory()
    proc = merge_cal(str(fam.models[0]), str(fam.models[1]), str(fam.base), "pcc,cs", "--split-calculation")
    lines = proc.stdout.splitlines()
    pattern = r"pcc: Model Kinship based on Pearson Correlation Coefficient \(weighted average\): -?\d\.\d{4}"
    assert re.fullmatch(pattern, lines[0])
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    assert float(lines[0].rsplit(": ", 1)[1]) == pytest.approx(split(da, db, "pcc"), abs=5e-5)


def test_low_precision(family_factory):
    fam = family_factory()
    proc = merge_cal(str(fam.models[0]), str(fam.models[1]), str(fam.base), "pcc", "--low-precision")
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    assert float(proc.stdout.rsplit(": ", 1)[1]) == pytest.approx(full(da, db, "pcc", low_precision=True), rel=1e-6)


def test_tied_embeddings_count_twice(family_factory):
    fam = family_factory(tied=True)
    proc = merge_cal(str(fam.models[0]), str(fam.models[1]), str(fam.base), "ed")
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    # state_dict() of a tied model lists the embedding again as lm_head.weight
    da["lm_head.weight"] = da["model.embed_tokens.weight"]
    db["lm_head.weight"] = db["model.embed_tokens.weight"]
    assert float(proc.stdout.rsplit(": ", 1)[1]) == pytest.approx(full(da, db, "ed"), rel=1e-6)


def test_missing_tensors_are_skipped_with_a_log_line(tmp_path):
    from modelkin.io.safetensors import save_file

    rng = np.random.default_rng(1)
    base = {"a": rng.normal(size=16), "b": rng.normal(size=16)}
    ft1 = {k: v + rng.normal(0, 0.1, 16) for k, v in base.items()}
    ft2 = {"a": base["a"] + rng.normal(0, 0.1, 16)}
    for name, tensors in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        save_file(tmp_path / f"{name}.safetensors", tensors, "F32")
    proc = merge_cal(
        str(tmp_path / "ft1.safetensors"), str(tmp_path / "ft2.safetensors"), str(tmp_path / "base.safetensors"), "pcc"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Key b not found" in proc.stderr
    a = np.float32(ft1["a"]).astype(np.float64) - np.float32(base["a"])
    b = np.float32(ft2["a"]).astype(np.float64) - np.float32(base["a"])
    assert float(proc.stdout.rsplit(": ", 1)[1]) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-6)


def test_same_names_are_refused(family_factory):
    fam = family_factory()
    proc = merge_cal(str(fam.models[0]), str(fam.models[0]), str(fam.base), "pcc")
    assert proc.returncode == 2
    assert "All model names must be different" in proc.stderr
    assert "Traceback" not in proc.stderr

"""The command line: JSON shapes, tables, the example family, plots, Hub ids from a fake cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import modelkin
from modelkin.testing import VOCAB, run_cli
from reference import deltas, full


def test_kinship_json_shape(family_factory):
    fam = family_factory()
    proc = run_cli("kinship", str(fam.models[0]), str(fam.models[1]), "--base", str(fam.base), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"models", "base", "mode", "metrics", "n", "tensors"}
    assert data["models"] == [str(fam.models[0]), str(fam.models[1])]
    assert data["mode"] == "full"
    assert set(data["metrics"]) == {"pcc", "cs", "ed"}
    da = deltas(fam.values[1], fam.base_values, VOCAB)
    db = deltas(fam.values[2], fam.base_values, VOCAB)
    assert data["metrics"]["pcc"] == pytest.approx(full(da, db, "pcc"), rel=1e-6)


def test_kinship_split_single_metric_json(family_factory):
    fam = family_factory()
    proc = run_cli(
        "kinship",
        str(fam.models[0]),
        str(fam.models[1]),
        "--base",
        str(fam.base),
        "--metric",
        "pcc",
        "--split",
        "--json",
    )
    data = json.loads(proc.stdout)
    assert data["mode"] == "split" and list(data["metrics"]) == ["pcc"]


def test_per_tensor_json_and_table(family_factory):
    fam = family_factory()
    args = ["kinship", str(fam.models[0]), str(fam.models[1]), "--base", str(fam.base), "--per-tensor"]
    data = json.loads(run_cli(*args, "--json").stdout)
    assert len(data["per_tensor"]) == data["tensors"]
    assert set(data["per_tensor"][0]) == {"name", "n", "pcc", "cs", "ed"}
    table = run_cli(*args)
    assert table.returncode == 0 and "lm_head.weight" in table.stdout


def test_matrix_json_shape(family_factory):
    fam = family_factory(n=3)
    proc = run_cli("matrix", *map(str, fam.models), "--base", str(fam.base), "--metric", "pcc", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"models", "base", "metrics"}
    matrix = np.array(data["metrics"]["pcc"])
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)


def test_table_output(family_factory):
    fam = family_factory()
    proc = run_cli("kinship", str(fam.models[0]), str(fam.models[1]), "--base", str(fam.base))
    assert proc.returncode == 0
    assert "pcc" in proc.stdout and "ed" in proc.stdout


def test_example_family_has_the_designed_relatedness(tmp_path):
    from modelkin.example import write_example_family

    paths = write_example_family(tmp_path)
    m = modelkin.kinship_matrix([paths["math-a"], paths["math-b"], paths["code"]], base=paths["base"], metric="pcc")
    assert m.matrix[0, 1] > 0.85  # shared task
    assert abs(m.matrix[0, 2]) < 0.1  # unrelated tasks


def test_plots_are_written(family_factory, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install modelkin[plot])")
    fam = family_factory(n=3)
    heat = tmp_path / "heat.png"
    proc = run_cli("matrix", *map(str, fam.models), "--base", str(fam.base), "--plot", str(heat))
    assert proc.returncode == 0, proc.stderr
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers = tmp_path / "layers.png"
    proc = run_cli(
        "kinship",
        str(fam.models[0]),
        str(fam.models[1]),
        "--base",
        str(fam.base),
        "--per-tensor",
        "--plot",
        str(layers),
    )
    assert proc.returncode == 0, proc.stderr
    assert layers.stat().st_size > 1000


def fake_hub_cache(cache: Path, repo: str, source: Path, revision: str = "main") -> None:
    """Lays ``source``'s files out as huggingface_hub's cache does for ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(commit)


def test_hub_ids_resolve_from_a_fake_offline_cache(family_factory, tmp_path):
    fam = family_factory()
    cache = tmp_path / "hub"
    for name, path in (("org/base", fam.base), ("org/ft-a", fam.models[0]), ("org/ft-b", fam.models[1])):
        fake_hub_cache(cache, name, path)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("kinship", "org/ft-a", "org/ft-b", "--base", "org/base", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    hub = json.loads(proc.stdout)
    local = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base)
    assert hub["models"] == ["org/ft-a", "org/ft-b"]
    assert hub["metrics"]["pcc"] == local.pcc


def test_hub_revision_and_missing_repo(family_factory, tmp_path, monkeypatch):
    fam = family_factory()
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/base", fam.base)
    fake_hub_cache(cache, "org/ft-a", fam.models[0], revision="v1")
    fake_hub_cache(cache, "org/ft-b", fam.models[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    result = modelkin.kinship("org/ft-a@v1", "org/ft-b", base="org/base", offline=True)
    assert result.models == ("org/ft-a@v1", "org/ft-b")
    proc = run_cli(
        "kinship", "org/missing", "org/ft-b", "--base", "org/base", "--offline", env={"HF_HUB_CACHE": str(cache)}
    )
    assert proc.returncode == 2
    assert "org/missing" in proc.stderr and "Traceback" not in proc.stderr


def test_tables_show_short_names_and_full_paths_below(family_factory, tmp_path):
    fam = family_factory()
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "fine-tune-number-one"
    deep.parent.mkdir(parents=True)
    deep.symlink_to(fam.models[0])
    proc = run_cli("kinship", str(deep), str(fam.models[1]), "--base", str(fam.base))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    title = f"kinship of fine-tune-number-one and {fam.models[1].name} (base {fam.base.name})"
    assert lines[0].strip() == title, "the title stays on one line"
    assert f"fine-tune-number-one: {deep}" in proc.stdout


def test_merge_prints_the_parents_kinship_as_a_table(family_factory, tmp_path):
    fam = family_factory(n=3)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in fam.models],
        "dtype": "float32",
    }
    path = tmp_path / "r.yml"
    path.write_text(json.dumps(recipe))
    proc = run_cli("merge", str(path), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "[[" not in proc.stdout, "no raw nested list"
    rows = [ln for ln in proc.stdout.splitlines() if fam.models[0].name in ln and fam.models[1].name in ln]
    assert len(rows) == 1
    provenance = json.loads((tmp_path / "out" / "modelkin.json").read_text())
    assert f"{provenance['kinship']['pcc'][0][1]:.6g}" in rows[0]

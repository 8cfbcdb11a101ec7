"""Merging as a library: plan(), in-memory merges, save(), kinship of a model held in memory, the
method table, and the errors of each (issue 10)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import modelkin
from merge_reference import read_safetensors
from modelkin import _core
from modelkin.io.safetensors import save_model
from modelkin.merge.methods import method_dict
from modelkin.testing import run_cli


@pytest.fixture
def fam(family_factory):
    return family_factory(n=3, dtype="BF16", shards=2)


def ties(fam, **extra) -> dict:
    return {
        "models": [
            {"model": str(m), "parameters": {"weight": 1.0 - 0.2 * i, "density": 0.5}} for i, m in enumerate(fam.models)
        ],
        "merge_method": "ties",
        "base_model": str(fam.base),
        "dtype": "bfloat16",
        **extra,
    }


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_plan_says_what_will_be_merged_before_reading(fam):
    plan = modelkin.plan(ties(fam))
    assert plan.method == "ties"
    assert plan.models == tuple(str(m) for m in fam.models)
    assert plan.base == str(fam.base)
    names = [t.name for t in plan.tensors]
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" in names
    first = plan.tensors[0]
    assert first.inputs == tuple((str(m), first.name) for m in fam.models)
    assert first.base_tensor == first.name


def test_in_memory_merge_is_bit_identical_to_disk_and_saves_the_same_files(fam, tmp_path):
    (fam.base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    plan = modelkin.plan(ties(fam))
    merged = modelkin.merge(plan)
    assert isinstance(merged, modelkin.MergedModel)
    disk = modelkin.merge(plan, tmp_path / "disk")
    on_disk = read_safetensors(tmp_path / "disk")
    assert sorted(merged) == sorted(on_disk)
    for name, array in merged.items():
        assert array.dtype == ml_dtypes.bfloat16
        assert not array.flags.writeable
        # Shares the engine's buffer: the array's memory belongs to the merged model, not a copy.
        assert array.base is not None
        # bf16 widens to float64 exactly: equal values are equal bits.
        np.testing.assert_array_equal(array.astype(np.float64), on_disk[name], err_msg=name)
    # The same kinship, measured in the same pass, as the disk merge records.
    assert disk.kinship is not None and merged.kinship is not None
    for metric in ("pcc", "cs", "ed"):
        np.testing.assert_array_equal(merged.kinship[metric], disk.kinship[metric])
    assert merged.names == disk.parents
    assert merged.config == json.loads((tmp_path / "disk" / "config.json").read_text())
    assert merged.config["dtype"] == merged.config["torch_dtype"] == "bfloat16"
    merged.save(tmp_path / "saved")
    assert read_dir(tmp_path / "saved") == read_dir(tmp_path / "disk")


def test_save_respects_the_shard_size_as_merge_does(fam, tmp_path):
    plan = modelkin.plan(ties(fam))
    modelkin.merge(plan, tmp_path / "disk", out_shard_size=5_000)
    modelkin.merge(plan).save(tmp_path / "saved", out_shard_size=5_000)
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    assert read_dir(tmp_path / "saved") == read_dir(tmp_path / "disk")


def test_a_merged_model_in_memory_is_a_model_for_kinship(fam, tmp_path):
    plan = modelkin.plan(ties(fam))
    merged = modelkin.merge(plan)
    modelkin.merge(plan, tmp_path / "disk")
    in_memory = modelkin.kinship(merged, fam.models[0], base=fam.base)
    on_disk = modelkin.kinship(tmp_path / "disk", fam.models[0], base=fam.base)
    assert in_memory.metrics == on_disk.metrics
    matrix = modelkin.kinship_matrix([merged, *fam.models[:2]], base=fam.base)
    assert matrix.names[0].startswith("<merged ties in memory")
    assert matrix["pcc"][0, 1] == pytest.approx(on_disk.pcc, rel=1e-12)
    with pytest.raises(modelkin.ModelReferenceError, match="given twice"):
        modelkin.kinship(merged, merged, base=fam.base)


def test_linear_in_memory_matches_the_float32_reference(family_factory):
    fam = family_factory(n=2, dtype="F32")
    recipe = {
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(fam.models, (0.3, 0.7), strict=True)],
        "merge_method": "linear",
        "dtype": "float32",
    }
    merged = modelkin.merge(recipe)
    for name, array in merged.items():
        assert array.dtype == np.float32
        expected = (np.float32(0.3) * fam.values[1][name].astype(np.float32)) + (
            np.float32(0.7) * fam.values[2][name].astype(np.float32)
        )
        np.testing.assert_allclose(array, expected, rtol=2e-7, atol=1e-9, err_msg=name)


def test_fifty_candidates_from_one_dict_reuse_one_thread_pool(fam):
    recipe = ties(fam)
    seen = []
    for i in range(3):
        recipe["models"][0]["parameters"]["weight"] = 0.5 + i / 10
        plan = modelkin.plan(recipe)
        seen.append(np.array(modelkin.merge(plan, threads=1)["lm_head.weight"]))
        # The plan holds its own copy of the recipe: changing the dict afterwards changes nothing.
        recipe["models"][0]["parameters"]["weight"] = 9.0
        assert plan.config.text.count("9.0") == 0
    assert not np.array_equal(seen[0], seen[1])
    # One pool of one worker, built once and kept: its thread is still there and alone.
    workers = [t for t in os.listdir("/proc/self/task") if _thread_name(t).startswith("modelkin-1-")]
    assert len(workers) == 1, workers
    assert threading.active_count() >= 1


def _thread_name(tid: str) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_plan_whose_models_changed_is_refused_naming_the_file(fam):
    plan = modelkin.plan(ties(fam))
    shard = sorted(fam.models[1].glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10_000_000))
    with pytest.raises(
        modelkin.ModelReferenceError, match=re.escape(f"{shard}: changed on disk since the merge was planned")
    ):
        modelkin.merge(plan)
    # The same when a file is replaced by another of another size.
    plan = modelkin.plan(ties(fam))
    save_model(fam.models[2], {"x": np.zeros(3)}, "F32")
    with pytest.raises(modelkin.ModelReferenceError, match=r"model\.safetensors: added on disk since"):
        modelkin.merge(plan)


def test_plans_share_open_models_until_a_file_changes(fam, monkeypatch):
    """An evolution plans many merges of the same parents: each model is opened (files mapped,
    headers read) once and kept open while its files are unchanged. A file replaced by a copy of the
    same size and time (rsync, cp -p) is another inode: the old plan is refused and a new one opens
    the new file."""
    first, second = modelkin.plan(ties(fam)), modelkin.plan(ties(fam))
    assert all(a is b for a, b in zip(first.handles, second.handles, strict=True))
    assert [Path(h.path) for h in first.handles] == list(first.paths.values())
    shard = sorted(fam.models[0].glob("*.safetensors"))[0]
    before = shard.stat()
    shutil.copy2(shard, shard.with_name("copy"))
    os.replace(shard.with_name("copy"), shard)
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(modelkin.ModelReferenceError, match=re.escape(f"{shard}: changed on disk since")):
        modelkin.merge(first)
    third = modelkin.plan(ties(fam))
    index = list(third.paths).index(str(fam.models[0]))
    assert third.handles[index] is not first.handles[index]
    assert third.handles[index + 1] is first.handles[index + 1]
    assert np.array_equal(modelkin.merge(third)["lm_head.weight"], modelkin.merge(ties(fam))["lm_head.weight"])
    # The engine refuses a model opened from another path than the job names.
    job = third.job(None, threads=1, max_shard_bytes=1 << 30, redirect={})
    with pytest.raises(modelkin.RecipeError, match="but the model opened for it is"):
        _core.run_merge(job, models=[third.handles[-1]])
    # Few models are kept open (each holds its files).
    from modelkin.merge import planner

    monkeypatch.setattr(planner, "_KEEP_OPEN", 2)
    planner._OPEN.clear()
    modelkin.plan(ties(fam))
    assert len(planner._OPEN) == 2


def test_save_refuses_a_non_empty_directory_without_overwrite(fam, tmp_path):
    merged = modelkin.merge(modelkin.plan(ties(fam)))
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(modelkin.RecipeError, match="exists and is not empty"):
        merged.save(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    merged.save(target, overwrite=True)
    assert (target / "model.safetensors").is_file() and not (target / "keep.txt").exists()


def test_indexing_a_tensor_the_model_lacks_names_it(fam):
    merged = modelkin.merge(modelkin.plan(ties(fam)))
    with pytest.raises(KeyError, match=re.escape("no tensor 'model.layers.9.mlp.up_proj.weight'")):
        merged["model.layers.9.mlp.up_proj.weight"]
    assert "model.layers.9.mlp.up_proj.weight" not in merged


@pytest.mark.parametrize(
    ("parameters", "model_parameters", "needle"),
    [
        ({}, {"density": 1.5}, r"density 1.5 is outside \[0, 1\]"),
        ({}, {"gamma": -0.1}, r"gamma -0.1 is outside \[0, 1\]"),
        ({"eps": 0.0}, {}, r"eps 0.0 is outside \(0, inf\)"),
        ({"select_topk": [0.5, 2.0]}, {}, r"select_topk 2.0 is outside \[0, 1\]"),
    ],
)
def test_a_parameter_out_of_its_declared_range_says_the_range(fam, parameters, model_parameters, needle):
    method = {"eps": "multislerp", "select_topk": "sce"}.get(next(iter(parameters), ""), "breadcrumbs_ties")
    recipe = ties(fam, merge_method=method, parameters=parameters)
    for m in recipe["models"]:
        m["parameters"] = {"weight": 1.0, **({"density": 0.5} if method != "multislerp" and method != "sce" else {})}
        m["parameters"].update(model_parameters)
        if method == "sce":
            m["parameters"].pop("weight")
    with pytest.raises(modelkin.RecipeError, match=needle):
        modelkin.plan(recipe)


def test_a_gradient_out_of_range_at_one_tensor_is_refused_when_planning(fam):
    recipe = ties(fam)
    recipe["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]
    with pytest.raises(modelkin.RecipeError, match=r"density 2.0 is outside \[0, 1\]"):
        modelkin.plan(recipe)


def test_bad_arguments_from_the_engine_are_recipe_errors_not_model_reference_errors(fam):
    job = modelkin.plan(ties(fam)).job(None, threads=0, max_shard_bytes=1 << 30, redirect={})
    job["base"] = None
    with pytest.raises(modelkin.RecipeError, match="ties needs a base_model") as caught:
        _core.run_merge(job)
    assert isinstance(caught.value, ValueError) and not isinstance(caught.value, modelkin.ModelReferenceError)
    unknown = dict(job, bogus=1)
    with pytest.raises(modelkin.RecipeError, match="unknown field `bogus`"):
        _core.run_merge(unknown)  # type: ignore[arg-type]


def test_a_plan_takes_seed_and_precise_when_planning_not_when_merging(fam):
    plan = modelkin.plan(ties(fam))
    with pytest.raises(ValueError, match="precise: set when planning"):
        modelkin.merge(plan, precise=True)


def test_the_method_table_comes_from_the_core():
    table = modelkin.methods()
    assert list(table)[:3] == ["linear", "task_arithmetic", "ties"]
    assert len(table) == 20
    ties_row = method_dict(table["ties"])
    assert ties_row["base_model"] == "required" and ties_row["sparsification"] == "magnitude"
    density = next(p for p in ties_row["parameters"] if p["name"] == "density")
    assert density == {
        "name": "density",
        "scope": "per_model",
        "required": False,
        "default": 1.0,
        "range": "[0, 1]",
        "help": "fraction of the task vector kept",
    }
    assert table["slerp"].min_models == table["slerp"].max_models == 1
    assert table["karcher"].base == "input" and table["linear"].base == "ignored"


def test_methods_cli_prints_the_table_and_its_json():
    proc = run_cli("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == list(modelkin.methods())
    assert rows == [method_dict(info) for info in modelkin.methods().values()]
    proc = run_cli("methods")
    assert proc.returncode == 0 and "nuslerp" in proc.stdout


def test_merge_cli_prints_the_parents_kinship_as_a_table(fam, tmp_path):
    recipe = tmp_path / "recipe.yml"
    import yaml

    recipe.write_text(yaml.safe_dump(ties(fam)))
    proc = run_cli("merge", str(recipe), str(tmp_path / "out"), env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "kinship of the parents" in proc.stdout and "[[" not in proc.stdout
    assert f"{fam.models[0].name}" in proc.stdout and "pcc" in proc.stdout

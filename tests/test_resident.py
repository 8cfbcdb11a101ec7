"""Resident evaluation: candidates handed to the evaluator in memory (``evaluator.resident``).

A resident Python evaluator receives the merged candidate itself (a ``MergedModel``) or a model on
disk mapped from its files (a ``StoredModel``); scratch candidates (CMA-ES) are never written; the
run's decisions and scores are those of the same run with paths. lm-eval's resident model (built
once per worker, each candidate's tensors copied in) scores what lm-eval scores from the
candidate's directory: checked with the real package where it is installed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import modelkin.evolve as evo
from evolve_support import hashed_scores, search_config, small_family
from modelkin.evolve.config import load_evolve_config
from modelkin.evolve.errors import RunError
from modelkin.io.errors import RecipeError
from modelkin.io.resident import ResidentModel, StoredModel
from modelkin.merge.merging import MergedModel

LOG = "MODELKIN_TEST_RESIDENT_LOG"


def recording_evaluator(model: Any, split: str) -> dict[str, float]:
    """hashed_scores, logging what it was given and whether a scratch candidate was on disk."""
    record: dict[str, Any] = {"split": split, "type": type(model).__name__}
    if isinstance(model, ResidentModel):
        record["label"] = model.label
        record["config"] = model.config is not None
        scratch = Path(os.environ["MODELKIN_TEST_RUN"]) / "scratch"
        record["scratch"] = sorted(p.name for p in scratch.iterdir()) if scratch.is_dir() else []
    with open(os.environ[LOG], "a") as log:
        log.write(json.dumps(record) + "\n")
    return hashed_scores(model, split)


def run_logged(config: dict[str, Any], run_dir: Path, log: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> evo.Run:
    monkeypatch.setenv(LOG, str(log))
    monkeypatch.setenv("MODELKIN_TEST_RUN", str(run_dir))
    return evo.evolve(config, run_dir, **kw)


def table(run: evo.Run) -> list[tuple[Any, ...]]:
    """What a run decided and measured, candidate by candidate (recipes name the run's own directory)."""
    rows = []
    for c in run.candidates:
        recipe = json.dumps(c.recipe).replace(str(run.path), "RUN")
        rows.append((c.id, c.role, c.status, recipe, c.scores, c.objective_search, c.objective_test))
    return rows


@pytest.mark.parametrize("workers", [1, 2])
def test_cmaes_candidates_reach_a_python_evaluator_in_memory(tmp_path, monkeypatch, workers):
    base, pool = small_family(tmp_path / "fam", n=2)
    evaluator = {"python": "test_resident:recording_evaluator"}
    plain = run_logged(
        search_config(base, pool, evaluator, max_evals=8), tmp_path / "plain", tmp_path / "plain.jsonl", monkeypatch
    )
    config = search_config(base, pool, {**evaluator, "resident": True}, max_evals=8)
    resident = run_logged(config, tmp_path / "resident", tmp_path / "resident.jsonl", monkeypatch, workers=workers)
    # The same decisions and the same scores, to the bit.
    assert table(resident) == table(plain)
    assert {r["type"] for r in map(json.loads, (tmp_path / "plain.jsonl").read_text().splitlines())} == {"str"}
    seen = [json.loads(line) for line in (tmp_path / "resident.jsonl").read_text().splitlines()]
    merged = [r for r in seen if r["type"] == "MergedModel"]
    stored = [r for r in seen if r["type"] == "StoredModel"]
    assert len(merged) + len(stored) == len(seen)
    # Every CMA-ES candidate was scored in memory, and no candidate was ever written to scratch; the
    # best is made again for its test split (kept, outside the scratch area, for `runs best`).
    assert [r["split"] for r in merged] == ["search"] * 8 + ["test"] and all(r["config"] for r in seen)
    assert all(r["scratch"] == [] for r in seen)
    assert {r["label"] for r in stored} == {str(base), *map(str, pool)}
    assert resident.best is not None and Path(resident.best.path or "").is_dir()


def test_topk_children_are_written_before_they_are_scored(tmp_path, monkeypatch):
    """topk's children are the next generation's parents: kept on disk, as without resident."""
    base, pool = small_family(tmp_path / "fam", n=3)
    config = {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": {"k": 2, "generations": 2, "stop_kinship": None},
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        "evaluator": {"python": "test_resident:recording_evaluator"},
    }
    plain = run_logged(config, tmp_path / "plain", tmp_path / "plain.jsonl", monkeypatch)
    config["evaluator"] = {**config["evaluator"], "resident": True}
    resident = run_logged(config, tmp_path / "resident", tmp_path / "resident.jsonl", monkeypatch)
    assert table(resident) == table(plain)
    children = [c for c in resident.candidates if c.recipe is not None]
    assert children and all(c.path and Path(c.path, "config.json").is_file() for c in children)
    seen = [json.loads(line) for line in (tmp_path / "resident.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "MergedModel" for r in seen) == len(children)


def test_an_evaluator_callable_is_given_paths_unless_asked(tmp_path):
    base, pool = small_family(tmp_path / "fam", n=2)
    got: list[type] = []

    def evaluate(model: Any, split: str) -> dict[str, float]:
        got.append(type(model))
        return hashed_scores(model, split)

    config = search_config(base, pool, {"command": "unused {model}"}, max_evals=8)
    evo.evolve(config, tmp_path / "a", evaluator=evaluate)
    assert set(got) == {str}
    got.clear()
    evo.evolve(config, tmp_path / "b", evaluator=evaluate, resident=True)
    assert set(got) == {StoredModel, MergedModel}


def test_resident_is_how_not_what_so_a_run_resumes_across_it(tmp_path, monkeypatch):
    base, pool = small_family(tmp_path / "fam", n=2)
    evaluator = {"python": "test_resident:recording_evaluator"}
    config = search_config(base, pool, evaluator, max_evals=8)
    resident = search_config(base, pool, {**evaluator, "resident": True}, max_evals=8)
    assert load_evolve_config(config).fingerprint == load_evolve_config(resident).fingerprint
    first = run_logged(config, tmp_path / "run", tmp_path / "log.jsonl", monkeypatch)
    again = run_logged(resident, tmp_path / "run", tmp_path / "log.jsonl", monkeypatch)
    assert table(again) == table(first)


@pytest.mark.parametrize(
    ("evaluator", "message"),
    [
        ({"command": "x {model}", "resident": True}, "evaluator.resident: a command evaluator reads a model directory"),
        ({"python": "m:f", "resident": "yes"}, "evaluator.resident: must be true or false"),
        (
            {"lm_eval": {"tasks": ["t"], "model": "vllm"}, "resident": True},
            "evaluator.resident: needs lm-eval's hf model",
        ),
    ],
)
def test_resident_is_refused_where_it_cannot_apply(tmp_path, evaluator, message):
    base, pool = small_family(tmp_path / "fam", n=2)
    with pytest.raises(RecipeError, match=message):
        load_evolve_config(search_config(base, pool, evaluator))


def test_lm_eval_defaults_to_resident_only_with_its_hf_model():
    def spec(lm: dict[str, Any]) -> Any:
        return load_evolve_config({"pool": ["a", "b"], "base_model": "z", "evaluator": {"lm_eval": lm}}).evaluator

    assert spec({"tasks": ["t"]}).resident
    assert not spec({"tasks": ["t"], "model": "vllm"}).resident


def test_evolve_refuses_resident_for_a_command(tmp_path):
    base, pool = small_family(tmp_path / "fam", n=2)
    config = search_config(base, pool, {"command": "x {model}"})
    with pytest.raises(RunError, match="resident: a command evaluator reads a model directory"):
        evo.evolve(config, tmp_path / "run", resident=True)
    assert not (tmp_path / "run").exists()


# --- lm-eval, the real package -------------------------------------------------------------------
def test_resident_lm_eval_scores_what_lm_eval_scores(tmp_path, monkeypatch):
    """The resident lm-eval evaluator gives every model lm-eval's own scores: models on disk and
    merged in memory, in any order, with the model built once (a stacked merge, which changes the
    layer count, builds it again)."""
    for module in ("lm_eval", "torch", "transformers"):
        pytest.importorskip(module, reason=f"{module} is not installed (the real lm-eval test: modelkin[lmeval])")
    from modelkin import merge
    from modelkin.evolve.family import write_task_family
    from modelkin.evolve.lmeval import lm_eval_evaluator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    written = write_task_family(tmp_path / "fam")
    settings = dict(load_evolve_config(written["evolve-lmeval.yml"]).evaluator.lm_eval)
    settings["limit"] = 48
    kept = lm_eval_evaluator(settings, resident=True)
    plain = lm_eval_evaluator(settings, resident=False)
    fam = tmp_path / "fam"
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam / "base"),
        "models": [{"model": str(fam / m), "parameters": {"weight": 0.6}} for m in ("ft-reverse", "ft-sort")],
        "dtype": "bfloat16",
    }
    stacked = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(fam / "ft-reverse"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(fam / "ft-sort"), "layer_range": [1, 2]}]},
        ],
        "dtype": "float32",
    }
    models: list[tuple[str, Any]] = [
        ("ft-sort", str(fam / "ft-sort")),
        ("merged", merge(recipe)),
        ("base", str(fam / "base")),
        ("stacked", merge(stacked)),
        ("merged again", merge({**recipe, "dtype": "float32"})),
    ]
    for name, model in models:
        directory = model
        if not isinstance(model, str):
            directory = str(model.save(tmp_path / name.replace(" ", "-")))
        for split in ("search", "test"):
            assert kept(model, split) == plain(directory, split), (name, split)
    shutil.rmtree(tmp_path / "fam", ignore_errors=True)


def test_torch_state_dict_shares_the_engines_memory(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (a dev/peer tool, never needed at run time)")
    import numpy as np

    from modelkin import merge

    base, pool = small_family(tmp_path / "fam", n=2, dtype="BF16")
    merged = merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in pool],
            "dtype": "bfloat16",
        }
    )
    for model in (merged, StoredModel(base)):
        state = model.torch_state_dict()
        assert list(state) == list(model.tensor_names)
        for name, tensor in state.items():
            array = model[name]
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == array.shape
            assert tensor.data_ptr() == array.ctypes.data  # a view, not a copy
            assert np.array_equal(tensor.float().numpy(), array.astype(np.float32))

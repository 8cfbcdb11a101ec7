"""CMA-ES recipe search: the genome's recipes, a mergekit-evolve config run unchanged, resume after
SIGKILL, and the same result with one worker, two local workers, or Ray."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import modelkin.evolve as evo
from evolve_support import hashed_scores, search_config, small_family, write_config
from modelkin.evolve.experiment import default_popsize
from modelkin.evolve.genome import Genome, GenomeSpec
from modelkin.evolve.search import BEST_CONFIG
from modelkin.merge.recipe import load_config
from modelkin.testing import run_cli


def spec(**kw: Any) -> GenomeSpec:
    return GenomeSpec(**{"models": ("a", "b", "c"), "merge_method": "dare_ties", "base_model": "z", **kw})


def test_genome_start_and_clamping():
    g = Genome(spec(layer_granularity=2, filters=("self_attn", "mlp")), 4, ["/a", "/b", "/c"], "/z")
    assert g.shape == (2, 3, 3, 2) and g.size == 36
    x = g.initial().reshape(g.shape)
    assert np.all(x[..., 0] == 1 / 3) and np.all(x[..., 1] == 1)
    raw = np.linspace(-1.5, 1.5, g.size)
    values = g.values(raw)
    assert values["density"].min() >= 0 and values["density"].max() <= 1
    assert np.all(values["weight"] >= 0)
    np.testing.assert_array_equal(values["weight"], np.abs(raw.reshape(g.shape)[..., 0]))
    negative = Genome(spec(allow_negative_weights=True), 4, ["/a", "/b", "/c"], "/z")
    assert negative.values(-np.ones(negative.size))["weight"].min() == -1


def test_genome_recipe_slices_filters_and_base():
    g = Genome(spec(layer_granularity=2, filters=("self_attn",)), 4, ["/a", "/b", "/c"], "/z")
    x = np.arange(g.size, dtype=float) / 100
    recipe = g.recipe(x)
    assert recipe["merge_method"] == "dare_ties" and recipe["dtype"] == "bfloat16"
    assert recipe["parameters"] == {"normalize": True, "int8_mask": True}
    assert recipe["base_model"] == "/z"
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 2], [2, 4]]
    second = recipe["slices"][1]["sources"]
    assert [s["model"] for s in second] == ["/a", "/b", "/c", "/z"]  # the base joins each slice
    genotype = x.reshape(g.shape)
    weight = second[1]["parameters"]["weight"]
    assert weight == [
        {"filter": "self_attn", "value": genotype[1, 1, 0, 0]},
        {"filter": None, "value": genotype[1, 1, 1, 0]},
    ]
    config = load_config(recipe)  # a valid mergekit recipe
    assert config.slices is not None and len(config.slices) == 2
    # normalize defaults to false for task_arithmetic, as in mergekit-evolve
    ta = Genome(spec(merge_method="task_arithmetic"), 4, ["/a", "/b", "/c"], "/z")
    assert ta.recipe(ta.initial())["parameters"]["normalize"] is False


def test_genome_smooth_gradients():
    g = Genome(spec(merge_method="linear", base_model=None, layer_granularity=1, smooth=True), 3, ["/a", "/b"], None)
    x = np.arange(g.size, dtype=float)
    recipe = g.recipe(x)
    assert "slices" not in recipe and len(recipe["models"]) == 2
    genotype = x.reshape(g.shape)
    assert recipe["models"][1]["parameters"]["weight"] == list(genotype[:, 1, 0, 0])
    assert load_config(recipe).method.name == "linear"


def test_genome_slerp_takes_the_top_two():
    g = Genome(spec(merge_method="slerp", base_model=None), 4, ["/a", "/b", "/c"], None)
    recipe = g.recipe(np.array([0.2, 0.9, 0.5]))
    assert recipe["base_model"] == "/b" and [m["model"] for m in recipe["models"]] == ["/b", "/c"]
    t = math.exp(0.5) / (math.exp(0.9) + math.exp(0.5))
    assert recipe["parameters"]["t"] == pytest.approx(t, rel=1e-12)


def test_default_popsize():
    assert default_popsize(8) == 4 + math.floor(3 * math.log(8))


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return small_family(tmp_path / "fam", n=3)


def replay(run: evo.Run, popsize: int, sigma0: float, seed: int) -> None:
    """The stored search is what an optimizer with that seed asks, told the stored scores."""
    from cmaes import CMA

    searched = [c for c in run.candidates if c.role == "search"]
    genes = len(searched[0].genes or ())
    optimizer = CMA(mean=np.full(genes, 1 / 3), sigma=sigma0, seed=seed, population_size=popsize)
    for generation in range(1, max(c.generation for c in searched) + 1):
        members = [c for c in searched if c.generation == generation]
        asked = [optimizer.ask() for _ in members]
        for x, c in zip(asked, members, strict=True):
            assert np.array_equal(x, np.asarray(c.genes))
        optimizer.tell([(x, -(c.objective_search or 0.0)) for x, c in zip(asked, members, strict=True)])


def test_search_end_to_end(family, tmp_path):
    base, pool = family
    run = evo.evolve(search_config(base, pool), tmp_path / "run")
    searched = [c for c in run.candidates if c.role == "search"]
    popsize = default_popsize(2 * 3)  # 2 layers x 3 models, one weight each
    assert len(searched) == (24 // popsize) * popsize
    replay(run, popsize, 1 / 6, 3)
    best = run.best
    assert best is not None and best.objective_search == max(c.objective_search or -1 for c in searched)
    assert best.objective_test is not None
    # Every candidate's recipe re-makes exactly the model that was scored.
    for c in searched[:3]:
        again = tmp_path / f"again{c.id}"
        recipe = tmp_path / f"c{c.id}.yml"
        recipe.write_text(yaml.safe_dump(c.recipe))
        assert run_cli("merge", str(recipe), str(again)).returncode == 0
        assert hashed_scores(again, "search") == c.scores["search"]
    # best_config.yml is the best recipe; improvements/ holds every new best in order.
    assert yaml.safe_load((tmp_path / "run" / BEST_CONFIG).read_text()) == best.recipe
    improvements = sorted((tmp_path / "run" / "improvements").iterdir())
    scores = [float(p.read_text().splitlines()[0].rsplit(" ", 1)[1]) for p in improvements]
    assert scores == sorted(scores) and scores[-1] == best.objective_search
    shown = run_cli("runs", "show", str(tmp_path / "run"), "--plot", str(tmp_path / "progress.png"))
    assert shown.returncode == 0 and (tmp_path / "progress.png").stat().st_size > 1000
    best_dir = tmp_path / "best"
    assert run_cli("runs", "best", str(tmp_path / "run"), str(best_dir)).returncode == 0
    assert hashed_scores(best_dir, "search") == best.scores["search"]


def test_failed_candidates_get_the_worst_score(family, tmp_path):
    base, pool = family
    calls = {"n": 0}

    def flaky(model: str, split: str) -> dict[str, float]:
        calls["n"] += 1
        if "/scratch/" in model and calls["n"] % 3 == 0:
            raise RuntimeError("evaluator crashed")
        return hashed_scores(model, split)

    run = evo.evolve(search_config(base, pool), tmp_path / "run", evaluator=flaky)
    failed = [c for c in run.candidates if c.status == "failed"]
    assert failed and all("evaluator crashed" in (c.error or "") for c in failed)
    from cmaes import CMA

    searched = [c for c in run.candidates if c.role == "search"]
    popsize = default_popsize(6)
    optimizer = CMA(mean=np.full(6, 1 / 3), sigma=1 / 6, seed=3, population_size=popsize)
    for generation in range(1, max(c.generation for c in searched) + 1):
        members = [c for c in searched if c.generation == generation]
        seen = [c.objective_search for c in searched if c.generation <= generation and c.status == "done"]
        asked = [optimizer.ask() for _ in members]
        assert all(np.array_equal(x, np.asarray(c.genes)) for x, c in zip(asked, members, strict=True))
        told = [c.objective_search if c.status == "done" else min(seen) for c in members]
        optimizer.tell([(x, -v) for x, v in zip(asked, told, strict=True)])


def test_mergekit_evolve_config_runs_unchanged(family, tmp_path, monkeypatch):
    """mergekit-evolve's own format (genome + lm-eval tasks) through the lm_eval evaluator; a stand-in
    lm_eval scores the model the harness would load."""
    base, pool = family
    seen: list[dict[str, Any]] = []

    def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs)
        model = dict(a.split("=", 1) for a in kwargs["model_args"].split(","))["pretrained"]
        scores = hashed_scores(model, "search")
        return {"results": {"task_a": {"acc,none": scores["alpha"]}, "task_b": {"f1,none": scores["beta"]}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    text = f"""genome:
    models:
      - {pool[0]}
      - {pool[1]}
      - {pool[2]}
    merge_method: dare_ties
    base_model: {base}
    layer_granularity: 1
    normalize: false
    allow_negative_weights: false
    smooth: false
    filters:
      - self_attn
tasks:
  - name: task_a
    weight: 2.0
  - name: task_b
    metric: "f1,none"
limit: 10
num_fewshot: 0
"""
    path = tmp_path / "mergekit-evolve.yml"
    path.write_text(text)
    # The stand-in has only simple_evaluate: lm-eval's model is built by it (not kept resident).
    run = evo.evolve(path, tmp_path / "run", resident=False)
    searched = [c for c in run.candidates if c.role == "search"]
    assert searched and all(c.status == "done" for c in searched)
    # 2 layers x 3 models x 2 filter sets x (weight, density): the default budget of 100
    assert len(searched) == (100 // default_popsize(24)) * default_popsize(24)
    recipe = searched[0].recipe
    assert recipe is not None and recipe["merge_method"] == "dare_ties" and recipe["dtype"] == "bfloat16"
    assert recipe["parameters"] == {"normalize": False, "int8_mask": True}
    assert seen[0]["limit"] == 10 and seen[0]["num_fewshot"] == 0 and seen[0]["tasks"] == ["task_a", "task_b"]
    c = searched[0]
    weighted = (2.0 * c.scores["search"]["task_a"] + c.scores["search"]["task_b"]) / 3.0
    assert c.objective_search == pytest.approx(weighted)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"genome": {"layer_granularity": 3}}, "2 layers are not divisible by 3"),
        ({"genome": {"merge_method": "karcher"}}, "is not a genome method"),
        ({"genome": {"filters": ["cross_attn"]}}, "'cross_attn' matches no tensor"),
        ({"genome": {"merge_method": "slerp", "layer_granularity": 1}}, "slerp genome with 2 layer groups"),
        ({"shuffle": True, "tasks": ["x"], "evaluator": None}, "shuffle: true is not supported"),
        ({"wandb": True}, "unknown key"),
        ({"cmaes": {"max_evals": 3}}, "less than one population"),
    ],
)
def test_search_refusals(family, tmp_path, change, message):
    base, pool = family
    config = search_config(base, pool)
    for key, value in change.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    done = run_cli(
        "evolve",
        str(write_config(tmp_path / "s.yml", **config)),
        str(tmp_path / "run"),
        env={"PYTHONPATH": str(Path(__file__).parent)},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_ray_unreachable_is_one_line_and_starts_nothing(family, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'modelkin[ray]')")
    base, pool = family
    path = write_config(tmp_path / "s.yml", **search_config(base, pool))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import modelkin.cli as m; m.main()",
            "evolve",
            str(path),
            str(tmp_path / "run"),
            "--ray",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot reach a Ray cluster" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "run").exists()

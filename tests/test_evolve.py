"""The evolution loop end to end: topk with kinship exploration and greedy soup, through the Python
API and the CLI, on real safetensors checkpoints and real evaluator processes."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import modelkin.evolve as evo
from evolve_support import command_evaluator, hashed_scores, small_family, write_config
from modelkin.evolve.store import STORE_NAME
from modelkin.io.safetensors import load_model
from modelkin.testing import run_cli


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return small_family(tmp_path / "fam")


def topk_config(base: Path, pool: list[Path], **topk: object) -> dict[str, object]:
    settings = {"k": 3, "generations": 4, "explore": "kinship", "stop_kinship": None, "patience": 3, **topk}
    return {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": settings,
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        "evaluator": {"python": "evolve_support:hashed_scores"},
    }


def test_topk_follows_algorithm_1(family, tmp_path):
    base, pool = family
    run = evo.evolve(topk_config(base, pool), tmp_path / "run")
    by_id = {c.id: c for c in run.candidates}
    gen1 = [c for c in run.candidates if c.generation == 1]
    # Generation 1 merges every pair of the pool, and nothing else.
    pool_ids = {c.id for c in run.candidates if c.role == "pool"}
    assert sorted(tuple(sorted(c.parents)) for c in gen1) == sorted((a, b) for a in pool_ids for b in pool_ids if a < b)
    assert all(c.role == "merge" for c in gen1)
    tops = dict(run.generations)
    merged_before: set[tuple[int, int]] = {tuple(sorted(c.parents)) for c in gen1}  # type: ignore[misc]
    for gen in range(2, max(c.generation for c in run.candidates) + 1):
        children = [c for c in run.candidates if c.generation == gen]
        top = list(tops[gen - 1])
        merges = [c for c in children if c.role == "merge"]
        expected = {tuple(sorted((a, b))) for i, a in enumerate(top) for b in top[i + 1 :]} - merged_before
        assert {tuple(sorted(c.parents)) for c in merges} == expected
        explore = [c for c in children if c.role == "explore"]
        assert len(explore) <= 1
        for c in explore:
            best = top[0]
            assert best in c.parents
            partner = next(p for p in c.parents if p != best)
            # the partner is the least related model the best was not merged with yet
            taken = merged_before | expected
            options = [
                o.id
                for o in run.candidates
                if o.role != "base"
                and o.status == "done"
                and o.generation < gen
                and o.id != best
                and tuple(sorted((best, o.id))) not in taken
            ]
            pcc = {o: run.kinship_pairs[tuple(sorted((best, o)))]["pcc"] for o in options}  # type: ignore[index]
            assert pcc[partner] == min(pcc.values())
        merged_before |= {tuple(sorted(c.parents)) for c in children}  # type: ignore[misc]
    # Every score is the evaluator's, every objective the mean of the tasks.
    for c in run.candidates:
        assert c.status == "done"
        scores = hashed_scores(c.path, "search")  # type: ignore[arg-type]
        assert c.scores["search"] == scores
        assert c.objective_search == pytest.approx(sum(scores.values()) / 2)
    best = run.best
    assert best is not None and best.objective_test is not None
    assert best.objective_search == max(c.objective_search for c in run.candidates if c.role != "base")
    # The kinship of each merge's parents was measured by modelkin's own pass and stored.
    for c in run.candidates:
        if len(c.parents) == 2:
            pair = run.kinship_pairs[tuple(sorted(c.parents))]  # type: ignore[index]
            direct = __import__("modelkin").kinship(by_id[c.parents[0]].path, by_id[c.parents[1]].path, base=base)
            assert pair["pcc"] == pytest.approx(direct.pcc, rel=1e-12)


def test_merged_child_matches_its_stored_recipe(family, tmp_path):
    base, pool = family
    run = evo.evolve(topk_config(base, pool, generations=2), tmp_path / "run")
    child = next(c for c in run.candidates if c.generation == 2)
    assert child.recipe is not None
    recipe = tmp_path / "again.yml"
    recipe.write_text(json.dumps(child.recipe))
    done = run_cli("merge", str(recipe), str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr
    ours, again = load_model(child.path), load_model(tmp_path / "again")  # type: ignore[arg-type]
    assert ours.keys() == again.keys()
    for name in ours:
        assert np.array_equal(ours[name], again[name])


def test_stop_rules(family, tmp_path):
    base, pool = family
    # Kinship: every pair above -1 saturates at once (generation 2 never runs).
    run = evo.evolve(topk_config(base, pool, stop_kinship=-1.0, generations=5), tmp_path / "a")
    assert "kinship" in (run.stop_reason or "")
    assert max(c.generation for c in run.candidates) == 1
    # Generations run out.
    run = evo.evolve(topk_config(base, pool, generations=1), tmp_path / "b")
    assert run.stop_reason == "1 generations done"
    # Plain topk (no exploration) stops when nothing new is left among the top k.
    run = evo.evolve(topk_config(base, pool, explore="none", generations=30, patience=30), tmp_path / "c")
    assert run.stop_reason in ("every pair of the top k is merged already",) or "unchanged" in (run.stop_reason or "")
    assert not any(c.role == "explore" for c in run.candidates)


def test_greedy_soup(family, tmp_path):
    base, pool = family
    config = {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "greedy_soup",
        "merge": {"merge_method": "linear", "dtype": "float32"},
        "evaluator": {"python": "evolve_support:hashed_scores"},
    }
    run = evo.evolve(config, tmp_path / "soup")
    pool_c = sorted((c for c in run.candidates if c.role == "pool"), key=lambda c: (-c.objective_search, c.id))
    uniform = next(c for c in run.candidates if c.role == "uniform_soup")
    assert set(uniform.parents) == {c.id for c in pool_c}
    # Replay Wortsman's procedure from the stored scores.
    soup, score = [pool_c[0].id], pool_c[0].objective_search
    for ingredient in pool_c[1:]:
        trial = next(c for c in run.candidates if c.role == "soup" and list(c.parents) == [*soup, ingredient.id])
        if trial.objective_search >= score:
            soup, score = list(trial.parents), trial.objective_search
    best = run.best
    assert best is not None
    assert list(best.parents or [best.id]) == soup
    assert best.objective_test is not None and uniform.objective_test is not None
    # The soup is the uniform average of its ingredients.
    if len(best.parents) > 1:
        tensors = [load_model(run.candidate(p).path) for p in best.parents]  # type: ignore[arg-type]
        merged = load_model(best.path)  # type: ignore[arg-type]
        for name, value in merged.items():
            expect = np.mean([t[name].astype(np.float64) for t in tensors], axis=0)
            np.testing.assert_allclose(value, expect, rtol=1e-6, atol=1e-7)


def test_cli_run_show_tree_best(family, tmp_path):
    base, pool = family
    config = topk_config(base, pool, generations=3)
    config["evaluator"] = {"command": command_evaluator()}
    path = write_config(tmp_path / "evolve.yml", **config)
    run_dir = tmp_path / "runs" / "exp1"
    done = run_cli("evolve", str(path), str(run_dir))
    assert done.returncode == 0, done.stderr
    assert "best:" in done.stdout
    shown = run_cli("runs", "show", str(run_dir), "--json", "--plot", str(tmp_path / "progress.png"))
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["strategy"] == "topk" and isinstance(data["best"], int)
    keys = {"id", "generation", "parents", "recipe", "status", "scores", "objective", "kinship", "error"}
    for c in data["candidates"]:
        assert keys <= set(c)
        assert c["status"] == "done"
        assert set(c["objective"]) == {"search", "test"}
        if c["generation"] == 0:
            assert c["parents"] == [] and c["recipe"] is None
        else:
            assert len(c["parents"]) == 2 and c["recipe"]["merge_method"] == "slerp"
    assert (tmp_path / "progress.png").stat().st_size > 1000
    tree = run_cli("runs", "tree", str(run_dir), "--plot", str(tmp_path / "tree.png"))
    assert tree.returncode == 0 and "best" in tree.stdout
    assert (tmp_path / "tree.png").stat().st_size > 1000
    best = run_cli("runs", "best", str(run_dir), str(tmp_path / "best"))
    assert best.returncode == 0, best.stderr
    card = (tmp_path / "best" / "README.md").read_text()
    assert "## Lineage (modelkin evolve)" in card and "slerp" in card
    lineage = json.loads((tmp_path / "best" / "modelkin_lineage.json").read_text())
    assert lineage[-1]["id"] == data["best"]
    assert {c["id"] for c in lineage} >= set(next(c for c in data["candidates"] if c["id"] == data["best"])["parents"])
    # The store is a plain SQLite database in WAL mode.
    db = sqlite3.connect(run_dir / STORE_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_keep_top_prunes_and_best_remakes(family, tmp_path):
    base, pool = family
    config = {**topk_config(base, pool, generations=3), "keep": "top"}
    run = evo.evolve(config, tmp_path / "run")
    top = set(run.generations[-1][1])
    for c in run.candidates:
        if c.recipe is not None:
            assert Path(c.path).exists() == (c.id in top), c.id  # type: ignore[arg-type]
    # A pruned model is re-made from its recipe, bit for bit.
    from modelkin.evolve.report import write_best

    pruned = next(c for c in run.candidates if c.recipe is not None and c.id not in top)
    forced = type(run)(**{**run.__dict__, "best_id": pruned.id})
    write_best(forced, tmp_path / "remade")
    assert hashed_scores(tmp_path / "remade", "search") == pruned.scores["search"]


def test_resume_after_completion_evaluates_nothing(family, tmp_path):
    base, pool = family
    calls: list[tuple[str, str]] = []

    def counting(model: str, split: str) -> dict[str, float]:
        calls.append((model, split))
        return hashed_scores(model, split)

    config = topk_config(base, pool, generations=2)
    first = evo.evolve(config, tmp_path / "run", evaluator=counting)
    n = len(calls)
    again = evo.evolve(config, tmp_path / "run", evaluator=counting)
    assert len(calls) == n
    assert [c.key for c in again.candidates] == [c.key for c in first.candidates]
    assert len(set(calls)) == len(calls)


def test_bundled_task_family_evolves(tmp_path):
    """The shipped family, its shipped configs, the numpy evaluator: merging beats every input."""
    done = run_cli("example", "--tasks", str(tmp_path / "tasks"))
    assert done.returncode == 0, done.stderr
    root = tmp_path / "tasks"
    run = evo.evolve(root / "evolve.yml", tmp_path / "topk")
    best = run.best
    assert best is not None and best.objective_test is not None
    assert best.objective_test > run.base.objective_test  # type: ignore[operator]
    for c in run.candidates:
        if c.role == "pool":
            assert c.objective_test is not None and best.objective_test > c.objective_test
    soup = evo.evolve(root / "soup.yml", tmp_path / "soup")
    uniform = next(c for c in soup.candidates if c.role == "uniform_soup")
    assert soup.best is not None and soup.best.objective_test is not None
    assert soup.best.objective_search >= uniform.objective_search  # type: ignore[operator]
    assert not math.isnan(soup.best.objective_test)


def test_modelkin_evolve_is_callable(family, tmp_path):
    import modelkin

    base, pool = family
    run = modelkin.evolve(topk_config(base, pool, generations=1), tmp_path / "run")
    assert isinstance(run, modelkin.evolve.Run) and run.best is not None
    assert run.tree()["nodes"] and run.candidates == modelkin.evolve.open_run(tmp_path / "run").candidates

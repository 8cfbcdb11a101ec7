"""The evolution config's validation and the strategies' selection rules, in isolation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modelkin.evolve import strategies
from modelkin.evolve.config import load_evolve_config
from modelkin.evolve.evaluators import EvaluationError, ObjectiveError, check_scores, objective
from modelkin.evolve.recipes import pair_recipe, soup_recipe
from modelkin.evolve.store import Candidate
from modelkin.merge.recipe import RecipeError, load_config


def cand(id: int, score: float | None, parents: tuple[int, ...] = (), status: str = "done") -> Candidate:
    return Candidate(id, f"k{id}", 0, "pool", parents, None, None, status, None, {}, score, None, None, None, None)


BASE = {"pool": ["a", "b"], "base_model": "z", "evaluator": {"command": "e {model}"}}


def test_rank_breaks_ties_by_age_and_skips_unscored():
    ranked = strategies.rank([cand(3, 0.5), cand(1, 0.5), cand(2, 0.9), cand(4, None, status="failed")])
    assert [c.id for c in ranked] == [2, 1, 3]


def test_topk_pairs_skip_merged():
    top = [cand(1, 0.9), cand(2, 0.8), cand(3, 0.7)]
    assert strategies.topk_pairs(top, {(1, 2)}) == [(1, 3), (2, 3)]


def test_explore_partner_is_least_related():
    best = cand(1, 0.9)
    others = [cand(2, 0.8), cand(3, 0.7), cand(4, 0.6)]
    pcc = {(1, 2): 0.9, (1, 3): 0.1, (1, 4): math.nan}
    chosen = strategies.explore_partner(best, others, set(), lambda a, b: pcc[(a, b)], "pcc")
    assert chosen is not None and chosen.id == 3
    # ed is a distance: the least related is the farthest.
    ed = {(1, 2): 5.0, (1, 3): 1.0, (1, 4): 2.0}
    chosen = strategies.explore_partner(best, others, set(), lambda a, b: ed[(a, b)], "ed")
    assert chosen is not None and chosen.id == 2
    assert strategies.explore_partner(best, others, {(1, 2), (1, 3), (1, 4)}, lambda a, b: 0.0, "pcc") is None


def test_kinship_saturation_and_patience():
    top = [cand(1, 0.9), cand(2, 0.8), cand(3, 0.7)]
    assert strategies.kinship_saturated(top, lambda a, b: 0.95, "pcc", 0.9)
    assert not strategies.kinship_saturated(top, lambda a, b: 0.95 if a == 1 else 0.5, "pcc", 0.9)
    assert not strategies.kinship_saturated(top, lambda a, b: math.nan, "pcc", 0.9)
    assert strategies.kinship_saturated(top, lambda a, b: 0.01, "ed", 0.1)
    assert not strategies.unchanged_for([[1, 2, 3]], 1)
    assert strategies.unchanged_for([[1, 2, 3], [3, 2, 1]], 1)
    assert not strategies.unchanged_for([[1, 2, 4], [1, 2, 3], [1, 2, 3]], 2)
    assert strategies.unchanged_for([[1, 2, 3], [1, 2, 3], [1, 2, 3]], 2)


def test_soup_rule():
    assert strategies.soup_accepts(0.5, 0.5, ">=")
    assert not strategies.soup_accepts(0.5, 0.5, ">")
    assert not strategies.soup_accepts(0.4, 0.5, ">=")


def test_objective_and_scores():
    assert objective({"a": 1.0, "b": 0.0}, None) == 0.5
    assert objective({"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 1.0}) == 0.75
    assert objective({"acc": 0.5, "ppl": 2.0}, {"acc": 1.0, "ppl": -1.0}) == (0.5 - 2.0) / 2
    with pytest.raises(ObjectiveError, match="'c'"):
        objective({"a": 1.0}, {"c": 1.0})
    for bad in ({}, [], {"a": "x"}, {"a": math.nan}, {"a": math.inf}, {"a": True}):
        with pytest.raises(EvaluationError):
            check_scores(bad, "test")


def test_recipes_are_valid_mergekit_recipes():
    for method, params in (
        ("slerp", {"t": 0.5}),
        ("linear", {}),
        ("task_arithmetic", {}),
        ("ties", {"density": 0.5}),
        ("dare_ties", {"density": 0.5, "weight": 0.7}),
    ):
        merge = {"merge_method": method, "parameters": params, "dtype": "float32"}
        recipe = pair_recipe(merge, "/a", "/b", "/z")
        config = load_config(recipe)
        assert config.method.name == method
        if method == "slerp":
            assert recipe["base_model"] == "/a"
        elif config.method.needs_base:
            assert recipe["base_model"] == "/z"
    soup = soup_recipe({"merge_method": "linear"}, ["/a", "/b", "/c"])
    assert [m["parameters"]["weight"] for m in soup["models"]] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": "cmaes"}, "pool:"),
        ({"strategy": "cmaes", "pool": None, "base_model": None}, "needs a genome"),
        ({"strategy": "topk", "genome": {"models": ["a", "b"], "merge_method": "linear"}}, "for strategy cmaes"),
        ({"strategy": "random"}, "not one of topk, greedy_soup, cmaes"),
        ({"pool": ["a"]}, "at least two"),
        ({"pool": ["a", "a"]}, "twice"),
        ({"base_model": None}, "base_model"),
        ({"colour": "red"}, "unknown key"),
        ({"topk": {"k": 1}}, "integer >= 2"),
        ({"topk": {"explore": "random"}}, "not one of kinship, none"),
        ({"topk": {"metric": "kl"}}, "not one of pcc, cs, ed"),
        ({"topk": {"stop_kinship": "high"}}, "a number or null"),
        ({"greedy_soup": {"compare": ">="}}, "strategy is topk"),
        ({"merge": {"merge_method": "frobnicate"}}, "unknown merge_method"),
        ({"merge": {"merge_method": "model_stock"}}, "not a two-parent merge"),
        ({"merge": {"merge_method": "slerp", "models": []}}, "unknown key"),
        ({"evaluator": {}}, "exactly one of"),
        ({"evaluator": {"command": "run it"}}, "{model}"),
        ({"evaluator": {"python": "nomodule"}}, "module:function"),
        ({"evaluator": {"command": "e {model}", "timeout": -1}}, "positive"),
        ({"evaluator": {"lm_eval": {"tasks": []}}}, "non-empty list"),
        ({"evaluator": {"lm_eval": {"tasks": ["x"], "fewshot": 5}}}, "unknown key"),
        ({"objective": {"weights": {"a": "x"}}}, "must be a number"),
        ({"objective": {"weights": {"a": 0}}}, "every weight is zero"),
        ({"objective": {"target": 1}}, "unknown key"),
        ({"keep": "some"}, "not one of all, top"),
        ({"max_failures": 0}, "integer >= 1"),
    ],
)
def test_config_refuses_with_the_key(change, message):
    config = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(RecipeError, match=None) as error:
        load_evolve_config(config)
    assert message in str(error.value)


def test_greedy_soup_refuses_other_methods_and_weights():
    soup = {**BASE, "strategy": "greedy_soup"}
    with pytest.raises(RecipeError, match="must be linear"):
        load_evolve_config({**soup, "merge": {"merge_method": "slerp"}})
    with pytest.raises(RecipeError, match="remove weight"):
        load_evolve_config({**soup, "merge": {"merge_method": "linear", "parameters": {"weight": 2}}})


def test_config_defaults_and_fingerprint(tmp_path: Path):
    config = load_evolve_config(BASE)
    assert config.strategy == "topk" and config.topk.k == 3 and config.topk.explore == "kinship"
    assert config.merge["merge_method"] == "slerp" and config.merge["parameters"] == {"t": 0.5}
    assert config.topk.stop_kinship == 0.9
    # Comments do not change the experiment; a value does.
    a = tmp_path / "a.yml"
    a.write_text("pool: [a, b]\nbase_model: z\nevaluator: {command: 'e {model}'}\n")
    b = tmp_path / "b.yml"
    b.write_text("# my run\npool: [a, b]\nbase_model: z\nevaluator: {command: 'e {model}'}\n")
    assert load_evolve_config(a).fingerprint == load_evolve_config(b).fingerprint
    assert load_evolve_config({**BASE, "seed": 1}).fingerprint != load_evolve_config(BASE).fingerprint

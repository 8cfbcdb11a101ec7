"""Turning a strategy's choice of parents into a mergekit recipe (the config's ``merge:`` section
with the models filled in), stored with the candidate so ``modelkin merge`` can re-make it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..merge.recipe import METHODS


def pair_recipe(merge: Mapping[str, Any], a: str, b: str, base: str) -> dict[str, Any]:
    """The recipe merging parents ``a`` and ``b`` (paths). slerp takes ``a`` (the better-ranked
    parent) as its t=0 end, as mergekit's slerp takes its base_model; task-vector methods measure both
    parents' deltas against the run's base; linear and the other base-free methods average them."""
    recipe: dict[str, Any] = {k: v for k, v in merge.items() if k != "parameters"}
    parameters = dict(merge.get("parameters") or {})
    method = METHODS[str(merge["merge_method"])]
    if method.name == "slerp":
        recipe["base_model"] = a
        recipe["models"] = [{"model": a}, {"model": b}]
    else:
        weighted = "weight" in method.required_tensor and "weight" not in parameters
        entry = {"parameters": {"weight": 1.0}} if weighted else {}
        recipe["models"] = [{"model": a, **entry}, {"model": b, **entry}]
        if method.needs_base or method.name in ("nuslerp", "multislerp"):
            recipe["base_model"] = base
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def soup_recipe(merge: Mapping[str, Any], ingredients: Sequence[str]) -> dict[str, Any]:
    """The uniform average of ``ingredients`` (linear, weight 1 each, normalised)."""
    recipe: dict[str, Any] = {k: v for k, v in merge.items() if k != "parameters"}
    recipe["models"] = [{"model": m, "parameters": {"weight": 1.0}} for m in ingredients]
    if merge.get("parameters"):
        recipe["parameters"] = dict(merge["parameters"])
    return recipe

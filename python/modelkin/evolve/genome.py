"""mergekit-evolve's genome: per-layer-group, per-model, per-filter merge parameters as one flat
vector for CMA-ES, turned into a mergekit recipe per candidate.

Semantics follow mergekit's ``mergekit/evo/genome.py``: the genotype has shape (layer groups, models,
filter sets + 1, parameters of the method); weight comes first, then density; densities are |x|
clamped to [0, 1]; weights and t are |x| unless ``allow_negative_weights``; ``normalize`` defaults to
true for linear, ties and dare_ties; ``smooth`` writes each parameter as a gradient across the layer
groups instead of one slice per group; slerp takes the two models with the largest weight genes and
t = softmax of those two weights, second entry. The starting point is weight 1/n, density 1."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..merge.recipe import METHODS

# Parameters each genome method searches, weight first (mergekit's METHOD_PARAM_MAPS, plus the
# sparsifying methods the evolution issue lists).
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "breadcrumbs_ties": ("weight", "density"),
    "della": ("weight", "density"),
    "slerp": ("t",),
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della")
# della keeps entries with probability density ± epsilon (its default 0.15), which must stay in (0, 1).
_DELLA_MARGIN = 0.15 + 1e-6


@dataclass(frozen=True)
class GenomeSpec:
    """The ``genome:`` section (mergekit-evolve's keys, plus ``dtype``: the merge arithmetic)."""

    models: tuple[str, ...]
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: tuple[str, ...] = ()
    smooth: bool = False
    dtype: str = "bfloat16"
    # "adapter": every model a LoRA adapter, each candidate written as one (kilobytes, not a model).
    out_format: str = "model"


class Genome:
    """A genome over concrete model paths and a layer count."""

    def __init__(self, spec: GenomeSpec, layers: int, models: Sequence[str], base: str | None) -> None:
        self.spec = spec
        self.layers = layers
        self.models = list(models)
        self.base = base
        self.params = METHOD_PARAMS[spec.merge_method]
        self.groups = layers // spec.layer_granularity if spec.layer_granularity > 0 else 1
        self.sets = len(spec.filters) + 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.groups, len(self.models), self.sets, len(self.params))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def initial(self, random: bool = False, seed: int = 0) -> npt.NDArray[np.float64]:
        """mergekit-evolve's start: weight 1/n and density 1 (or uniform [0, 1) with ``random``)."""
        if random:
            return np.random.default_rng(seed).random(self.size)
        x = np.zeros(self.shape)
        x[..., 0] = 1.0 / len(self.models)
        x[..., 1:] = 1.0
        return x.reshape(-1)

    def values(self, x: Sequence[float] | npt.NDArray[np.float64]) -> dict[str, npt.NDArray[np.float64]]:
        """Each parameter's values, shape (groups, models, sets), with the genome's clamping."""
        genotype = np.asarray(x, dtype=np.float64).reshape(self.shape)
        out = {}
        for i, param in enumerate(self.params):
            values = genotype[..., i]
            if param == "density":
                values = np.clip(np.abs(values), 0.0, 1.0)
                if self.spec.merge_method == "della":
                    values = np.clip(values, _DELLA_MARGIN, 1.0 - _DELLA_MARGIN)
            elif not self.spec.allow_negative_weights:
                values = np.abs(values)
            out[param] = values
        return out

    def recipe(self, x: Sequence[float] | npt.NDArray[np.float64]) -> dict[str, Any]:
        """The mergekit recipe a genotype stands for (models named by path)."""
        spec = self.spec
        recipe: dict[str, Any] = {"merge_method": spec.merge_method}
        if spec.out_format == "adapter":
            recipe["out_format"] = "adapter"
        else:
            recipe["dtype"] = spec.dtype
        if spec.merge_method == "slerp":
            return {**recipe, **self._slerp(np.asarray(x, dtype=np.float64).reshape(self.shape))}
        values = self.values(x)
        normalize = (
            spec.normalize if spec.normalize is not None else spec.merge_method in ("ties", "dare_ties", "linear")
        )
        declared = METHODS[spec.merge_method].global_defaults
        parameters: dict[str, Any] = {}
        if "normalize" in declared:
            parameters["normalize"] = normalize
        if "int8_mask" in declared:
            parameters["int8_mask"] = True
        if parameters:
            recipe["parameters"] = parameters
        if self.base is not None:
            recipe["base_model"] = self.base
        if spec.tokenizer_source is not None:
            recipe["tokenizer_source"] = spec.tokenizer_source
        if spec.smooth:
            recipe["models"] = self._smooth(values)
        else:
            recipe["slices"] = self._slices(values)
        return recipe

    def _value(self, values: npt.NDArray[np.float64], sets: bool) -> Any:
        """One parameter of one model: a number (or a gradient) per filter set."""
        if not sets:
            v = values[..., 0]
            return float(v) if np.ndim(v) == 0 else [float(a) for a in v]
        filters: list[str | None] = [*self.spec.filters, None]
        out = []
        for i, pattern in enumerate(filters):
            v = values[..., i]
            out.append({"filter": pattern, "value": float(v) if np.ndim(v) == 0 else [float(a) for a in v]})
        return out

    def _slices(self, values: dict[str, npt.NDArray[np.float64]]) -> list[dict[str, Any]]:
        step = self.spec.layer_granularity if self.spec.layer_granularity > 0 else self.layers
        slices = []
        for g in range(self.groups):
            span = [g * step, (g + 1) * step]
            sources: list[dict[str, Any]] = []
            for m, model in enumerate(self.models):
                params = {p: self._value(v[g, m], self.sets > 1) for p, v in values.items()}
                sources.append({"model": model, "layer_range": span, "parameters": params})
            if self.base is not None and self.base not in self.models:
                sources.append({"model": self.base, "layer_range": span})
            slices.append({"sources": sources})
        return slices

    def _smooth(self, values: dict[str, npt.NDArray[np.float64]]) -> list[dict[str, Any]]:
        filters: list[str | None] = [*self.spec.filters, None]
        models: list[dict[str, Any]] = []
        for m, model in enumerate(self.models):
            params: dict[str, Any] = {}
            for p, v in values.items():
                per_model = v[:, m]  # (groups, sets): each set's values are a gradient over the groups
                gradients = [_single([float(a) for a in per_model[:, i]]) for i in range(self.sets)]
                if self.sets > 1:
                    params[p] = [{"filter": f, "value": g} for f, g in zip(filters, gradients, strict=True)]
                else:
                    params[p] = gradients[0]
            models.append({"model": model, "parameters": params})
        if self.base is not None and self.base not in self.models:
            models.append({"model": self.base})
        return models

    def _slerp(self, genotype: npt.NDArray[np.float64]) -> dict[str, Any]:
        # One layer group only (checked when the genome is built): modelkin's slices share one
        # base model, while slerp's t=0 end is chosen per group.
        weights = genotype[0, :, 0, 0]
        order = np.argsort(-weights, kind="stable")[:2]
        chosen = weights[order]
        t = float(np.exp(chosen[1] - np.logaddexp(chosen[0], chosen[1])))
        first, second = self.models[int(order[0])], self.models[int(order[1])]
        recipe: dict[str, Any] = {
            "base_model": first,
            "models": [{"model": first}, {"model": second}],
            "parameters": {"t": t},
        }
        if self.spec.tokenizer_source is not None:
            recipe["tokenizer_source"] = self.spec.tokenizer_source
        return recipe


def _single(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values

"""The data-flow-space genome (Akiba et al. 2024, "DFS"): which layers of which model a token passes
through, in order, and how the input of each hop is scaled, as one flat vector for CMA-ES. Every
genotype becomes an ordinary mergekit ``passthrough`` recipe of one-layer slices whose scales are
folded into the weights, so a candidate is a standard checkpoint of the source architecture.

**Slots.** The source models' layers laid out in model order (A's, then B's, ...), M in all, are
repeated ``repeats`` times: T = M·r slots, one gene each; a slot is on the path iff its gene is > 0,
so the path keeps the slots' order (no permutations). The path always starts with A's first layer
and ends with A's last (A supplies the embeddings, final norm, head, tokenizer and config): where the
genes leave either out, it is added at that end. The start: A's first repetition on (mean +2 sigma), every
other slot at 0 (off), scales 1 — exactly model A.

**Scales.** Hop t (t ≥ 2) gets the factor s_t: ``scaling: matrix`` reads W[i, j] (i the global index
of hop t-1's layer, j hop t's; M² genes, shared across repetitions: the paper's W), ``slot`` one gene
per slot, ``none`` 1. A gene g gives s = exp(clip(g, -2, 2)): positive, within [e⁻², e²]. The first
hop is fed A's own embeddings: its scale is 1 (W has no row for the embeddings).

**Folding the scales into standard weights** (pre-norm models: RMSNorm or LayerNorm before each
sublayer and before the head, so norm(c·x) = norm(x) for c > 0 when eps is 0):

- ``scale: residual`` — the residual stream entering hop t is multiplied by s_t. Let c_t = s_1···s_t
  and let the exported model divide hop t's output projections (``o_proj``, ``down_proj``, weights
  and biases) by c_t. Claim: the runtime-scaled stream h_t equals c_t·g_t, g_t the exported model's.
  Induction: h_t = c_t·g_{t-1} + F_t(c_t·g_{t-1}) with F_t the hop's two sublayer updates. Attention
  reads norm₁(c_t·g) = norm₁(g), so its update is c_t·a'(g), a' with o_proj/c_t; the MLP reads
  norm₂(c_t·g + c_t·a'(g)) = norm₂(g + a'(g)), so its update is c_t·m'(g), m' with down_proj/c_t.
  Hence h_t = c_t·(g_{t-1} + a' + m') = c_t·g_t, and the head reads norm(c_T·g_T) = norm(g_T): the
  same logits. With eps > 0, norm(c·x) uses eps/c² where the exported model uses eps: the only
  difference.
- ``scale: delta`` (Sakana's vLLM model) — only the previous hop's MLP output is multiplied by s_t as
  it enters hop t: h = x + s_t·m_{t-1}. That is linear in ``down_proj`` of hop t-1 (and its bias), so
  multiplying that hop's down_proj by s_t is the same model, exactly, eps or not.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Scaling = Literal["matrix", "slot", "none"]
ScaleMeaning = Literal["residual", "delta"]
SCALINGS: tuple[str, ...] = ("matrix", "slot", "none")
SCALE_MEANINGS: tuple[str, ...] = ("residual", "delta")
# The name a ps+dfs config gives its PS phase's best model in dfs.models.
PS_MODEL = "ps"
# |log scale| bound: scales stay within [e^-2, e^2] (and their running products finite).
LOG_SCALE_BOUND = 2.0
# model_type values whose layers are pre-norm with the output projections named below (the fold
# holds); any other architecture is refused by name.
OUTPUT_PROJECTIONS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
}


@dataclass(frozen=True)
class DfsSpec:
    """The ``dfs:`` section."""

    models: tuple[str, ...]
    repeats: int = 3
    scaling: Scaling = "matrix"
    scale: ScaleMeaning = "residual"
    dtype: str | None = None


@dataclass(frozen=True)
class Hop:
    """One layer on a path: ``model`` (index into the genome's models), its ``layer``, and the factor
    applied to the input at this hop in the run's meaning (1 for the first hop)."""

    model: int
    layer: int
    scale: float


class DfsGenome:
    """A DFS genome over concrete models (A first), each with its layer count."""

    def __init__(self, spec: DfsSpec, models: Sequence[str], layers: Sequence[int], model_type: str) -> None:
        self.spec = spec
        self.models = list(models)
        self.layers = list(layers)
        self.projections = OUTPUT_PROJECTIONS[model_type]
        self.offsets = [sum(self.layers[:m]) for m in range(len(self.layers))]
        self.total = sum(self.layers)  # M
        self.slots = self.total * spec.repeats  # T
        self.scale_genes = {"matrix": self.total**2, "slot": self.slots, "none": 0}[spec.scaling]

    @property
    def size(self) -> int:
        return self.slots + self.scale_genes

    def with_first(self, model: str) -> DfsGenome:
        """The same genome with A replaced (ps+dfs: A is the PS phase's best, of A's shape)."""
        other = copy.copy(self)
        other.models = [model, *self.models[1:]]
        return other

    def slot(self, index: int) -> tuple[int, int]:
        """(model, layer) of a slot."""
        flat = index % self.total
        model = max(m for m in range(len(self.offsets)) if self.offsets[m] <= flat)
        return model, flat - self.offsets[model]

    def initial(self, sigma: float) -> npt.NDArray[np.float64]:
        """A's first repetition on (at +2 sigma), every other slot off (0), every scale 1 (log 0)."""
        x = np.zeros(self.size)
        x[: self.layers[0]] = 2.0 * sigma
        return x

    def path(self, x: Sequence[float] | npt.NDArray[np.float64]) -> list[Hop]:
        """The hops a genotype stands for, A's first and last layers at the ends."""
        genes = np.asarray(x, dtype=np.float64)
        chosen: list[tuple[int, int, int | None]] = [(*self.slot(i), i) for i in range(self.slots) if genes[i] > 0]
        first, last = (0, 0), (0, self.layers[0] - 1)
        if not chosen or chosen[0][:2] != first:
            chosen.insert(0, (*first, None))
        if chosen[-1][:2] != last:
            chosen.append((*last, None))
        hops: list[Hop] = []
        for t, (model, layer, slot) in enumerate(chosen):
            scale = 1.0
            if t > 0:
                scale = self._scale(genes, chosen[t - 1], (model, layer), slot)
            hops.append(Hop(model, layer, scale))
        return hops

    def _scale(
        self,
        genes: npt.NDArray[np.float64],
        previous: tuple[int, int, int | None],
        here: tuple[int, int],
        slot: int | None,
    ) -> float:
        scaling = self.spec.scaling
        if scaling == "none":
            return 1.0
        if scaling == "matrix":
            i = self.offsets[previous[0]] + previous[1]
            j = self.offsets[here[0]] + here[1]
            gene = genes[self.slots + i * self.total + j]
        elif slot is None:  # an end added to the path has no slot of its own
            return 1.0
        else:
            gene = genes[self.slots + slot]
        return float(np.exp(np.clip(gene, -LOG_SCALE_BOUND, LOG_SCALE_BOUND)))

    def recipe(self, x: Sequence[float] | npt.NDArray[np.float64]) -> dict[str, Any]:
        """The passthrough recipe of a genotype's path, scales folded (see the module's docs)."""
        return path_recipe(self.path(x), self.models, self.projections, self.spec.scale, self.spec.dtype)


def folded(hops: Sequence[Hop], meaning: ScaleMeaning) -> list[tuple[float, float]]:
    """(attention output factor, MLP output factor) of each hop's exported weights."""
    if meaning == "delta":
        # Hop t's scale multiplies the MLP output of hop t-1: its down_proj carries it.
        return [(1.0, hops[t + 1].scale if t + 1 < len(hops) else 1.0) for t in range(len(hops))]
    out = []
    running = 1.0
    for hop in hops:
        running *= hop.scale
        out.append((1.0 / running, 1.0 / running))
    return out


def path_recipe(
    hops: Sequence[Hop], models: Sequence[str], projections: tuple[str, str], meaning: ScaleMeaning, dtype: str | None
) -> dict[str, Any]:
    """mergekit's passthrough recipe for a path: one single-layer slice per hop, each factor a
    ``scale`` filtered to the output projection it folds into (never an unfiltered scale other than
    1, which mergekit would apply to the embeddings or the head on the first or last slice)."""
    slices = []
    for hop, (attention, mlp) in zip(hops, folded(hops, meaning), strict=True):
        source: dict[str, Any] = {"model": models[hop.model], "layer_range": [hop.layer, hop.layer + 1]}
        if attention != 1.0 or mlp != 1.0:
            source["parameters"] = {
                "scale": [
                    {"filter": projections[0], "value": attention},
                    {"filter": projections[1], "value": mlp},
                    {"value": 1.0},
                ]
            }
        slices.append({"sources": [source]})
    recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe


def describe(hops: Sequence[Hop], models: Sequence[str]) -> list[dict[str, Any]]:
    """A path as ``runs show --json`` reports it."""
    return [{"model": models[h.model], "layer": h.layer, "scale": h.scale} for h in hops]

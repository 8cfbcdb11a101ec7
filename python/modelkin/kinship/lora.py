"""Kinship of LoRA adapters, exact from their factors, never materialising a ΔW.

With ΔW₁ = s₁B₁A₁ and ΔW₂ = s₂B₂A₂ (B: rows x r, A: r x cols), the statistics every metric comes from
are r x r products:

    Σ ΔW₁        = s₁ · (1ᵀB₁)(A₁1)
    Σ ΔW₁∘ΔW₁    = s₁² · tr((B₁ᵀB₁)(A₁A₁ᵀ))
    Σ ΔW₁∘ΔW₂    = s₁s₂ · tr((B₁ᵀB₂)(A₂A₁ᵀ))

and against a dense delta D (a full fine-tune's, or an adapter's ``modules_to_save`` tensor)
Σ (sBA)∘D = s · tr(Bᵀ·D·Aᵀ). A tensor an adapter does not target has a zero delta and counts in the
element total, so adapter kinship equals dense kinship of the materialised models (the same tensors,
each cut to the base's vocabulary rows, as the dense pass cuts them). Σ(a-b)² is Σa² + Σb² - 2Σab
here: on factors there is no element stream to accumulate it from directly. float64 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._core import open_model
from ..io.adapter import Adapter, LowRank, is_adapter, load_adapter
from ..io.errors import InvalidModelError
from ..io.safetensors import read_tensor

# A side's delta at one tensor: none (zero), low rank, or dense.
Delta = LowRank | np.ndarray | None


@dataclass
class Sums:
    """The sufficient statistics of one pair over some elements."""

    n: int = 0
    a: float = 0.0
    b: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0

    def add(self, other: Sums) -> None:
        self.n += other.n
        self.a += other.a
        self.b += other.b
        self.aa += other.aa
        self.bb += other.bb
        self.ab += other.ab

    def metric(self, name: str) -> float:
        if name == "ed":
            return math.sqrt(max(self.aa + self.bb - 2.0 * self.ab, 0.0))
        if name == "cs":
            denominator = math.sqrt(self.aa * self.bb)
            return self.ab / denominator if denominator > 0 else math.nan
        n = self.n
        cov = self.ab / n - (self.a / n) * (self.b / n)
        var_a = self.aa / n - (self.a / n) ** 2
        var_b = self.bb / n - (self.b / n) ** 2
        return cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan


def _sum(delta: Delta) -> float:
    if delta is None:
        return 0.0
    if isinstance(delta, LowRank):
        return float(delta.scale * (delta.left.sum(axis=0) @ delta.right.sum(axis=1)))
    return float(delta.sum())


def _dot(x: Delta, y: Delta) -> float:
    """Σ x∘y."""
    if x is None or y is None:
        return 0.0
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        return float(x.scale * y.scale * np.trace((x.left.T @ y.left) @ (y.right @ x.right.T)))
    if isinstance(x, LowRank):
        assert isinstance(y, np.ndarray)
        return float(x.scale * np.sum((x.left.T @ y) * x.right))
    if isinstance(y, LowRank):
        return _dot(y, x)
    return float(np.sum(x * y))


@dataclass(frozen=True)
class Side:
    """One model of a pair: an adapter (factors), or a full model directory (dense deltas)."""

    adapter: Adapter | None
    path: Path

    def delta(self, name: str, rows: int, base: Path) -> Delta:
        if self.adapter is None:
            values, _ = read_tensor(self.path, name)
            reference, _ = read_tensor(base, name)
            return values[:rows] - reference[:rows]
        found = self.adapter.low_rank.get(name)
        if name in self.adapter.replaced:
            # Stored whole (modules_to_save, or a targeted embedding's saved base layer): dense,
            # with the factors' delta on top when the tensor is targeted too.
            reference, _ = read_tensor(base, name)
            dense = self.adapter.replaced[name][:rows] - reference[:rows]
            return dense if found is None else dense + found.rows(rows).dense()
        return None if found is None else found.rows(rows)


def side(path: str | Path) -> Side:
    """A model of a pair, read as an adapter when it is one."""
    return Side(load_adapter(path) if is_adapter(path) else None, Path(path))


def pair_sums(a: Side, b: Side, base: str | Path) -> list[tuple[str, Sums]]:
    """Per base tensor (in storage order), the pair's statistics over its vocabulary-cut elements."""
    base_path = Path(base)
    tensors = open_model(base_path).tensors()
    names = [name for name, _, _ in tensors]
    vocab = next((s[0] for n, s, _ in tensors if n == "lm_head.weight"), None)
    if vocab is None:
        vocab = next((s[0] for n, s, _ in tensors if n.endswith("embed_tokens.weight")), None)
    for adapter in (a.adapter, b.adapter):
        if adapter is None:
            continue
        for name in [*adapter.low_rank, *adapter.replaced]:
            if name not in names:
                raise InvalidModelError(f"{adapter.path}: targets {name}, which the base {base_path} does not have")
    out = []
    for name, shape, _ in tensors:
        rows = min(shape[0], vocab) if shape and vocab is not None else (shape[0] if shape else 1)
        cut = [rows, *shape[1:]] if shape else []
        for adapter in (a.adapter, b.adapter):
            found = adapter.low_rank.get(name) if adapter is not None else None
            if adapter is not None and found is not None and list(found.shape) != list(shape):
                raise InvalidModelError(
                    f"{adapter.path}: tensor {name}: the adapter's delta is {list(found.shape)},"
                    f" the base's tensor {list(shape)}"
                )
        x, y = a.delta(name, rows, base_path), b.delta(name, rows, base_path)
        out.append((name, Sums(int(np.prod(cut)) if cut else 1, _sum(x), _sum(y), _dot(x, x), _dot(y, y), _dot(x, y))))
    return out


def metrics(per_tensor: Sequence[tuple[str, Sums]], names: Sequence[str], split: bool) -> dict[str, float]:
    """Full mode: the metrics of all tensors' statistics added; split: per-tensor metrics averaged,
    weighted by element count, undefined ones (NaN) skipped."""
    if not split:
        total = Sums()
        for _, sums in per_tensor:
            total.add(sums)
        return {m: total.metric(m) for m in names}
    out = {}
    for m in names:
        weighted, weight = 0.0, 0
        for _, sums in per_tensor:
            value = sums.metric(m)
            if not math.isnan(value):
                weighted += sums.n * value
                weight += sums.n
        out[m] = weighted / weight if weight else math.nan
    return out

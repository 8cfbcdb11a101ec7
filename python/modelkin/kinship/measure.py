"""Model kinship: how related fine-tunes of one base are, from the similarity of their deltas."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._core import KinshipPlan, KinshipStats, ModelHandle
from ..io.adapter import is_adapter, named_base, read_layout
from ..io.errors import ModelReferenceError
from ..io.resident import ResidentModel
from ..io.resolve import resolve
from ..io.towers import read_vlm

if TYPE_CHECKING:
    # numpy and the adapter path load on use: a pass over stored models needs neither, and
    # `modelkin kinship` starts faster without them.
    import numpy as np
    import numpy.typing as npt

    from . import lora

MetricName = Literal["pcc", "cs", "ed"]
METRICS: tuple[MetricName, ...] = ("pcc", "cs", "ed")
# A model: a path, a Hub id, or a merged model held in memory (modelkin.merge without an output).
ModelRef = str | os.PathLike[str] | ResidentModel
ProgressCallback = Callable[[int, int], object]


@dataclass(frozen=True)
class TensorKinship:
    """The kinship of one tensor's deltas."""

    name: str
    n: int
    pcc: float
    cs: float
    ed: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "pcc": _json_float(self.pcc),
            "cs": _json_float(self.cs),
            "ed": _json_float(self.ed),
        }


@dataclass(frozen=True)
class KinshipResult:
    """The kinship of two fine-tunes of one base."""

    models: tuple[str, str]
    base: str
    mode: Literal["full", "split"]
    metrics: dict[str, float]
    n: int
    tensors: int
    per_tensor: tuple[TensorKinship, ...] | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def pcc(self) -> float:
        return self.metrics["pcc"]

    @property
    def cs(self) -> float:
        return self.metrics["cs"]

    @property
    def ed(self) -> float:
        return self.metrics["ed"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "models": list(self.models),
            "base": self.base,
            "mode": self.mode,
            "metrics": {name: _json_float(value) for name, value in self.metrics.items()},
            "n": self.n,
            "tensors": self.tensors,
        }
        if self.per_tensor is not None:
            out["per_tensor"] = [t.to_dict() for t in self.per_tensor]
        if self.skipped:
            out["skipped"] = [{"name": name, "reason": reason} for name, reason in self.skipped]
        return out


@dataclass(frozen=True)
class KinshipMatrix:
    """Pairwise kinship of N fine-tunes, every metric from one pass over the files."""

    names: tuple[str, ...]
    base: str
    mode: Literal["full", "split"]
    metrics: dict[str, npt.NDArray[np.float64]]
    n: int
    tensors: int
    skipped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def matrix(self) -> npt.NDArray[np.float64]:
        """The matrix of the first requested metric."""
        return next(iter(self.metrics.values()))

    def __getitem__(self, metric: str) -> npt.NDArray[np.float64]:
        return self.metrics[metric]

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.names),
            "base": self.base,
            "mode": self.mode,
            "metrics": {name: [[_json_float(v) for v in row] for row in m] for name, m in self.metrics.items()},
            "n": self.n,
            "tensors": self.tensors,
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _metric_list(metrics: str | Sequence[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {unknown[0] if unknown else '(none)'}: choose from pcc, cs, ed")
    return list(dict.fromkeys(names))


def label(model: ModelRef) -> str:
    """How a model is named in results: its reference, or the in-memory merge it is."""
    if isinstance(model, ResidentModel):
        return model.label
    return os.fspath(model)


def _opened(model: ModelRef, offline: bool) -> str | ModelHandle:
    if isinstance(model, ResidentModel):
        return model.handle
    path = resolve(model, offline=offline)
    vlm = read_vlm(path)
    # A VLM is measured by its language model, under the text architecture's names.
    return vlm.language_model(str(path)) if vlm is not None else str(path)


def _vision_left_out(models: Sequence[ModelRef], offline: bool) -> tuple[tuple[str, str], ...]:
    """One line per VLM among ``models``: its tensors outside the language model are not compared."""
    notes = []
    for model in models:
        if isinstance(model, ResidentModel):
            continue
        vlm = read_vlm(resolve(model, offline=offline))
        if vlm is not None and vlm.others:
            notes.append(
                (f"{label(model)}: {len(vlm.others)} tensors outside its language model", "vision tower and projector")
            )
    return tuple(notes)


def measure(
    models: Sequence[ModelRef],
    base: ModelRef,
    *,
    low_precision: str | None = None,
    device: str | None = None,
    threads: int = 0,
    skip_nonfinite: bool = False,
    skip_missing: bool = False,
    count_tied_embeddings_twice: bool = False,
    offline: bool = False,
    progress: ProgressCallback | None = None,
) -> KinshipStats:
    """One pass over ``base`` and ``models``: the moments every metric is derived from."""
    # The same model twice is refused by the core (one check, on canonical paths or in-memory identity).
    paths = [_opened(m, offline) for m in (*models, base)]
    if device is not None and any(isinstance(p, ModelHandle) for p in paths):
        raise ValueError("device: a merged model held in memory is measured by the Rust pass; leave device unset")
    plan = KinshipPlan(
        paths[-1],
        paths[:-1],
        skip_missing=skip_missing,
        count_tied_embeddings_twice=count_tied_embeddings_twice,
    )
    if device is not None:
        from .torch_backend import run_torch

        return run_torch(plan, device, low_precision=low_precision, skip_nonfinite=skip_nonfinite, progress=progress)
    return plan.run(low_precision=low_precision, skip_nonfinite=skip_nonfinite, threads=threads, progress=progress)


def kinship(
    model_a: ModelRef,
    model_b: ModelRef,
    *,
    base: ModelRef,
    metrics: str | Sequence[str] = METRICS,
    split: bool = False,
    low_precision: bool = False,
    per_tensor: bool = False,
    device: str | None = None,
    threads: int = 0,
    skip_nonfinite: bool = False,
    offline: bool = False,
    progress: ProgressCallback | None = None,
) -> KinshipResult:
    """The kinship of two fine-tunes of ``base``: Pearson correlation (pcc), cosine similarity (cs)
    and Euclidean distance (ed) of their deltas, exact in float64.

    ``split`` averages per-tensor metrics weighted by element count; ``low_precision`` quantises the
    deltas to int8 as the original kinship tool does; ``device`` ("cpu", "cuda") uses torch."""
    names = _metric_list(metrics)
    mode: Literal["full", "split"] = "split" if split else "full"
    if any(_is_adapter(m, offline) for m in (model_a, model_b)):
        return _adapter_kinship(model_a, model_b, base, names, split, per_tensor, low_precision, device, offline)
    stats = measure(
        [model_a, model_b],
        base,
        low_precision=mode if low_precision else None,
        device=device,
        threads=threads,
        skip_nonfinite=skip_nonfinite,
        offline=offline,
        progress=progress,
    )
    values = {m: stats.value(m, mode, 0, 1) for m in names}
    breakdown = None
    if per_tensor:
        columns = {m: stats.per_tensor(m)[:, 0, 1] for m in METRICS}
        breakdown = tuple(
            TensorKinship(name, n, float(columns["pcc"][i]), float(columns["cs"][i]), float(columns["ed"][i]))
            for i, (name, n) in enumerate(zip(stats.tensor_names, stats.tensor_elements, strict=True))
        )
    return KinshipResult(
        models=(label(model_a), label(model_b)),
        base=label(base),
        mode=mode,
        metrics=values,
        n=stats.elements,
        tensors=len(stats.tensor_names),
        per_tensor=breakdown,
        skipped=tuple(stats.skipped) + _vision_left_out([model_a, model_b, base], offline),
    )


def _is_adapter(model: ModelRef, offline: bool) -> bool:
    """Whether a reference (a directory, or a Hub id, resolved) is a LoRA adapter."""
    return not isinstance(model, ResidentModel) and is_adapter(resolve(model, offline=offline))


def _adapter_sides(
    models: Sequence[ModelRef], base: ModelRef, low_precision: bool, device: str | None, offline: bool
) -> tuple[list[lora.Side], str]:
    """The models of an adapter kinship, read once, and the base's path; the options the factor
    path has no use for are refused, and so is an adapter whose config names another base that is
    on this machine."""
    from . import lora

    if low_precision or device is not None:
        asked = "low_precision" if low_precision else "device"
        raise ValueError(f"{asked}: adapter kinship is computed exactly from the factors (leave {asked} unset)")
    paths = []
    for model in (*models, base):
        if isinstance(model, ResidentModel):
            raise ValueError("adapter kinship reads models on disk: save the in-memory model first")
        paths.append(os.fspath(resolve(model, offline=offline)))
    for model, path in zip(models, paths[:-1], strict=True):
        if is_adapter(path):
            layout = read_layout(path)
            named = named_base(layout)
            if named is not None and named.resolve() != Path(paths[-1]).resolve():
                raise ModelReferenceError(f"{label(model)}: an adapter of {layout.base}, not of the base {label(base)}")
    return [lora.side(p) for p in paths[:-1]], paths[-1]


def _adapter_kinship(
    model_a: ModelRef,
    model_b: ModelRef,
    base: ModelRef,
    names: list[str],
    split: bool,
    per_tensor: bool,
    low_precision: bool,
    device: str | None,
    offline: bool,
) -> KinshipResult:
    """A pair with a LoRA adapter in it: exact from the factors (see :mod:`.lora`)."""
    from . import lora

    (side_a, side_b), base_path = _adapter_sides([model_a, model_b], base, low_precision, device, offline)
    sums = lora.pair_sums(side_a, side_b, base_path)
    breakdown = None
    if per_tensor:
        breakdown = tuple(TensorKinship(name, s.n, s.metric("pcc"), s.metric("cs"), s.metric("ed")) for name, s in sums)
    return KinshipResult(
        models=(label(model_a), label(model_b)),
        base=label(base),
        mode="split" if split else "full",
        metrics=lora.metrics(sums, names, split),
        n=sum(s.n for _, s in sums),
        tensors=len(sums),
        per_tensor=breakdown,
    )


def _adapter_matrix(
    models: Sequence[ModelRef],
    base: ModelRef,
    names: list[str],
    split: bool,
    low_precision: bool,
    device: str | None,
    offline: bool,
) -> KinshipMatrix:
    """An N x N matrix with LoRA adapters among the models: every pair exact from the factors."""
    import numpy as np

    from . import lora

    sides, base_path = _adapter_sides(models, base, low_precision, device, offline)
    count = len(sides)
    matrices = {m: np.zeros((count, count)) for m in names}
    n = tensors = 0
    for i in range(count):
        for j in range(i, count):
            sums = lora.pair_sums(sides[i], sides[j], base_path)
            values = lora.metrics(sums, names, split)
            for m in names:
                matrices[m][i, j] = matrices[m][j, i] = values[m]
            n, tensors = sum(s.n for _, s in sums), len(sums)
    return KinshipMatrix(
        names=tuple(label(m) for m in models),
        base=label(base),
        mode="split" if split else "full",
        metrics=matrices,
        n=n,
        tensors=tensors,
    )


def kinship_matrix(
    models: Sequence[ModelRef],
    *,
    base: ModelRef,
    metric: str | Sequence[str] = METRICS,
    split: bool = False,
    low_precision: bool = False,
    device: str | None = None,
    threads: int = 0,
    skip_nonfinite: bool = False,
    offline: bool = False,
    progress: ProgressCallback | None = None,
) -> KinshipMatrix:
    """The N x N kinship of ``models`` (fine-tunes of ``base``), every pair from one pass."""
    names = _metric_list(metric)
    if len(models) < 2:
        raise ValueError("a kinship matrix needs at least two models")
    mode: Literal["full", "split"] = "split" if split else "full"
    if any(_is_adapter(m, offline) for m in models):
        return _adapter_matrix(models, base, names, split, low_precision, device, offline)
    stats = measure(
        models,
        base,
        low_precision=mode if low_precision else None,
        device=device,
        threads=threads,
        skip_nonfinite=skip_nonfinite,
        offline=offline,
        progress=progress,
    )
    return KinshipMatrix(
        names=tuple(label(m) for m in models),
        base=label(base),
        mode=mode,
        metrics={m: stats.matrix(m, mode) for m in names},
        n=stats.elements,
        tensors=len(stats.tensor_names),
        skipped=tuple(stats.skipped) + _vision_left_out([*models, base], offline),
    )

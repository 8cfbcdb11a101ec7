"""PEFT LoRA adapters read as what they are: a low-rank delta of their base, per targeted tensor.

An adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. For a
targeted module, ΔW = s·B·A with B = ``…lora_B.weight`` (out x r), A = ``…lora_A.weight`` (r x in),
s = lora_alpha / r (lora_alpha / √r with ``use_rslora``), r and alpha per module from
``rank_pattern`` / ``alpha_pattern`` (PEFT's key matching: the pattern names the module or a suffix
of it), transposed for ``fan_in_fan_out`` (GPT-2's Conv1D stores the weight as in x out); embedding
LoRA (``lora_embedding_A`` r x vocab, ``lora_embedding_B`` dim x r) gives ΔW = s·(B·A)ᵀ.
``modules_to_save`` tensors are stored whole: their delta is dense. Anything else PEFT can write
(DoRA, ``lora_bias``, another ``peft_type``) is refused by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._core import ModelHandle, open_model
from .._core import apply_adapter as _core_apply
from .errors import InvalidModelError, ModelReferenceError
from .resolve import resolve

if TYPE_CHECKING:
    # numpy loads when an adapter's factors are read, not with the module (see `load_adapter`):
    # `modelkin kinship` checks whether a path is an adapter without it.
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.float64]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True for a PEFT adapter directory."""
    return (Path(path) / CONFIG).is_file()


@dataclass(frozen=True)
class LowRank:
    """ΔW = scale · left @ right, a (rows x cols) delta of rank ``left.shape[1]`` (float64)."""

    left: Array  # rows x r
    right: Array  # r x cols
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def rows(self, count: int) -> LowRank:
        """The first ``count`` rows of the delta."""
        return LowRank(self.left[:count], self.right, self.scale)

    def dense(self) -> Array:
        out: Array = self.scale * (self.left @ self.right)
        return out


@dataclass(frozen=True)
class Adapter:
    """An adapter's deltas by base tensor name: low-rank factors, or whole replacement tensors."""

    path: Path
    base: str | None  # base_model_name_or_path, as written
    low_rank: dict[str, LowRank]
    replaced: dict[str, Array]


def _matches(pattern: str, module: str) -> bool:
    return re.fullmatch(rf"(.*\.)?{pattern}", module) is not None


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if _matches(pattern, module):
            return float(value)
    return default


@dataclass(frozen=True)
class Target:
    """One base tensor an adapter's factors change, as stored: ΔW = scale·B·A, or its transpose."""

    tensor: str  # the base tensor's name
    a: str  # the adapter's tensor keys
    b: str
    rank: int
    scale: float
    transposed: bool  # an embedding (vocab x dim) or a fan_in_fan_out Conv1D weight
    embedding: bool


@dataclass(frozen=True)
class AdapterLayout:
    """What an adapter changes, read from its config and its file's header (no tensor data)."""

    path: Path
    base: str | None  # base_model_name_or_path, as written
    targets: tuple[Target, ...]
    replaced: dict[str, str]  # base tensor name -> the adapter's tensor stored whole

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def read_layout(path: str | Path) -> AdapterLayout:
    """Reads a PEFT LoRA adapter directory's config and header (see the module's docs); a one-line
    error names what is wrong or not supported."""
    folder = Path(path)
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise InvalidModelError(f"{folder / CONFIG}: cannot read the adapter config: {error}") from error
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise InvalidModelError(f"{folder}: peft_type {kind} is not supported (LoRA adapters are)")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise InvalidModelError(f"{folder}: {key}: true is not supported yet")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise InvalidModelError(f"{folder}: no {WEIGHTS}")
    listing = {name: shape for name, shape, _ in open_model(weights).tensors()}
    default_r = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_r))
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    ranks = dict(config.get("rank_pattern") or {})
    alphas = dict(config.get("alpha_pattern") or {})
    factors: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in listing:
        name = key.removeprefix(_PREFIX)
        found = re.fullmatch(
            r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?", name
        )
        if found is not None:
            factors.setdefault(found[1], {})[found[2]] = key
            continue
        # modules_to_save copies, and the base layer PEFT saves with a targeted embedding
        # (save_embedding_layers): both load over the base's tensor.
        saved = re.fullmatch(r"(.+)\.(?:modules_to_save(?:\.default)?|base_layer)\.(.+)", name)
        replaced[saved[1] + "." + saved[2] if saved else name] = key
    targets: list[Target] = []
    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            missing = a_key if a_key not in parts else b_key
            raise InvalidModelError(f"{folder}: module {module} has no {missing} tensor")
        a_shape, b_shape = listing[parts[a_key]], listing[parts[b_key]]
        r = int(_pattern_value(ranks, module, default_r))
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise InvalidModelError(
                f"{folder}: module {module}: rank {r} from the config, but {a_key} is {list(a_shape)}"
                f" and {b_key} {list(b_shape)}"
            )
        alpha = _pattern_value(alphas, module, default_alpha)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        targets.append(
            Target(f"{module}.weight", parts[a_key], parts[b_key], r, scale, embedding or fan_in_fan_out, embedding)
        )
    return AdapterLayout(folder, config.get("base_model_name_or_path"), tuple(targets), replaced)


def load_adapter(path: str | Path) -> Adapter:
    """Reads a PEFT LoRA adapter directory with its factors in float64 (see the module's docs)."""
    import numpy as np

    from .safetensors import load_file

    layout = read_layout(path)
    tensors = load_file(layout.weights)
    low_rank: dict[str, LowRank] = {}
    for t in layout.targets:
        a, b = (np.asarray(tensors[k], dtype=np.float64) for k in (t.a, t.b))
        # Embeddings are vocab x dim, Conv1D stores in x out: ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ.
        low_rank[t.tensor] = LowRank(a.T.copy(), b.T.copy(), t.scale) if t.transposed else LowRank(b, a, t.scale)
    replaced = {name: np.asarray(tensors[key], dtype=np.float64) for name, key in layout.replaced.items()}
    return Adapter(layout.path, layout.base, low_rank, replaced)


_LAYOUT: dict[bool, Literal["plain", "transposed"]] = {False: "plain", True: "transposed"}
# PEFT rounds an embedding's delta to the weight's dtype before adding it, a linear layer's sum once.
_ROUNDING: dict[bool, Literal["sum", "delta_first"]] = {False: "sum", True: "delta_first"}


def apply_adapter(base: str | Path, adapter: AdapterLayout, label: str) -> ModelHandle:
    """The model at ``base`` with ``adapter`` applied as PEFT's ``merge_and_unload`` applies it (what
    mergekit's ``model+lora`` merges), bit for bit, with no cache directory: the changed tensors are
    computed in memory by the core, the rest mapped from the base's files."""
    targets = [(t.tensor, t.a, t.b, t.scale, _LAYOUT[t.transposed], _ROUNDING[t.embedding]) for t in adapter.targets]
    return _core_apply(base, adapter.weights, targets, sorted(adapter.replaced.items()), label)


def split_reference(reference: str) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER`` reference split in two, or None for a plain reference (a path that
    exists with a ``+`` in its name is a path)."""
    if "+" not in reference or Path(reference).expanduser().exists():
        return None
    base, adapter = reference.split("+", 1)
    return base, adapter


def named_base(layout: AdapterLayout) -> Path | None:
    """The local path of the base the adapter's config names, if it is on this machine (a Hub id is
    looked up in the local cache only)."""
    if not layout.base:
        return None
    # A relative path is tried beside the adapter first (a pool of adapters next to their base).
    for candidate in (os.fspath(layout.path.parent / layout.base), layout.base):
        try:
            return resolve(candidate, offline=True)
        except (FileNotFoundError, ModelReferenceError):
            continue
    return None


def resolve_adapted(
    reference: str, *, base: Path | None = None, offline: bool = False
) -> tuple[Path, AdapterLayout] | None:
    """For a reference to an adapted model, the base's local path and the adapter: ``BASE+ADAPTER``
    (mergekit's syntax), or a bare adapter, applied to the base its config names when that is on
    this machine, else to ``base`` when one is given, else to the named base fetched. None for a
    plain model."""
    split = split_reference(reference)
    if split is not None:
        base_path, adapter_path = resolve(split[0], offline=offline), resolve(split[1], offline=offline)
        if not is_adapter(adapter_path):
            raise ModelReferenceError(f"{reference}: {split[1]} is not a LoRA adapter (it has no {CONFIG})")
        return base_path, read_layout(adapter_path)
    path = resolve(reference, offline=offline)
    if not is_adapter(path):
        return None
    layout = read_layout(path)
    named = named_base(layout)
    if named is not None:
        return named, layout
    if base is not None:
        return base, layout
    if not layout.base:
        raise ModelReferenceError(f"{reference}: the adapter names no base (base_model_name_or_path) and none is given")
    return resolve(layout.base, offline=offline), layout


def check_fits(layout: AdapterLayout, listing: dict[str, list[int]], base: str) -> None:
    """Refuses, naming it, a target or stored tensor the base lacks or whose shape does not fit."""
    shapes = {name: shape for name, shape, _ in open_model(layout.weights).tensors()}
    for t in layout.targets:
        if t.tensor not in listing:
            raise InvalidModelError(f"{layout.path}: targets {t.tensor}, which the base {base} does not have")
        rows, cols = shapes[t.b][0], shapes[t.a][1]
        want = [cols, rows] if t.transposed else [rows, cols]
        if list(listing[t.tensor]) != want:
            raise InvalidModelError(
                f"{layout.path}: {t.tensor}: the adapter's delta is {want}, the base's tensor {list(listing[t.tensor])}"
            )
    for name, key in layout.replaced.items():
        if name not in listing:
            raise InvalidModelError(f"{layout.path}: stores {name} whole, which the base {base} does not have")
        if list(shapes[key]) != list(listing[name]):
            raise InvalidModelError(
                f"{layout.path}: {key} is {list(shapes[key])}, the base's {name} {list(listing[name])}"
            )

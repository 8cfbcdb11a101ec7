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
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidModelError
from .safetensors import load_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
Array = npt.NDArray[np.float64]


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


def load_adapter(path: str | Path) -> Adapter:
    """Reads a PEFT LoRA adapter directory (see the module's docs); a one-line error names what is
    wrong or not supported."""
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
    tensors = load_file(weights)
    default_r = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_r))
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    ranks = dict(config.get("rank_pattern") or {})
    alphas = dict(config.get("alpha_pattern") or {})
    factors: dict[str, dict[str, Array]] = {}
    replaced: dict[str, Array] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        found = re.fullmatch(
            r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?", name
        )
        if found is not None:
            factors.setdefault(found[1], {})[found[2]] = np.asarray(value, dtype=np.float64)
            continue
        saved = re.fullmatch(r"(.+)\.modules_to_save(?:\.default)?\.(.+)", name)
        replaced[saved[1] + "." + saved[2] if saved else name] = np.asarray(value, dtype=np.float64)
    low_rank: dict[str, LowRank] = {}
    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            missing = a_key if a_key not in parts else b_key
            raise InvalidModelError(f"{folder}: module {module} has no {missing} tensor")
        a, b = parts[a_key], parts[b_key]
        r = int(_pattern_value(ranks, module, default_r))
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidModelError(
                f"{folder}: module {module}: rank {r} from the config, but lora_A is {list(a.shape)}"
                f" and lora_B {list(b.shape)}"
            )
        alpha = _pattern_value(alphas, module, default_alpha)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if embedding or fan_in_fan_out:
            # Embeddings are vocab x dim, Conv1D stores in x out: ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ.
            low_rank[f"{module}.weight"] = LowRank(a.T.copy(), b.T.copy(), scale)
        else:
            low_rank[f"{module}.weight"] = LowRank(b, a, scale)
    return Adapter(folder, config.get("base_model_name_or_path"), low_rank, replaced)

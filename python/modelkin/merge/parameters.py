"""Parameter values per tensor, as mergekit resolves them: the model's own value, else the global
one, else the method's default; filters pick by tensor name, lists are gradients over the layers."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..io.errors import RecipeError

if TYPE_CHECKING:
    from .recipe import MergeConfig, ModelEntry

# Decoder layer N of every architecture mergekit knows: `layers.N.` (Llama-like), `h.N.` (GPT-2,
# Bloom, Falcon), `blocks.N.`/`block.N.`/`layer.N.` (see architecture.py).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_of(tensor: str) -> int | None:
    match = _LAYER.search(tensor)
    return int(match[1]) if match else None


def gradient_position(tensor: str, layers: int) -> float | None:
    """Where a tensor sits along a gradient: layer / (layers - 1); None for non-layer tensors."""
    layer = layer_of(tensor)
    return None if layer is None else layer / max(1, layers - 1)


def evaluate(value: Any, tensor: str, t: float | None) -> Any:
    """A parameter's value for one tensor: filters pick the first matching entry (a filter-less
    entry is the fallback), lists of numbers are gradients evaluated at position ``t`` (their first
    value where ``t`` is None, for tensors outside the layers)."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for item in value:
            pattern = item.get("filter")
            if pattern is None or pattern in tensor:
                return evaluate(item.get("value"), tensor, t)
        return None
    if isinstance(value, list) and value:
        if t is None or len(value) == 1:
            return value[0]
        scaled = t * (len(value) - 1)
        low = min(math.floor(scaled), len(value) - 1)
        high = min(low + 1, len(value) - 1)
        frac = scaled - low
        return value[low] * (1 - frac) + value[high] * frac
    return value


def lookup(
    config: MergeConfig,
    entry: ModelEntry | None,
    key: str,
    tensor: str,
    t: float | None,
    default: object = None,
    shared: Sequence[Mapping[str, Any]] = (),
) -> Any:
    """mergekit's order: the model's own parameters, then its slice's, then its module's, then the
    global ones, then the default; the first that yields a value wins. Without an entry, ``shared``
    (the slice's and module's parameters) stands for the model's scopes: a parameter shared by the
    slice's models."""
    for params in (*(entry.scopes if entry else shared), config.parameters):
        if key in params:
            value = evaluate(params[key], tensor, t)
            if value is not None:
                return value
    return default


def global_options(config: MergeConfig) -> dict[str, Any]:
    """The method's global options: one value for the whole merge (the engine takes them per job).
    A slice or module may set one (mergekit looks them up per tensor) when every slice and module
    agrees; different values are refused by name rather than applied to part of the merge."""
    options: dict[str, Any] = {}
    for key, default in config.method.global_defaults.items():
        found: dict[str, tuple[str, Any]] = {}
        for entry in config.models:
            value = lookup(config, None, key, "", None, default, entry.shared)
            found.setdefault(repr(value), (entry.model, value))
        if len(found) > 1:
            values = ", ".join(f"{v!r} ({model})" for model, v in found.values())
            raise RecipeError(
                f"parameters.{key}: {config.method.name} takes one {key} for the whole merge; the recipe's slices or"
                f" modules give {values}"
            )
        options[key] = next(iter(found.values()))[1] if found else default
    return options

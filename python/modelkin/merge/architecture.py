"""Layer naming of a model's architecture: which tensors belong to decoder layer N and which
config.json key counts the layers (``model.layers.N.`` with ``num_hidden_layers`` for Llama-like
models, ``h.N.`` with ``n_layer`` for GPT-2, ...). Stacking recipes renumber layers and rewrite the
count from this; a naming that cannot be determined is refused, never guessed."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .recipe import RecipeError

# The layer-stack names of the architectures mergekit knows (its architecture/*.json templates):
# `model.layers.N.` (Llama, Mistral, Qwen, Gemma, Granite, ...), `transformer.h.N.` / `h.N.`
# (GPT-2, GPT-J, Bloom, Falcon), `blocks.N.` / `layer.N.` / `block.N.` (MPT, BERT-like, RWKV).
LAYER = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|block|layer)\.)(\d+)\.")
# config.json keys holding the layer count, in the order transformers' configs use them.
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerNaming:
    """``prefix`` + layer number + ``.`` starts every tensor name of a layer."""

    prefix: str
    count_key: str
    layers: int

    def layer_of(self, tensor: str) -> int | None:
        if not tensor.startswith(self.prefix):
            return None
        head, dot, _ = tensor[len(self.prefix) :].partition(".")
        return int(head) if dot and head.isdigit() else None


def layer_naming(config: Mapping[str, Any] | None, tensors: Iterable[str], model: str) -> LayerNaming:
    """The layer naming of ``model`` from its tensor names and config.json; a RecipeError naming the
    model when there is not exactly one layer stack or no layer-count key."""
    stacks: dict[str, set[int]] = {}
    for name in tensors:
        match = LAYER.match(name)
        if match:
            stacks.setdefault(match[1], set()).add(int(match[2]))
    if len(stacks) != 1:
        found = ", ".join(f"{p}N." for p in sorted(stacks)) or "none"
        raise RecipeError(f"{model}: cannot determine its layer naming (layer stacks found: {found})")
    prefix, numbers = next(iter(stacks.items()))
    config = config or {}
    key = next((k for k in COUNT_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        # A Llama-style stack with no count in config.json: the names give it, under the key every
        # Llama-like config uses. Any other stack needs its architecture's key: refused, not guessed.
        if not prefix.endswith("layers.") or numbers != set(range(max(numbers) + 1)):
            raise RecipeError(f"{model}: config.json has no layer count ({', '.join(COUNT_KEYS)})")
        return LayerNaming(prefix, "num_hidden_layers", max(numbers) + 1)
    if numbers != set(range(config[key])):
        raise RecipeError(
            f"{model}: config.json says {key}={config[key]} but its tensors have layers "
            f"{min(numbers)}..{max(numbers)} under {prefix}N."
        )
    return LayerNaming(prefix, key, config[key])

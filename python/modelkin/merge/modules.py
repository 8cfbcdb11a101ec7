"""mergekit's `modules:` recipes planned: which modules the models have (a text model's one,
``default``; a VLM's as mergekit infers them from its tensor names), each module's outputs, and the
output config's layer count."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io.towers import Vlm
from .architecture import COUNT_KEYS, layer_naming
from .layout import PlannedOutput, inferred_modules, plan_modules, text_stack
from .recipe import MergeConfig, RecipeError


def whole_vlm_of(config: MergeConfig, paths: Mapping[str, Path], vlms: Mapping[str, Vlm]) -> Vlm | None:
    """The VLM a `modules:` recipe writes when every model is a VLM of one architecture (merged
    whole, as mergekit merges it); None for another recipe. A `modules:` recipe mixing VLMs with
    LLMs is refused: a merge into a VLM's language model is written with `models:` or `slices:`."""
    if config.modules is None or not vlms:
        return None
    # An adapted model is never among `vlms`: it counts among the others.
    others = [ref for ref in paths if ref not in vlms]
    if others:
        raise RecipeError(
            f"modules: {others[0]} is not a VLM: a recipe merging a VLM's language model with LLMs takes models: or"
            " slices: (modules: merges VLMs of one architecture whole)"
        )
    kinds = {vlm.architecture for vlm in vlms.values()}
    if len(kinds) > 1:
        raise RecipeError(f"modules: VLMs of different architectures ({', '.join(sorted(kinds))})")
    written = config.base_model or config.models[0].model
    return vlms[written]


def plan_recipe_modules(
    config: MergeConfig,
    names: list[str],
    base_ref: str | None,
    base_config: dict[str, Any] | None,
    reference: str,
    whole_vlm: Vlm | None,
) -> tuple[list[PlannedOutput], dict[str, Any] | None]:
    """A `modules:` recipe's outputs and the output's (text) config with its layer count. A text
    model has one module, ``default`` (mergekit's name for it); a VLM merged whole has those mergekit
    infers from its tensor names. A stack whose layer count changes must have a config key for it:
    the language model's (the text config's count); another is refused, not written inconsistent."""
    if whole_vlm is None:
        naming = layer_naming(base_config, names, reference)
        outputs, counts = plan_modules(config, {"default": text_stack(names, naming)}, base_ref, "a text model")
        if "default" in counts and counts["default"] != naming.layers:
            base_config = {**(base_config or {}), naming.count_key: counts["default"]}
        return outputs, base_config
    modules = inferred_modules(names, whole_vlm.current_name)
    outputs, counts = plan_modules(config, modules, base_ref, f"the {whole_vlm.architecture} VLM {whole_vlm.path}")
    language = whole_vlm.current_name(whole_vlm.to_vlm_name("model.layers."))[:-1]
    for name, count in counts.items():
        if count == modules[name].layers:
            continue
        if name != language:
            raise RecipeError(
                f"modules.{name}: writes {count} layers of {modules[name].layers}; modelkin changes the layer count of"
                f" the language model only ({language}), whose config key it knows"
            )
        text = whole_vlm.text_config
        key = next((k for k in COUNT_KEYS if k in text), "num_hidden_layers")
        base_config = {**(base_config or {}), key: count}
    left = [name for name in modules if name not in counts]
    if left:
        config.ignored.append(
            f"modules: {', '.join(left)} not in the recipe: not written, as mergekit writes only the recipe's modules"
        )
    return outputs, base_config

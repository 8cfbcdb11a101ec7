"""The output tensors of a recipe and where each comes from: every tensor of the reference merged
from all models (`models:`), layers stacked in slice order (`slices:`), or module by module
(`modules:`, mergekit's form for models of several layer stacks: a VLM's language model and vision
tower), each module planned like a recipe of its own."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .architecture import LayerNaming
from .parameters import gradient_position
from .recipe import MergeConfig, ModelEntry, RecipeError
from .sources import ModuleSpec, Slice, stacked_layers

# One output tensor: its name, the (entry, tensor name) of each merged input, the base's tensor
# name, and the tensor's position along parameter gradients.
PlannedOutput = tuple[str, list[tuple[ModelEntry, str]], str | None, float | None]


@dataclass(frozen=True)
class Stack:
    """A module's tensors (``tensors``, in stored order): ``prefix`` + N + ``.`` + a suffix for each
    of its ``layers`` layers, and the loose tensors taken from the first slice's sources (``pre``)
    and the last's (``post``)."""

    tensors: tuple[str, ...]
    prefix: str
    layers: int
    suffixes: tuple[str, ...]
    pre: tuple[str, ...]
    post: tuple[str, ...]


def text_stack(tensors: Sequence[str], naming: LayerNaming) -> Stack:
    """A text model's one stack. Stored order puts embeddings first in most files, not all: GPT-2
    stores `wte`/`wpe` beside `ln_f`, so "embed"-like names (wte, wpe, embed_*) go before the layers
    and the rest after, as mergekit's architecture definitions place them."""
    prefix = naming.prefix
    suffixes = dict.fromkeys(
        n[len(prefix) :].partition(".")[2] for n in tensors if naming.layer_of(n) == 0 and n.startswith(prefix)
    )
    loose = [n for n in tensors if naming.layer_of(n) is None]
    pre = tuple(n for n in loose if re.search(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.", n))
    return Stack(tuple(tensors), prefix, naming.layers, tuple(suffixes), pre, tuple(n for n in loose if n not in pre))


# mergekit's layer index in a tensor name: the first `.N.`.
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def inferred_modules(tensors: Sequence[str], named: Callable[[str], str] = str) -> dict[str, Stack]:
    """The modules mergekit 0.1.5 infers for an architecture it has no definition for (LLaVA,
    LLaVA-NeXT): one per layer stack, named by the tensor-name prefix before the first ``.N.``
    (``model.language_model.layers``) as ``named`` gives it (mergekit names them by transformers'
    names of the tensors, whatever the files use), and ``default`` holding every tensor outside the
    stacks."""
    layers: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    suffixes: dict[str, dict[str, None]] = {}
    loose: list[str] = []
    for name in tensors:
        match = _LAYER_INDEX.search(name)
        if match is None:
            loose.append(name)
            continue
        prefix = name[: match.start()]
        layers[prefix] = max(layers.get(prefix, 0), int(match[1]) + 1)
        members.setdefault(prefix, []).append(name)
        suffixes.setdefault(prefix, {})[name[match.end() :]] = None
    modules = {named(p): Stack(tuple(members[p]), f"{p}.", layers[p], tuple(suffixes[p]), (), ()) for p in layers}
    if loose:
        modules["default"] = Stack(tuple(loose), "", 0, (), tuple(loose), ())
    return modules


def plan_models(
    tensors: Sequence[str], base_ref: str | None, inputs: Sequence[ModelEntry], layers: int
) -> list[PlannedOutput]:
    """`models:` recipes: every tensor of the base (or first model) merged from all inputs."""
    return [
        (name, [(entry, name) for entry in inputs], name if base_ref else None, gradient_position(name, layers))
        for name in tensors
    ]


def plan_slices(
    config: MergeConfig, slices: Sequence[Slice], stack: Stack, base_ref: str | None
) -> list[PlannedOutput]:
    """`slices:` (frankenmerges): output layers numbered in slice order under the stack's prefix; the
    loose tensors before the layers come from the first slice's sources and those after from the
    last's, as in mergekit. A slice's base (its own base_model, else ``base_ref``; none for a method
    that reads no base) gives the base's tensors, not merged inputs."""
    uses_base = config.method.base in ("required", "optional")

    def based(slice_sources: Slice) -> str | None:
        return (slice_sources[0].slice_base or base_ref) if uses_base else None

    def sources(slice_sources: Slice, name: str) -> tuple[list[tuple[ModelEntry, str]], str | None]:
        base = based(slice_sources)
        return [(e, name) for e in slice_sources if e.model != base], (name if base else None)

    outputs: list[PlannedOutput] = []
    for name in stack.pre:
        inputs, base = sources(slices[0], name)
        outputs.append((name, inputs, base, None))
    out_layer = 0
    for slice_sources in slices:
        first, end = slice_sources[0].layer_range or (0, 0)
        base_model = based(slice_sources)
        for offset in range(end - first):
            t = offset / (end - first - 1) if end - first > 1 else 1.0
            for suffix in stack.suffixes:
                out_name = f"{stack.prefix}{out_layer}.{suffix}"
                named = [(e, f"{stack.prefix}{(e.layer_range or (0, 0))[0] + offset}.{suffix}") for e in slice_sources]
                inputs = [(e, n) for e, n in named if e.model != base_model]
                base = next((n for e, n in named if e.model == base_model), inputs[0][1] if base_model else None)
                outputs.append((out_name, inputs, base, t))
            out_layer += 1
    for name in stack.post:
        inputs, base = sources(slices[-1], name)
        outputs.append((name, inputs, base, None))
    return outputs


def merged_inputs(config: MergeConfig, models: Sequence[ModelEntry], base_ref: str | None) -> list[ModelEntry]:
    """The models a `models:` list merges: each once, the base excluded unless the method averages it
    in (karcher gathers every model of the recipe, base_model included)."""
    inputs = list({m.model: m for m in models if m.model != base_ref}.values())
    base = config.base_model
    if config.method.base == "input" and base and all(m.model != base for m in inputs):
        module = models[0].module_parameters if models else {}
        inputs.append(ModelEntry(base, {}, module_parameters=module))
    return inputs


def plan_modules(
    config: MergeConfig, modules: Mapping[str, Stack], base_ref: str | None, layout: str
) -> tuple[list[PlannedOutput], dict[str, int]]:
    """`modules:` recipes: each module of the recipe planned in its order, as mergekit plans it: its
    `models:` as one slice over all its layers (the base added as a source), or its `slices:`
    stacked; a module the recipe leaves out is not written (as in mergekit). Returns the outputs and
    each module's output layer count. ``layout`` names the architecture's modules for messages."""
    outputs: list[PlannedOutput] = []
    counts: dict[str, int] = {}
    for module in config.modules or ():
        stack = modules.get(module.name)
        if stack is None:
            raise RecipeError(f"modules.{module.name}: not a module of {layout} (its modules: {', '.join(modules)})")
        if module.models is not None:
            # mergekit's one slice over every layer of each model: the same tensors and gradient
            # positions as a `models:` recipe over the module's tensors.
            inputs = merged_inputs(config, module.models, base_ref)
            outputs.extend(plan_models(stack.tensors, base_ref, inputs, stack.layers))
            counts[module.name] = stack.layers
            continue
        _check_spans(module, stack)
        slices = module.slices or ()
        outputs.extend(plan_slices(config, slices, stack, base_ref))
        counts[module.name] = stacked_layers(slices)
    return outputs, counts


def _check_spans(module: ModuleSpec, stack: Stack) -> None:
    for i, slice_sources in enumerate(module.slices or ()):
        for j, entry in enumerate(slice_sources):
            first, end = entry.layer_range or (0, 0)
            if end > stack.layers:
                raise RecipeError(
                    f"modules.{module.name}.slices[{i}].sources[{j}].layer_range: [{first}, {end}) is past the"
                    f" module's {stack.layers} layers"
                )

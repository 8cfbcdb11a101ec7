"""Where a recipe's tensors come from, as parsed from its YAML: the ``models:`` list, the ``slices:``
of a frankenmerge, and mergekit's ``modules:`` (one ``models:`` or ``slices:`` per module of the
architecture, with the module's own ``parameters``). Validated here for shape and types; the
method's rules are checked by :mod:`.recipe`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..io.errors import RecipeError

# fail(path, message): the RecipeError naming the key path and its line.
Fail = Callable[[list[str | int], str], RecipeError]


def key_path(path: Sequence[str | int]) -> str:
    """A key path as the recipe writes it: ``slices[0].residual_weight``."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: Mapping[str, Any]
    # [first, end) layers taken from this model, in a `slices:` recipe.
    layer_range: tuple[int, int] | None = None
    # Its slice's `parameters` (looked up after the source's own, before the recipe's) and
    # `base_model` (the slice's base instead of the recipe's), in a `slices:` recipe.
    slice_parameters: Mapping[str, Any] = field(default_factory=dict)
    slice_base: str | None = None
    # Its module's `parameters` (after the slice's, before the recipe's), in a `modules:` recipe.
    module_parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """The parameters it shares with the other models of its slice and module, in mergekit's
        lookup order (the slice's, then the module's)."""
        return (self.slice_parameters, self.module_parameters)

    @property
    def scopes(self) -> tuple[Mapping[str, Any], ...]:
        """Where its parameters are looked up before the recipe's: its own, then the shared ones."""
        return (self.parameters, *self.shared)


# One output slice: its sources, in order.
Slice = tuple[ModelEntry, ...]


@dataclass(frozen=True)
class ModuleSpec:
    """One entry of a `modules:` recipe: the module's name in the architecture and either its
    models (every layer of each, merged) or its output slices."""

    name: str
    models: tuple[ModelEntry, ...] | None
    slices: tuple[Slice, ...] | None
    parameters: Mapping[str, Any]

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return self.models if self.models is not None else tuple(e for s in self.slices or () for e in s)


def model_entry(fail: Fail, path: list[str | int], entry: Any) -> ModelEntry:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
        raise fail(path, "each entry needs a 'model' string")
    allowed = ("model", "parameters", "layer_range") if "sources" in path else ("model", "parameters")
    for key in entry:
        if key not in allowed:
            raise fail([*path, key], f"unknown key (known here: {', '.join(allowed)})")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise fail([*path, "parameters"], "parameters must be a mapping")
    return ModelEntry(entry["model"], dict(params))


def parse_models(fail: Fail, path: list[str | int], raw: Any, module: Mapping[str, Any]) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise fail(path, "a non-empty list of models is required")
    entries = (model_entry(fail, [*path, i], entry) for i, entry in enumerate(raw))
    return tuple(ModelEntry(e.model, e.parameters, module_parameters=module) for e in entries)


def parse_slices(
    fail: Fail, path: list[str | int], raw: Any, module: Mapping[str, Any] | None, ignored: list[str]
) -> tuple[Slice, ...]:
    """A `slices:` list (of a module when ``module`` holds its parameters); a slice's
    `residual_weight` is ignored out loud (into ``ignored``), as mergekit 0.1.5 parses it and never
    applies it. A module's slice may span no layers: a module of the loose tensors has none."""
    if not isinstance(raw, list) or not raw:
        raise fail(path, "a non-empty list of slices is required")
    slices = []
    for i, item in enumerate(raw):
        here: list[str | int] = [*path, i]
        for key in item if isinstance(item, Mapping) else ():
            if key not in ("sources", "parameters", "base_model", "residual_weight"):
                raise fail([*here, key], "unknown key (known here: sources, parameters, base_model, residual_weight)")
        sources = item.get("sources") if isinstance(item, Mapping) else None
        slice_parameters = item.get("parameters") or {}
        if not isinstance(slice_parameters, Mapping):
            raise fail([*here, "parameters"], "parameters must be a mapping")
        slice_base = item.get("base_model")
        if slice_base is not None and not isinstance(slice_base, str):
            raise fail([*here, "base_model"], "base_model must be a model reference")
        if "residual_weight" in item:
            if not isinstance(item["residual_weight"], (int, float)):
                raise fail([*here, "residual_weight"], "residual_weight must be a number")
            ignored.append(
                f"{key_path([*here, 'residual_weight'])}: ignored, as mergekit 0.1.5 ignores it (it parses the key"
                " and never applies it)"
            )
        if not isinstance(sources, list) or not sources:
            raise fail(here, "each slice needs a non-empty 'sources' list")
        entries = []
        for j, source in enumerate(sources):
            entry = model_entry(fail, [*here, "sources", j], source)
            span = source.get("layer_range")
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(v, int) for v in span)
                and 0 <= span[0] <= span[1]
                and (span[0] < span[1] or module is not None)
            ):
                raise fail([*here, "sources", j, "layer_range"], "layer_range must be [first, end)")
            entries.append(
                ModelEntry(
                    entry.model,
                    entry.parameters,
                    (span[0], span[1]),
                    dict(slice_parameters),
                    slice_base,
                    module or {},
                )
            )
        if len({e.layer_range[1] - e.layer_range[0] for e in entries if e.layer_range}) != 1:
            raise fail(here, "all sources of a slice must span the same number of layers")
        slices.append(tuple(entries))
    return tuple(slices)


def parse_modules(fail: Fail, raw: Any, ignored: list[str]) -> tuple[ModuleSpec, ...]:
    """mergekit's `modules:`: a mapping of module name to its `models:` or `slices:` and its
    `parameters` (mergekit drops other keys silently; they are refused here)."""
    if not isinstance(raw, Mapping) or not raw:
        raise fail(["modules"], "a non-empty mapping of module name to its models: or slices: is required")
    modules = []
    for name, item in raw.items():
        path: list[str | int] = ["modules", str(name)]
        if not isinstance(item, Mapping):
            raise fail(path, "a module is a mapping with models: or slices:, and parameters")
        for key in item:
            if key not in ("models", "slices", "parameters"):
                raise fail([*path, key], "unknown key (known here: models, slices, parameters)")
        if bool(item.get("models")) == bool(item.get("slices")):
            raise fail(path, "a module takes either models: or slices: (one of them, not empty)")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise fail([*path, "parameters"], "parameters must be a mapping")
        parameters = dict(parameters)
        if item.get("models"):
            models = parse_models(fail, [*path, "models"], item["models"], parameters)
            modules.append(ModuleSpec(str(name), models, None, parameters))
        else:
            slices = parse_slices(fail, [*path, "slices"], item["slices"], parameters, ignored)
            modules.append(ModuleSpec(str(name), None, slices, parameters))
    return tuple(modules)


def stacked_layers(slices: Sequence[Slice]) -> int:
    """How many layers slices stack: the sum of their spans."""
    return sum(end - first for first, end in (s[0].layer_range or (0, 0) for s in slices))

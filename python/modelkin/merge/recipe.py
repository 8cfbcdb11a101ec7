"""mergekit YAML recipes: parsed with PyYAML and validated into typed objects against the core's
method table (names, parameters, defaults, ranges, model counts), with line numbers in messages."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .. import _core
from ..io.dtypes import RECIPE_DTYPES, TORCH_NAMES
from ..io.errors import RecipeError
from .sources import ModelEntry, ModuleSpec, key_path, parse_models, parse_modules, parse_slices

if TYPE_CHECKING:
    from .vocabulary import TokenizerSpec

__all__ = ["METHODS", "MergeConfig", "MethodSpec", "ModelEntry", "ModuleSpec", "RecipeError", "load_config"]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as the core's method table declares it (`_core.methods()`), with the views
    recipe validation needs."""

    info: _core.MethodInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def summary(self) -> str:
        return self.info.summary

    @property
    def base(self) -> str:
        """What it does with base_model: required, optional, input or ignored."""
        return self.info.base

    @property
    def needs_base(self) -> bool:
        return self.info.base == "required"

    @cached_property
    def parameters(self) -> dict[str, _core.ParameterInfo]:
        return {p.name: p for p in self.info.parameters}

    def _defaults(self, scope: str) -> dict[str, object]:
        return {p.name: p.default for p in self.info.parameters if p.scope == scope and not p.required}

    @cached_property
    def global_defaults(self) -> dict[str, object]:
        return self._defaults("global")

    @cached_property
    def tensor_defaults(self) -> dict[str, object]:
        return self._defaults("per_model")

    @cached_property
    def required_global(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.info.parameters if p.scope == "global" and p.required)

    @cached_property
    def required_tensor(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.info.parameters if p.scope == "per_model" and p.required)


METHODS: dict[str, MethodSpec] = {info.name: MethodSpec(info) for info in _core.methods()}


@dataclass(frozen=True)
class MergeConfig:
    method: MethodSpec
    models: tuple[ModelEntry, ...]
    base_model: str | None
    parameters: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    # The output vocabulary asked for (`tokenizer_source` or the `tokenizer:` section).
    tokenizer: TokenizerSpec | None
    chat_template: str | None
    # The YAML as given; None for a dict recipe, whose YAML is written only when asked for (`text`).
    source_text: str | None
    raw: Mapping[str, Any]
    # `slices:` recipes: the sources of each output slice, in order.
    slices: tuple[tuple[ModelEntry, ...], ...] | None = None
    # `modules:` recipes (mergekit's form for models of several modules): each module's models or
    # slices, in the recipe's order.
    modules: tuple[ModuleSpec, ...] | None = None
    # modelkin's own keys: "adapter" writes a PEFT adapter (linear and task arithmetic of adapters),
    # optionally reduced to `adapter_rank`.
    out_format: str = "model"
    adapter_rank: int | None = None
    # Keys mergekit accepts and ignores for this method (a per-model `weight` on slerp, say): each a
    # one-line warning, printed and recorded in modelkin.json, never dropped silently.
    ignored: list[str] = field(default_factory=list)

    @cached_property
    def text(self) -> str:
        """The recipe as YAML (what mergekit_config.yml holds)."""
        return self.source_text if self.source_text is not None else yaml.safe_dump(dict(self.raw), sort_keys=False)


class _Lines:
    """Maps key paths of the parsed YAML to line numbers, for messages."""

    def __init__(self, text: str | None) -> None:
        self._root = yaml.compose(text) if text else None

    def line(self, path: Sequence[str | int]) -> str:
        node = self._root
        found = node
        for key in path:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == key), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
            else:
                node = None
            if node is None:
                break
            found = node
        return f" (line {found.start_mark.line + 1})" if found is not None else ""


def load_config(recipe: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Reads a mergekit YAML file (or a dict with the same keys) and validates it."""
    if isinstance(recipe, Mapping):
        # A deep copy: the caller may change the dict after planning (50 candidates from one dict).
        raw: Any = copy.deepcopy(dict(recipe))
        text: str | None = None
        lines = _Lines(None)
        source = "recipe"
    else:
        source = str(recipe)
        text = Path(recipe).read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise RecipeError(f"{source}:{where} invalid YAML: {problem}") from error
        lines = _Lines(text)

    def fail(path: Sequence[str | int], message: str) -> RecipeError:
        return RecipeError(f"{source}: {key_path(path)}{lines.line(path)}: {message}")

    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a merge recipe is a mapping with merge_method and models")
    known = {
        "merge_method",
        "models",
        "slices",
        "modules",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "tokenizer",
        "chat_template",
        "name",
        "out_format",
        "adapter_rank",
    }
    for key in raw:
        if key not in known:
            raise fail([key], f"unknown key (known: {', '.join(sorted(known))})")
    method_name = raw.get("merge_method")
    if method_name not in METHODS:
        raise fail(["merge_method"], f"unknown merge_method {method_name!r}; supported: {', '.join(METHODS)}")
    method = METHODS[method_name]
    template = raw.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise fail(["chat_template"], "chat_template must be a name (chatml, llama3, ...), auto or a Jinja template")
    given = [key for key in ("models", "slices", "modules") if raw.get(key) is not None]
    if len(given) > 1:
        raise fail([given[1]], f"use one of models:, slices: or modules:, not {' and '.join(given)}")
    ignored: list[str] = []
    slices: tuple[tuple[ModelEntry, ...], ...] | None = None
    modules: tuple[ModuleSpec, ...] | None = None
    if "slices" in given:
        slices = parse_slices(fail, ["slices"], raw["slices"], None, ignored)
        models = [e for s in slices for e in s]
    elif "modules" in given:
        modules = parse_modules(fail, raw["modules"], ignored)
        models = [e for m in modules for e in m.entries]
    else:
        models = list(parse_models(fail, ["models"], raw.get("models"), {}))
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise fail(["base_model"], "base_model must be a model reference")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise fail(["parameters"], "parameters must be a mapping")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in RECIPE_DTYPES:
            raise fail([key], f"unsupported dtype {raw[key]!r} (float64, float32, float16, bfloat16)")
    # Imported here: the vocabulary module raises this module's RecipeError.
    from .vocabulary import parse_spec

    refs = {m.model for m in models} | ({base} if base else set()) | {m.slice_base for m in models if m.slice_base}
    try:
        tokenizer = parse_spec(raw, refs)
    except RecipeError as error:
        raise fail(["tokenizer" if "tokenizer" in raw else "tokenizer_source"], str(error)) from None
    out_format, adapter_rank = _out_format(raw, method, fail)
    config = MergeConfig(
        method=method,
        models=tuple(models),
        base_model=base,
        parameters=dict(parameters),
        dtype=raw.get("dtype"),
        out_dtype=raw.get("out_dtype"),
        tokenizer_source=raw.get("tokenizer_source"),
        tokenizer=tokenizer,
        chat_template=template,
        source_text=text,
        raw=raw,
        slices=slices,
        modules=modules,
        out_format=out_format,
        adapter_rank=adapter_rank,
    )
    config.ignored.extend(ignored)
    _check_method(config, fail)
    return config


# What adapter output refuses: a key whose meaning has no low-rank form here, and why.
_NOT_FOR_ADAPTERS = {
    "tokenizer": "changes the vocabulary",
    "tokenizer_source": "changes the vocabulary",
    "chat_template": "writes tokenizer files",
    "dtype": "is the merge's arithmetic; adapter output is computed in float64 on the factors",
}


def _out_format(raw: Mapping[str, Any], method: MethodSpec, fail: Any) -> tuple[str, int | None]:
    out_format = raw.get("out_format", "model")
    if out_format not in ("model", "adapter"):
        raise fail(["out_format"], f"out_format must be model or adapter, not {out_format!r}")
    rank = raw.get("adapter_rank")
    valid = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
    if rank is not None and (out_format != "adapter" or not valid):
        raise fail(["adapter_rank"], "adapter_rank is a positive integer, with out_format: adapter")
    if out_format == "adapter":
        if method.name not in ("linear", "task_arithmetic"):
            raise fail(
                ["merge_method"],
                f"out_format: adapter: {method.name} is not exact on low-rank factors (linear and"
                " task_arithmetic are); leave out_format unset for a full model",
            )
        for key, why in _NOT_FOR_ADAPTERS.items():
            if raw.get(key) is not None:
                raise fail([key], f"not with out_format: adapter ({key} {why})")
    return out_format, rank


def _check_method(config: MergeConfig, fail: Any) -> None:
    method = config.method
    if (
        method.name == "nuslerp"
        and config.parameters.get("nuslerp_row_wise")
        and config.parameters.get("nuslerp_flatten", True)
    ):
        config.ignored.append(
            "parameters.nuslerp_row_wise: ignored while nuslerp_flatten is true, as mergekit ignores it"
        )
    if config.modules is not None:
        # mergekit checks each module as a recipe of its own, with the module's parameters
        # between its slices' and the recipe's.
        for module in config.modules:
            path: list[str | int] = ["modules", module.name]
            _check_params(config, fail, [*path, "parameters"], module.parameters)
            if module.models is not None:
                _check_models(config, fail, module.models, [*path, "models"], module.parameters)
            else:
                _check_slices(config, fail, module.slices or (), [*path, "slices"])
    elif config.slices is not None:
        _check_slices(config, fail, config.slices, ["slices"])
    else:
        _check_models(config, fail, config.models, ["models"], {})


def _check_params(config: MergeConfig, fail: Any, scope: list[str | int], params: Mapping[str, Any]) -> None:
    _check_names(fail, scope, config.method, params, config.ignored)
    for key, value in params.items():
        _check_value(fail, [*scope, key], config.method, key, value)


def _check_models(
    config: MergeConfig, fail: Any, models: Sequence[ModelEntry], path: list[str | int], module: Mapping[str, Any]
) -> None:
    method = config.method
    others = [m.model for m in models if method.base in ("ignored", "input") or m.model != config.base_model]
    if method.needs_base and config.base_model is None:
        raise fail(["base_model"], f"{method.name} needs a base_model")
    low, high = method.info.min_models, method.info.max_models
    if len(others) < low or (high is not None and len(others) > high):
        count = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        besides = " besides the base_model" if method.base not in ("ignored", "input") else ""
        plural = "" if low == high == 1 else "s"
        raise fail(path, f"{method.name} merges {count} model{plural}{besides}; the recipe gives {len(others)}")
    for key in method.required_global:
        if key not in config.parameters and key not in module:
            raise fail(["parameters"], f"{method.name} needs the parameter '{key}'")
    _check_params(config, fail, ["parameters"], config.parameters)
    for i, entry in enumerate(models):
        if entry.model == config.base_model and method.base not in ("ignored", "input"):
            continue
        for key in method.required_tensor:
            if key not in entry.parameters and key not in module and key not in config.parameters:
                raise fail([*path, i], f"{method.name} needs '{key}' for {entry.model}")
        _check_params(config, fail, [*path, i, "parameters"], entry.parameters)


def _check_slices(
    config: MergeConfig, fail: Any, slices: Sequence[tuple[ModelEntry, ...]], path: list[str | int]
) -> None:
    method = config.method
    every_slice_based = all(s[0].slice_base is not None for s in slices)
    if method.needs_base and config.base_model is None and not every_slice_based:
        raise fail(["base_model"], f"{method.name} needs a base_model")
    _check_params(config, fail, ["parameters"], config.parameters)
    for i, sources in enumerate(slices):
        high = method.info.max_models
        based = (sources[0].slice_base or config.base_model) if method.base not in ("ignored", "input") else None
        merged = [e for e in sources if e.model != based]
        if high is not None and len(merged) > high:
            raise fail([*path, i, "sources"], f"{method.name} takes at most {high} source(s) per slice")
        base = sources[0].slice_base
        if base is not None and method.base not in ("ignored", "input") and all(e.model != base for e in sources):
            # mergekit: "Base input is not present in merge inputs".
            raise fail([*path, i, "base_model"], f"{base} is not among the slice's sources")
        _check_params(config, fail, [*path, i, "parameters"], sources[0].slice_parameters)
        for j, entry in enumerate(sources):
            _check_params(config, fail, [*path, i, "sources", j, "parameters"], entry.parameters)


def known_parameters(method: MethodSpec) -> tuple[str, ...]:
    """Every parameter a method reads, at any scope (mergekit lets a global value stand for a
    per-model one and the reverse)."""
    return tuple(method.parameters)


def _check_names(
    fail: Any, path: Sequence[Any], method: MethodSpec, params: Mapping[str, Any], ignored: list[str]
) -> None:
    known = known_parameters(method)
    for key in params:
        if key == "weight" and key not in known:
            # mergekit's own suite gives every method a per-model weight and its methods that take
            # none ignore it; refusing would break such recipes, so it is ignored out loud.
            where = ".".join(str(p) for p in [*path, key])
            message = f"{where}: {method.name} takes no weight; ignored, as mergekit ignores it"
            if message not in ignored:
                ignored.append(message)
            continue
        if key not in known:
            names = ", ".join(known) or "none"
            raise fail([*path, key], f"{method.name} has no parameter {key!r} (its parameters: {names})")
        reason = method.parameters[key].ignored
        if reason is not None:
            where = ".".join(str(p) for p in [*path, key])
            message = f"{where}: {reason}"
            if message not in ignored:
                ignored.append(message)


def _check_value(fail: Any, path: list[str | int], method: MethodSpec, key: str, value: Any) -> None:
    if isinstance(value, list) and not value:
        raise fail(path, "an empty list is not a valid parameter value (a gradient needs at least one number)")
    check_range(method, key, _all_numbers(value), lambda message: fail(path, message))


def check_range(method: MethodSpec, key: str, values: Sequence[float], fail: Any) -> None:
    """Raises ``fail(message)`` for the first value outside the parameter's declared range."""
    parameter = method.parameters.get(key)
    if parameter is None or parameter.range is None:
        return
    low, high, low_open, high_open = parameter.range
    for v in values:
        if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
            raise fail(f"{key} {v} is outside {parameter.range_text} ({method.name}: {parameter.help})")


def _all_numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        return [v for item in value for v in _all_numbers(item.get("value") if isinstance(item, Mapping) else item)]
    return []


def out_dtype_name(config: MergeConfig, base_config: Mapping[str, Any] | None, stored: str | None = None) -> str:
    """The safetensors dtype of the output: out_dtype, else dtype, else (as mergekit, which then keeps
    the loaded tensors' dtype) the base's stored dtype, else its config.json dtype (``dtype``, as
    transformers 5 writes it, or ``torch_dtype``)."""
    base = base_config or {}
    if stored in ("F64", "F32", "F16", "BF16"):
        base = {"dtype": TORCH_NAMES[stored]}
    for name in (config.out_dtype, config.dtype, base.get("dtype"), base.get("torch_dtype")):
        if isinstance(name, str) and name in RECIPE_DTYPES:
            return RECIPE_DTYPES[name]
    return "BF16"

"""mergekit YAML recipes: parsed with PyYAML, validated into typed objects, parameters resolved per
tensor with mergekit's lookup order (per-model > global), gradients and filters."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ModelkinError

if TYPE_CHECKING:
    from .vocabulary import TokenizerSpec


class RecipeError(ModelkinError, ValueError):
    """A merge recipe is invalid; the message names the key and, for YAML, the line."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    needs_base: bool
    global_defaults: Mapping[str, object]
    required_global: tuple[str, ...] = ()
    tensor_defaults: Mapping[str, object] = field(default_factory=dict)
    required_tensor: tuple[str, ...] = ()


def _gta(name: str, summary: str, normalize: bool, rescale: bool, **extra: object) -> MethodSpec:
    return MethodSpec(
        name,
        summary,
        True,
        {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        tensor_defaults={"density": 1.0, **extra},
        required_tensor=("weight",),
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear",
            "weighted average of the models (model soup)",
            False,
            {"normalize": True},
            required_tensor=("weight",),
        ),
        _gta("task_arithmetic", "base + weighted sum of task vectors", False, False),
        _gta("ties", "top-k magnitude pruning + sign election", True, False),
        _gta("dare_ties", "random pruning with L1 rescale + sign election", False, True),
        _gta("dare_linear", "random pruning with L1 rescale", False, True),
        _gta("breadcrumbs", "drop the largest gamma and the smallest entries", False, False, gamma=0.01),
        _gta("breadcrumbs_ties", "breadcrumbs + sign election", False, False, gamma=0.01),
        _gta("della", "magnitude-ranked random pruning per row + sign election", True, True, epsilon=0.15),
        _gta("della_linear", "magnitude-ranked random pruning per row", False, True, epsilon=0.15),
        MethodSpec(
            "sce",
            "select high-variance entries, energy weights, sign election",
            True,
            {"select_topk": 1.0, "int8_mask": False},
        ),
        MethodSpec("slerp", "spherical interpolation; base_model is t=0", True, {}, required_global=("t",)),
        MethodSpec(
            "model_stock", "interpolate to the average by the task vectors' cosine", True, {"filter_wise": False}
        ),
        MethodSpec(
            "nuslerp",
            "slerp of two models (or task vectors); t from their weights",
            False,
            {"nuslerp_flatten": True, "nuslerp_row_wise": False},
            required_tensor=("weight",),
        ),
        MethodSpec(
            "multislerp",
            "barycentric interpolation of several models on the hypersphere",
            False,
            {"normalize_weights": True, "eps": 1e-8},
            required_tensor=("weight",),
        ),
        MethodSpec(
            "karcher", "Riemannian (Karcher) mean of the models' directions", False, {"max_iter": 10, "tol": 1e-5}
        ),
        MethodSpec(
            "passthrough", "copy one model's tensors (times its scale)", False, {}, tensor_defaults={"scale": 1.0}
        ),
        MethodSpec(
            "arcee_fusion",
            "keep the other model's changes whose softmax-KL importance is an outlier (median + 1.5 IQR)",
            True,
            {},
        ),
        MethodSpec(
            "ram",
            "keep task-vector entries one model contributes, average the shared ones",
            True,
            {"epsilon": 1e-5},
        ),
        MethodSpec(
            "ramplus_tl",
            "RAM with each model's own entries scaled by its shared-to-unique ratio",
            True,
            {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        ),
        MethodSpec(
            "nearswap",
            "take the other model's value where it is within t of the base's",
            True,
            {},
            required_global=("t",),
        ),
    )
}
# Methods of mergekit 0.1.5 that a later version of modelkin will add.
PLANNED: tuple[str, ...] = ()

# Decoder layer N of every architecture mergekit knows: `layers.N.` (Llama-like), `h.N.` (GPT-2,
# Bloom, Falcon), `blocks.N.`/`block.N.`/`layer.N.` (see architecture.py).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_DTYPES = {
    "float64": "F64",
    "fp64": "F64",
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: Mapping[str, Any]
    # [first, end) layers taken from this model, in a `slices:` recipe.
    layer_range: tuple[int, int] | None = None


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
    text: str
    raw: Mapping[str, Any]
    # `slices:` recipes: the sources of each output slice, in order.
    slices: tuple[tuple[ModelEntry, ...], ...] | None = None
    # Keys mergekit accepts and ignores for this method (a per-model `weight` on slerp, say): each a
    # one-line warning, printed and recorded in modelkin.json, never dropped silently.
    ignored: list[str] = field(default_factory=list)


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


def _where(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def load_config(recipe: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Reads a mergekit YAML file (or a dict with the same keys) and validates it."""
    if isinstance(recipe, Mapping):
        raw: Any = dict(recipe)
        text = yaml.safe_dump(raw, sort_keys=False)
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
        return RecipeError(f"{source}: {_where(path)}{lines.line(path)}: {message}")

    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a merge recipe is a mapping with merge_method and models")
    known = {
        "merge_method",
        "models",
        "slices",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "tokenizer",
        "chat_template",
        "name",
    }
    for key in raw:
        if key not in known:
            raise fail([key], f"unknown key (known: {', '.join(sorted(known))})")
    method_name = raw.get("merge_method")
    if method_name not in METHODS:
        hint = " (planned, not supported yet)" if method_name in PLANNED else ""
        raise fail(["merge_method"], f"unknown merge_method {method_name!r}{hint}; supported: {', '.join(METHODS)}")
    method = METHODS[method_name]
    template = raw.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise fail(["chat_template"], "chat_template must be a name (chatml, llama3, ...), auto or a Jinja template")
    slices: list[tuple[ModelEntry, ...]] | None = None
    if "slices" in raw:
        if "models" in raw:
            raise fail(["slices"], "use either models: or slices:, not both")
        slices = []
        if not isinstance(raw["slices"], list) or not raw["slices"]:
            raise fail(["slices"], "a non-empty list of slices is required")
        for i, item in enumerate(raw["slices"]):
            for key in item if isinstance(item, Mapping) else ():
                if key != "sources":
                    raise fail(["slices", i, key], f"slice-level {key} is not supported yet (only sources)")
            sources = item.get("sources") if isinstance(item, Mapping) else None
            if not isinstance(sources, list) or not sources:
                raise fail(["slices", i], "each slice needs a non-empty 'sources' list")
            entries = []
            for j, source in enumerate(sources):
                entry = _model_entry(fail, ["slices", i, "sources", j], source)
                span = source.get("layer_range")
                if not (
                    isinstance(span, list)
                    and len(span) == 2
                    and all(isinstance(v, int) for v in span)
                    and 0 <= span[0] < span[1]
                ):
                    raise fail(["slices", i, "sources", j, "layer_range"], "layer_range must be [first, end)")
                entries.append(ModelEntry(entry.model, entry.parameters, (span[0], span[1])))
            lengths = {e.layer_range[1] - e.layer_range[0] for e in entries if e.layer_range}
            if len(lengths) != 1:
                raise fail(["slices", i], "all sources of a slice must span the same number of layers")
            slices.append(tuple(entries))
        models = [e for s in slices for e in s]
    else:
        models_raw = raw.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise fail(["models"], "a non-empty list of models is required")
        models = [_model_entry(fail, ["models", i], entry) for i, entry in enumerate(models_raw)]
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise fail(["base_model"], "base_model must be a model reference")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise fail(["parameters"], "parameters must be a mapping")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in _DTYPES:
            raise fail([key], f"unsupported dtype {raw[key]!r} (float64, float32, float16, bfloat16)")
    # Imported here: the vocabulary module raises this module's RecipeError.
    from .vocabulary import parse_spec

    refs = {m.model for m in models} | ({base} if base else set())
    try:
        tokenizer = parse_spec(raw, refs)
    except RecipeError as error:
        raise fail(["tokenizer" if "tokenizer" in raw else "tokenizer_source"], str(error)) from None
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
        text=text,
        raw=raw,
        slices=tuple(slices) if slices is not None else None,
    )
    _check_method(config, fail)
    return config


def _model_entry(fail: Any, path: list[str | int], entry: Any) -> ModelEntry:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
        raise fail(path, "each entry needs a 'model' string")
    allowed = ("model", "parameters", "layer_range") if "sources" in path else ("model", "parameters")
    for key in entry:
        if key not in allowed:
            raise fail([*path, key], f"unknown key (known here: {', '.join(allowed)})")
    if "+" in entry["model"] and not Path(entry["model"]).exists():
        raise fail([*path, "model"], "LoRA references (model+lora) are not supported")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise fail([*path, "parameters"], "parameters must be a mapping")
    return ModelEntry(entry["model"], dict(params))


def _check_method(config: MergeConfig, fail: Any) -> None:
    if config.slices is not None:
        _check_slices(config, fail)
        return
    method = config.method
    names = [m.model for m in config.models]
    others = [m for m in names if m != config.base_model]
    if method.needs_base and config.base_model is None:
        raise fail(["base_model"], f"{method.name} needs a base_model")
    if method.name == "slerp" and (len(config.models) != 2 or config.base_model not in names):
        raise fail(["models"], "slerp needs exactly two models, one of them the base_model")
    if method.name == "model_stock" and len(others) + 1 < 3:
        raise fail(["models"], "model_stock needs at least three models counting the base")
    if method.name == "nuslerp" and len(others) != 2:
        raise fail(["models"], "nuslerp needs exactly two models besides the base")
    if (
        method.name == "nuslerp"
        and config.parameters.get("nuslerp_row_wise")
        and config.parameters.get("nuslerp_flatten", True)
    ):
        config.ignored.append(
            "parameters.nuslerp_row_wise: ignored while nuslerp_flatten is true, as mergekit ignores it"
        )
    if method.name == "arcee_fusion" and len(others) != 1:
        raise fail(["models"], "arcee_fusion needs exactly one model besides the base_model")
    if method.name == "nearswap" and len(others) != 1:
        raise fail(["models"], "nearswap needs exactly one model besides the base_model")
    if method.name == "passthrough" and len(config.models) != 1:
        raise fail(["models"], "passthrough with models: takes exactly one model")
    for key in method.required_global:
        if key not in config.parameters:
            raise fail(["parameters"], f"{method.name} needs the parameter '{key}'")
    for i, entry in enumerate(config.models):
        if entry.model == config.base_model and method.name != "linear":
            continue
        for key in method.required_tensor:
            if key not in entry.parameters and key not in config.parameters:
                raise fail(["models", i], f"{method.name} needs '{key}' for {entry.model}")
        for scope, params in ((["models", i, "parameters"], entry.parameters), (["parameters"], config.parameters)):
            _check_names(fail, scope, method, params, config.ignored)
            for key, value in params.items():
                _check_value(fail, [*scope, key], key, value)


def _check_slices(config: MergeConfig, fail: Any) -> None:
    method = config.method
    if method.needs_base and config.base_model is None:
        raise fail(["base_model"], f"{method.name} needs a base_model")
    for i, sources in enumerate(config.slices or ()):
        if method.name == "passthrough" and len(sources) != 1:
            raise fail(["slices", i, "sources"], "passthrough takes exactly one source per slice")
        for j, entry in enumerate(sources):
            for scope, params in (
                (["slices", i, "sources", j, "parameters"], entry.parameters),
                (["parameters"], config.parameters),
            ):
                _check_names(fail, scope, method, params, config.ignored)
                for key, value in params.items():
                    _check_value(fail, [*scope, key], key, value)


def known_parameters(method: MethodSpec) -> tuple[str, ...]:
    """Every parameter a method reads, at any scope (mergekit lets a global value stand for a
    per-model one and the reverse)."""
    return tuple(
        dict.fromkeys(
            [*method.required_global, *method.global_defaults, *method.required_tensor, *method.tensor_defaults]
        )
    )


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
        if method.name == "task_arithmetic" and key in ("density", "rescale"):
            # mergekit 0.1.5 declares both for task_arithmetic but prunes nothing: no effect.
            where = ".".join(str(p) for p in [*path, key])
            message = f"{where}: task_arithmetic does not prune; ignored, as mergekit ignores it"
            if message not in ignored:
                ignored.append(message)


def _check_value(fail: Any, path: list[str | int], key: str, value: Any) -> None:
    values = _all_numbers(value)
    if isinstance(value, list) and not value:
        raise fail(path, "an empty list is not a valid parameter value (a gradient needs at least one number)")
    if key == "density":
        for v in values:
            if not 0 <= v <= 1:
                raise fail(path, f"density {v} is outside [0, 1]")


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
        base = {"dtype": {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[stored]}
    for name in (config.out_dtype, config.dtype, base.get("dtype"), base.get("torch_dtype")):
        if isinstance(name, str) and name in _DTYPES:
            return _DTYPES[name]
    return "BF16"


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
    config: MergeConfig, entry: ModelEntry | None, key: str, tensor: str, t: float | None, default: object = None
) -> Any:
    """mergekit's order: the model's own parameters, then the global ones, then the default."""
    for params in ((entry.parameters if entry else {}), config.parameters):
        if key in params:
            value = evaluate(params[key], tensor, t)
            if value is not None:
                return value
    return default

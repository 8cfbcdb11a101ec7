"""Every key mergekit 0.1.5's configuration schema knows, fed to modelkin: each one is either used
(the output changes, or the metadata it governs does) or refused with an error naming it. None is
accepted and dropped. The parameter lists are mergekit 0.1.5's method specs, transcribed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_mergekit_suite import picollama

from merge_reference import read_safetensors, stored_dtypes
from modelkin.merge.merging import merge
from modelkin.merge.recipe import METHODS, RecipeError

# mergekit 0.1.5: each method's parameters (name, scope), from its registry's specs.
MERGEKIT_PARAMETERS: dict[str, list[tuple[str, str]]] = {
    "multislerp": [("weight", "NON_BASE"), ("normalize_weights", "SHARED"), ("eps", "SHARED")],
    "nearswap": [("t", "SHARED")],
    "ram": [("epsilon", "SHARED")],
    "ramplus_tl": [("r", "SHARED"), ("alpha", "SHARED"), ("epsilon", "SHARED")],
    "sce": [("int8_mask", "SHARED"), ("select_topk", "SHARED")],
    "linear": [("weight", "INPUT"), ("normalize", "SHARED")],
    "slerp": [("t", "SHARED")],
    "nuslerp": [("weight", "NON_BASE"), ("nuslerp_row_wise", "SHARED"), ("nuslerp_flatten", "SHARED")],
    "passthrough": [("scale", "INPUT")],
    "model_stock": [("filter_wise", "SHARED")],
    "arcee_fusion": [],
    "karcher": [("max_iter", "SHARED"), ("tol", "SHARED")],
}
_GTA = [("int8_mask", "SHARED"), ("normalize", "SHARED"), ("rescale", "SHARED"), ("lambda", "SHARED")]
_GTA += [("weight", "NON_BASE"), ("density", "NON_BASE")]
for _name in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
    MERGEKIT_PARAMETERS[_name] = list(_GTA)
for _name in ("breadcrumbs", "breadcrumbs_ties"):
    MERGEKIT_PARAMETERS[_name] = [*_GTA, ("gamma", "NON_BASE")]
for _name in ("della", "della_linear"):
    MERGEKIT_PARAMETERS[_name] = [*_GTA, ("epsilon", "NON_BASE")]

# Parameters whose values cannot change the merged numbers, by mergekit's own definition.
NO_NUMERIC_EFFECT = {
    # The dtype of the sign-election mask: int8 or the working dtype hold the same 0/1 values.
    "int8_mask": "mask storage type only",
}

# A value other than the default, per parameter, and the setting that lets it act.
NEW_VALUE: dict[str, object] = {
    "weight": 0.3,
    "normalize": "flip",
    "rescale": "flip",
    "lambda": 0.5,
    "density": 0.3,
    "gamma": 0.1,
    "epsilon": 0.02,
    "normalize_weights": "flip",
    "eps": 0.01,
    "t": 0.8,
    "select_topk": 0.3,
    "nuslerp_row_wise": "flip",
    "nuslerp_flatten": "flip",
    "scale": 0.5,
    "filter_wise": "flip",
    "max_iter": 1,
    "tol": 0.5,
    "int8_mask": "flip",
    "r": 0.5,
    "alpha": 0.05,
}
# What a method needs to run at all in these tests (its required parameters and a pruning density
# for the rescale, gamma and epsilon to act on).
BASELINE: dict[str, dict[str, object]] = {
    "slerp": {"t": 0.3},
    "nearswap": {"t": 0.01},
    "breadcrumbs": {"density": 0.8},
    "breadcrumbs_ties": {"density": 0.8},
    "della": {"density": 0.5},
    "della_linear": {"density": 0.5},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    # Entries some models contribute alone, so that RAM+'s λ acts.
    "ramplus_tl": {"epsilon": 0.03},
}
# Parameters mergekit declares for a method and then never reads: modelkin runs the recipe, warns and
# records the key in modelkin.json's `ignored`.
DECLARED_UNUSED = {("task_arithmetic", "density"), ("task_arithmetic", "rescale")}
# nuslerp_row_wise only acts with nuslerp_flatten: false (mergekit ignores it otherwise).
DECLARED_UNUSED |= {("nuslerp", "nuslerp_row_wise")}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    return [picollama(root / name, seed) for name, seed in (("base", 41), ("one", 42), ("two", 43), ("three", 44))]


def recipe(method: str, trio: list[str], parameters: dict, per_model: dict | None = None) -> dict:
    base, *models = trio
    if method in ("slerp", "nearswap", "nuslerp"):
        models = {"slerp": [base, models[0]], "nearswap": models[:1], "nuslerp": models[:2]}[method]
    if method == "nuslerp" and "nuslerp_flatten" not in parameters:
        base = None
    entries = [{"model": m, "parameters": {"weight": 0.5 + 0.2 * i, **(per_model or {})}} for i, m in enumerate(models)]
    if method in ("slerp", "nearswap", "model_stock", "karcher", "sce"):
        entries = [{"model": m, **({"parameters": per_model} if per_model else {})} for m in models]
    if method == "passthrough":
        entries = [{"model": models[0], **({"parameters": per_model} if per_model else {})}]
    config: dict = {"merge_method": method, "models": entries, "dtype": "float32", "parameters": parameters}
    if METHODS[method].needs_base or (method in ("multislerp", "nuslerp") and base):
        config["base_model"] = base
    return config


def run(tmp_path: Path, name: str, config: dict) -> dict[str, np.ndarray]:
    out = tmp_path / name
    merge(config, out, seed=7)
    return read_safetensors(out)


def differs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return any(not np.array_equal(a[k], b[k]) for k in a)


CASES = [
    (method, name, scope)
    for method, parameters in sorted(MERGEKIT_PARAMETERS.items())
    for name, scope in parameters
    if method in METHODS
]


@pytest.mark.parametrize(("method", "name", "scope"), CASES)
def test_every_method_parameter_is_used(tmp_path, trio, method, name, scope):
    """Each of mergekit's parameters of a supported method changes the output when set away from its
    default (globally, or per model for per-model ones), or has no numeric effect by definition."""
    spec = METHODS[method]
    default = {**spec.global_defaults, **spec.tensor_defaults}.get(name)
    value = NEW_VALUE[name]
    if value == "flip":
        value = not bool(default)
    global_parameters = dict(BASELINE.get(method, {}))
    before = run(tmp_path, "before", recipe(method, trio, global_parameters))
    if scope == "SHARED" or name not in ("weight", "density", "gamma", "epsilon", "scale"):
        after_config = recipe(method, trio, {**global_parameters, name: value})
    else:
        after_config = recipe(method, trio, global_parameters, {name: value})
    if method == "passthrough" and name == "scale":
        after_config = recipe(method, trio, {}, {"scale": value})
    after = run(tmp_path, "after", after_config)
    if (method, name) in DECLARED_UNUSED:
        ignored = json.loads((tmp_path / "after" / "modelkin.json").read_text())["ignored"]
        assert not differs(before, after) and any(name in line and "ignored" in line for line in ignored), ignored
    elif name in NO_NUMERIC_EFFECT:
        assert not differs(before, after), NO_NUMERIC_EFFECT[name]
    else:
        assert differs(before, after), f"{method}: {name}={value!r} changed nothing"
    if method == "nuslerp" and name == "nuslerp_row_wise":
        flat_off = {**global_parameters, "nuslerp_flatten": False}
        rows = run(tmp_path, "rows", recipe(method, trio, flat_off))
        columns = run(tmp_path, "columns", recipe(method, trio, {**flat_off, name: True}))
        assert differs(rows, columns), "with nuslerp_flatten: false, row_wise changes the vectors"


@pytest.mark.parametrize("method", sorted(set(MERGEKIT_PARAMETERS) - set(METHODS)))
def test_unsupported_methods_are_refused_by_name(trio, method, tmp_path):
    config = {"merge_method": method, "models": [{"model": trio[1]}, {"model": trio[2]}], "base_model": trio[0]}
    with pytest.raises(RecipeError, match=method):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_method_parameters_are_refused(trio, tmp_path):
    config = recipe("ties", trio, {"density": 0.5, "nonsense": 1})
    with pytest.raises(RecipeError, match="nonsense"):
        merge(config, tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"modules": {"text": {"models": []}}}, "not models and modules"),
        ({"slices": "bogus"}, "bogus"),
        ({"slices": "base_model"}, "base_model"),
        ({"slices": "parameters"}, "parameters"),
        ({"unknown_top_level": 1}, "unknown_top_level"),
    ],
)
def test_unsupported_schema_keys_are_refused(trio, tmp_path, change, key):
    """`modules:` beside `models:`, an unknown slice-level key, and slice-level base_model and
    parameters of the wrong type: refused by name (the slice-level keys and `modules:` themselves
    run: test_mergekit_suite, test_modules)."""
    config: dict = {"merge_method": "linear", "dtype": "float32"}
    if "slices" in change:
        config["slices"] = [{"sources": [{"model": trio[1], "layer_range": [0, 2]}], key: 0.5}]
    else:
        config["models"] = [{"model": trio[1]}, {"model": trio[2]}]
        config.update(change)
    with pytest.raises(RecipeError, match=key):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_top_level_keys_are_used(trio, tmp_path):
    """dtype, out_dtype, base_model, parameters, models, slices and name each act on the output
    (tokenizer_source, tokenizer and chat_template: tests/test_mergekit_tokenizer.py)."""
    base, one, two, _ = trio
    plain = {"merge_method": "task_arithmetic", "models": [{"model": one}, {"model": two}], "base_model": base}
    plain["parameters"] = {"weight": 0.5}
    first = run(tmp_path, "plain", {**plain, "dtype": "float32"})
    assert differs(first, run(tmp_path, "bf16", {**plain, "dtype": "bfloat16", "out_dtype": "float32"}))
    merge({**plain, "out_dtype": "float16"}, tmp_path / "f16")
    assert set(stored_dtypes(tmp_path / "f16").values()) == {"F16"}
    other_base = {**plain, "base_model": trio[3], "dtype": "float32"}
    assert differs(first, run(tmp_path, "base", other_base))
    assert differs(first, run(tmp_path, "weights", {**plain, "dtype": "float32", "parameters": {"weight": 0.9}}))
    sliced = {"merge_method": "passthrough", "slices": [{"sources": [{"model": one, "layer_range": [0, 1]}]}]}
    assert len(run(tmp_path, "sliced", sliced)) < len(first)
    merge({**plain, "name": "my-merge"}, tmp_path / "named")
    assert "# my-merge" in (tmp_path / "named" / "README.md").read_text().splitlines()

"""Half-precision arithmetic (`dtype: bfloat16` / `float16`) against an independent numpy emulation of
mergekit 0.1.5's order of operations: inputs loaded in the half type, each elementwise torch op
computed in float32 and rounded to the half type, sums over the models accumulated in float32 and
rounded once, weights held in the half type, `lambda` a float32 scalar. Runs without mergekit or torch;
test_mergekit_compat checks the same against mergekit where it is installed."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml

from merge_reference import read_safetensors, stored_dtypes
from modelkin.io.safetensors import save_model
from modelkin.merge.merging import merge

HALF = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SHAPES = {"a.weight": (48, 40), "b.weight": (40,), "c.weight": (7, 9)}
WEIGHTS = [1.0, 0.6, 0.3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three fine-tunes stored in float32, so loading them as half rounds their values."""
    root = tmp_path_factory.mktemp("half")
    rng = np.random.default_rng(7)
    base = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in SHAPES.items()}
    values = [base]
    save_model(root / "base", base, "F32")
    for i in range(3):
        tuned = {n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in base.items()}
        save_model(root / f"ft{i}", tuned, "F32")
        values.append(tuned)
    return root, values


def rounding(dtype: str):
    half = HALF[dtype]
    return lambda x: np.asarray(x, np.float32).astype(half).astype(np.float32)


def task_arithmetic_half(z, xs, weights, *, lam, normalize, consensus, r):
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group, step by step, in the half type."""
    z = r(z)
    w = [r(np.float32(x)) for x in weights]
    c = [r(r(r(x) - z) * wi) for x, wi in zip(xs, w, strict=True)]
    if consensus:
        majority = np.where(r(c[0] + c[1] + c[2]) >= 0, 1, -1)
        mask = [np.sign(ci) == majority for ci in c]
        mixed = r(c[0] * mask[0] + c[1] * mask[1] + c[2] * mask[2])
        divisor = r(w[0] * mask[0] + w[1] * mask[1] + w[2] * mask[2])
        divisor[divisor == 0] = 1
    else:
        mixed = r(c[0] + c[1] + c[2])
        divisor = r(w[0] + w[1] + w[2])
    if normalize:
        mixed = r(mixed / divisor)
    if lam != 1:
        mixed = r(mixed * np.float32(lam))
    return r(z + mixed)


def run(root: Path, recipe: dict, out: str, **kwargs) -> dict:
    path = root / f"{out}.yml"
    path.write_text(yaml.safe_dump(recipe))
    merge(path, root / out, overwrite=True, **kwargs)
    return read_safetensors(root / out)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("task_arithmetic", {"lambda": 0.7}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {}),
        ("ties", {"lambda": 1.3}),
    ],
)
def test_task_arithmetic_rounds_as_mergekit(models, method, options, dtype):
    root, values = models
    recipe = {
        "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(WEIGHTS)],
        "merge_method": method,
        "base_model": str(root / "base"),
        "dtype": dtype,
        "parameters": options,
    }
    out = run(root, recipe, f"{method}-{dtype}")
    r = rounding(dtype)
    normalize = options.get("normalize", method == "ties")
    for name in SHAPES:
        want = task_arithmetic_half(
            values[0][name],
            [v[name] for v in values[1:]],
            WEIGHTS,
            lam=options.get("lambda", 1.0),
            normalize=normalize,
            consensus=method == "ties",
            r=r,
        )
        np.testing.assert_array_equal(out[name], want, err_msg=name)
    assert set(stored_dtypes(root / f"{method}-{dtype}").values()) == {"BF16" if dtype == "bfloat16" else "F16"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_linear_works_in_float32_from_half_inputs(models, dtype):
    """mergekit's linear loads half inputs, accumulates in float32 (addcmul_) and rounds once."""
    root, values = models
    recipe = {
        "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(WEIGHTS)],
        "merge_method": "linear",
        "dtype": dtype,
    }
    out = run(root, recipe, f"linear-{dtype}")
    r = rounding(dtype)
    w = [np.float32(x) for x in WEIGHTS]
    for name in SHAPES:
        acc = np.zeros(SHAPES[name], np.float32)
        for x, wi in zip(values[1:], w, strict=True):
            # The product of two float32 values is exact in float64: addcmul_ rounds only the sum.
            acc = (acc.astype(np.float64) + r(x[name]).astype(np.float64) * wi).astype(np.float32)
        want = r(acc / np.float32(w[0] + w[1] + w[2]))
        np.testing.assert_array_equal(out[name], want, err_msg=name)


def test_precise_rounds_once_and_the_card_says_which(models):
    root, values = models
    recipe = {
        "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(WEIGHTS)],
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "dtype": "bfloat16",
        "parameters": {"lambda": 0.7},
    }
    precise = run(root, recipe, "precise", precise=True)
    default = run(root, recipe, "default")
    r = rounding("bfloat16")
    differs = 0
    for name in SHAPES:
        z = values[0][name].astype(np.float64)
        exact = z + 0.7 * sum(w * (v[name].astype(np.float64) - z) for w, v in zip(WEIGHTS, values[1:], strict=True))
        np.testing.assert_array_equal(precise[name], r(exact.astype(np.float32)), err_msg=name)
        differs += int((precise[name] != default[name]).sum())
    assert differs > 0, "the data should tell the two orders of rounding apart"
    assert "exact (float64" in (root / "precise" / "README.md").read_text()
    assert "bfloat16, rounded after each operation" in (root / "default" / "README.md").read_text()
    provenance = json.loads((root / "default" / "modelkin.json").read_text())
    assert provenance["parameters"]["resolved_defaults"]["arithmetic"] == "bfloat16"


def test_no_dtype_computes_in_the_stored_dtype(models, tmp_path):
    """Without `dtype` mergekit keeps the loaded tensors' dtype: bf16 inputs give bf16 arithmetic."""
    _, values = models
    r = rounding("bfloat16")
    for name in ("base", "ft0", "ft1", "ft2"):
        i = ["base", "ft0", "ft1", "ft2"].index(name)
        save_model(tmp_path / name, {k: r(v) for k, v in values[i].items()}, "BF16")
    recipe = {
        "models": [{"model": str(tmp_path / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(WEIGHTS)],
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
    }
    out = run(tmp_path, recipe, "out")
    for name in SHAPES:
        want = task_arithmetic_half(
            values[0][name], [v[name] for v in values[1:]], WEIGHTS, lam=1.0, normalize=True, consensus=True, r=r
        )
        np.testing.assert_array_equal(out[name], want, err_msg=name)

"""Compatibility with mergekit 0.1.5 on the same YAML: every dtype, bit for bit.

mergekit is a peer, not a dependency: these tests run where `mergekit-yaml` is on PATH (or named by
MODELKIN_MERGEKIT) and skip with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from peer import peer_python

from merge_reference import read_safetensors, stored_dtypes
from modelkin.example import write_example_family
from modelkin.merge.merging import merge
from modelkin.merge.mkl import mkl_library

MERGEKIT = os.environ.get("MODELKIN_MERGEKIT") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit-yaml not found (install mergekit==0.1.5 in a separate venv)"
)


def bf16_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def ordered(v: np.ndarray) -> np.ndarray:
        bits = v.astype(np.float32).view(np.int32).astype(np.int64) >> 16
        return np.where(bits < 0, -(bits & 0x7FFF), bits)

    return np.abs(ordered(a) - ordered(b))


def run_both(tmp_path, recipe: dict) -> tuple[dict, dict]:
    """Runs a recipe with modelkin and with mergekit; returns both outputs' tensors."""
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    merge(path, tmp_path / "ours")
    subprocess.run(
        [MERGEKIT, str(path), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return read_safetensors(tmp_path / "ours"), read_safetensors(tmp_path / "theirs")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_example_family(tmp_path_factory.mktemp("family"))


CASES = {
    "linear": ([{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.5}], 0.9999),
    "task_arithmetic": ([{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.5}], 0.9999),
    "dare_linear": ([{"weight": 1.0, "density": 1.0}, {"weight": 0.6, "density": 1.0}], 0.9999),
    # Factors from torch's float32 norms and sums, reproduced (for torch's thread count here).
    "slerp": ([{}], 1.0),
    "model_stock": ([{}, {}, {}], 1.0),
    # bf16 deltas are coarse, so many entries tie with the magnitude threshold; modelkin splits them
    # as torch's unstable CPU sort does, so even those match.
    "ties": (
        [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}, {"weight": 0.5, "density": 0.9}],
        1.0,
    ),
    # Four whole-tensor reductions in torch's order, then every step in the working dtype.
    "multislerp": ([{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.5}], 1.0),
    # torch's float64 variance, its topk's ties (libstdc++'s nth_element), row sums, sign election.
    "sce": ([{}, {}, {}], 1.0),
    "breadcrumbs": ([{"weight": 1.0, "density": 0.8, "gamma": 0.02}, {"weight": 0.6, "density": 0.6}], 1.0),
    "breadcrumbs_ties": (
        [{"weight": 1.0, "density": 0.8, "gamma": 0.02}, {"weight": 0.6, "density": 0.6, "gamma": 0.05}],
        1.0,
    ),
}


def case_recipe(family, method: str, precision: dict) -> dict:
    """The recipe of one CASES entry on the example family, with the given dtype keys."""
    params, _ = CASES[method]
    names = ["math-a", "code", "math-code"][: len(params)]
    recipe = {
        "models": [{"model": str(family[n]), "parameters": p} for n, p in zip(names, params, strict=True)],
        "merge_method": method,
        **precision,
    }
    if method != "linear":
        recipe["base_model"] = str(family["base"])
    if method == "sce":
        recipe["parameters"] = {"select_topk": 0.4}
    if method == "slerp":
        recipe["models"].append({"model": str(family["base"])})
        recipe["parameters"] = {"t": 0.3}
    return recipe


@pytest.mark.parametrize("method", list(CASES))
def test_same_tensors_as_mergekit(tmp_path, family, method):
    _, required = CASES[method]
    recipe = case_recipe(family, method, {"dtype": "float32", "out_dtype": "bfloat16"})
    ours, theirs = run_both(tmp_path, recipe)
    assert set(ours) == set(theirs)
    same = total = 0
    for name, value in theirs.items():
        ulps = bf16_ulps(ours[name], value)
        if required > 0.999:
            assert ulps.max() <= 1, name
        same += int((ulps == 0).sum())
        total += ulps.size
    assert same / total >= required


# slerp with dtype float32 and a float32 output is left out: its factors come from torch's float32
# acos and sin (MKL's vector math), an ulp away from the C library's on a few percent of arguments
# (any half output hides that, see the test above; test_float32_angles_are_the_only_difference
# shows the rest is exact).
@pytest.mark.parametrize("max_iter", [1, 10])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_karcher_in_half_dtypes_gives_mergekits_bits(tmp_path, family, dtype, max_iter):
    """karcher with the base among the means (0.1.5): every iteration's half-precision dots
    (torch's own kernel), roundings and norms follow torch, so the output is identical. With
    dtype float32 its dot is the BLAS library's (MKL), whose order is not reproduced."""
    recipe = {
        "models": [{"model": str(family[n])} for n in ("math-a", "code", "math-code")],
        "merge_method": "karcher",
        "base_model": str(family["base"]),
        "parameters": {"max_iter": max_iter},
        "dtype": dtype,
    }
    ours, theirs = run_both(tmp_path, recipe)
    assert stored_dtypes(tmp_path / "ours") == stored_dtypes(tmp_path / "theirs")
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=f"karcher {dtype} {name}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("method", [m for m in CASES if m != "breadcrumbs"])
def test_every_dtype_gives_mergekits_bits(tmp_path, family, method, dtype):
    """dtype as the recipe says and no out_dtype: mergekit loads the inputs in dtype and rounds after
    each torch operation; modelkin follows that order, so every element is identical."""
    if method == "slerp" and dtype == "float32" and mkl_library() is None:
        pytest.skip("torch's float32 acos/sin are MKL's; MKL is not installed here (factors 1 ulp apart)")
    recipe = case_recipe(family, method, {"dtype": dtype})
    ours, theirs = run_both(tmp_path, recipe)
    assert stored_dtypes(tmp_path / "ours") == stored_dtypes(tmp_path / "theirs")
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=f"{method} {dtype} {name}")


SPHERICAL_FLOAT32 = {
    "slerp": None,
    "multislerp": None,
    "nuslerp": {},
    "nuslerp-rows": {"nuslerp_flatten": False},
    "nuslerp-columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
}
# karcher's float32 dot is BLAS (MKL's sdot), which only MKL reproduces.
WITH_MKL_FLOAT32 = [*SPHERICAL_FLOAT32, "karcher"]


def spherical_float32_recipe(family, case: str) -> dict:
    method = case.split("-")[0]
    if method == "nuslerp":
        recipe = {
            "models": [
                {"model": str(family[n]), "parameters": {"weight": w}} for n, w in (("math-a", 0.7), ("code", 0.4))
            ],
            "merge_method": "nuslerp",
            "base_model": str(family["base"]),
            "parameters": SPHERICAL_FLOAT32[case],
            "dtype": "float32",
        }
    elif method == "karcher":
        recipe = {
            "models": [{"model": str(family[n])} for n in ("math-a", "code", "math-code")],
            "merge_method": "karcher",
            "base_model": str(family["base"]),
            "dtype": "float32",
        }
    else:
        recipe = case_recipe(family, method, {"dtype": "float32"})
    return recipe


@pytest.mark.parametrize("case", list(SPHERICAL_FLOAT32))
def test_float32_angles_are_the_only_difference(tmp_path, family, case, monkeypatch):
    """With dtype float32 mergekit takes its angles from torch's float32 acos/sin/cos, which in
    torch's MKL builds come from MKL's vector math (an ulp from the C library's on a few percent of
    arguments; its algorithm is unpublished). Without MKL modelkin uses the C library's; with
    mergekit's trig swapped for those too, every spherical method is bit for bit: norms, sums and
    roundings all follow torch."""
    python = peer_python(MERGEKIT)
    if python is None:
        pytest.skip("mergekit's venv Python is needed to run it with the C library's trig")
    monkeypatch.setenv("MODELKIN_MKL", "")
    recipe = spherical_float32_recipe(family, case)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    merge(path, tmp_path / "ours")
    script = Path(__file__).with_name("mergekit_libm_trig.py")
    subprocess.run(
        [str(python), str(script), str(path), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    ours, theirs = read_safetensors(tmp_path / "ours"), read_safetensors(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=f"{case} {name}")


@pytest.mark.parametrize("case", WITH_MKL_FLOAT32)
def test_float32_spherical_methods_with_mkl_give_mergekits_bits(tmp_path, family, case):
    """With MKL installed (the `mkl` extra, the version torch bundles) modelkin takes float32 angles
    from MKL's vector math and karcher's dots from MKL's sdot on torch's threads, as torch does:
    slerp, multislerp, nuslerp (every layout) and karcher in dtype float32 are then bit for bit."""
    if mkl_library() is None:
        pytest.skip("MKL is not installed here (pip install 'modelkin[mkl]')")
    recipe = spherical_float32_recipe(family, case)
    ours, theirs = run_both(tmp_path, recipe)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=f"{case} {name}")


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_streamed_tie_rule_is_bit_identical_when_no_entry_ties_with_a_threshold(tmp_path, monkeypatch, method):
    """Tensors over the sort-order budget use the streamed threshold; with no ties it is exact."""
    from modelkin import example
    from modelkin.merge import planner

    monkeypatch.setattr(planner, "SORT_ORDER_BYTES", 0)
    from modelkin.io.safetensors import save_model

    rng = np.random.default_rng(0)
    base = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in example._shapes().items()}
    config = example._config(example.VOCAB)
    save_model(tmp_path / "base", base, "F32", config=config)
    for i in range(3):
        tuned = {n: (v + rng.normal(0, 0.002, v.shape)).astype(np.float32) for n, v in base.items()}
        save_model(tmp_path / f"ft{i}", tuned, "F32", config=config)
    params = CASES["ties"][0]
    if method == "breadcrumbs":
        params = [{**p, "density": 0.8, "gamma": 0.02} for p in params]
    recipe = {
        "models": [{"model": str(tmp_path / f"ft{i}"), "parameters": p} for i, p in enumerate(params)],
        "merge_method": method,
        "base_model": str(tmp_path / "base"),
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    ours, theirs = run_both(tmp_path, recipe)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)

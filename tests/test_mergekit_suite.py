"""mergekit 0.1.5's own merge tests (tests/test_basic_merges.py), transcribed: the same recipes on
models of the same shapes (built here with numpy), with the suite's checks (an output and a
config.json, no NaN, every tensor of the architecture, the per-test validations). Where mergekit is
installed (`mergekit-yaml` on PATH or MODELKIN_MERGEKIT), the deterministic recipes also run through
it and the outputs must be identical tensor by tensor.

Not transcribed: the Granite and LLaVA variants (the same methods on other layouts). The recipes
modelkin does not support yet are asserted to be refused by name, so none exits 0 half-applied."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from peer import check_loads, peer_python

from merge_reference import read_safetensors, stored_dtypes
from modelkin.io.safetensors import save_model
from modelkin.merge.merging import merge
from modelkin.merge.recipe import RecipeError

MERGEKIT = os.environ.get("MODELKIN_MERGEKIT") or shutil.which("mergekit-yaml")


def picollama(path: Path, seed: int, vocab: int = 64) -> str:
    """tests/common.py make_picollama: LlamaForCausalLM, hidden 32, intermediate 48, 16 heads, 2
    layers, vocabulary 64 (or ``vocab``), float32, untied head."""
    rng = np.random.default_rng(seed)
    h, i, v = 32, 48, vocab
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        shapes.update({f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)})
        shapes.update({f"{p}self_attn.{n}_proj.weight": (h, h) for n in "qkvo"})
        shapes.update({f"{p}mlp.gate_proj.weight": (i, h), f"{p}mlp.up_proj.weight": (i, h)})
        shapes[f"{p}mlp.down_proj.weight"] = (h, i)
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    tensors = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_hidden_layers": 2,
        "vocab_size": v,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    save_model(path, tensors, "F32", config=config)
    return str(path)


def gpt2_like(path: Path) -> str:
    """tests/common.py make_gpt2size's layout (GPT2LMHeadModel: `transformer.h.N.`, `n_layer`, tied
    head), 12 layers, narrowed to 32 wide and a 64-token vocabulary so the test stays small."""
    rng = np.random.default_rng(11)
    e, v = 32, 64
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, e), "transformer.wpe.weight": (64, e)}
    for layer in range(12):
        p = f"transformer.h.{layer}."
        shapes.update({f"{p}ln_1.weight": (e,), f"{p}ln_1.bias": (e,), f"{p}ln_2.weight": (e,), f"{p}ln_2.bias": (e,)})
        shapes.update({f"{p}attn.c_attn.weight": (e, 3 * e), f"{p}attn.c_attn.bias": (3 * e,)})
        shapes.update({f"{p}attn.c_proj.weight": (e, e), f"{p}attn.c_proj.bias": (e,)})
        shapes.update({f"{p}mlp.c_fc.weight": (e, 4 * e), f"{p}mlp.c_fc.bias": (4 * e,)})
        shapes.update({f"{p}mlp.c_proj.weight": (4 * e, e), f"{p}mlp.c_proj.bias": (e,)})
    shapes.update({"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)})
    tensors = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": e,
        "n_head": 4,
        "n_layer": 12,
        "n_positions": 64,
        "n_ctx": 64,
        "vocab_size": v,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    save_model(path, tensors, "F32", config=config)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return {
        "a": picollama(root / "model_a", 1),
        "b": picollama(root / "model_b", 2),
        "c": picollama(root / "model_c", 3),
        "gpt2": gpt2_like(root / "gpt2_like"),
    }


def two_model_config(a: str, b: str, method: str, base: str | None = None, params: dict | None = None) -> dict:
    config: dict = {
        "merge_method": method,
        "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
        "dtype": "bfloat16",
    }
    if base is not None:
        config["base_model"] = base
    if params is not None:
        config["parameters"] = params
    return config


def run_and_check_merge(tmp_path: Path, config: dict, deterministic: bool = True) -> Path:
    """The suite's run_and_check_merge: a model and a config.json, no NaN, every input tensor; then,
    where mergekit is installed and the method is deterministic, mergekit's output bit for bit."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    merge(recipe, out, overwrite=True)
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").exists()
    tensors = read_safetensors(out)
    for name, value in tensors.items():
        assert not np.isnan(value).any(), f"{name} contains NaN"
    python = peer_python(MERGEKIT)
    if python is not None:
        check_loads(python, out)
    if MERGEKIT is not None and deterministic:
        theirs = tmp_path / "theirs"
        shutil.rmtree(theirs, ignore_errors=True)
        subprocess.run([MERGEKIT, str(recipe), str(theirs)], check=True, capture_output=True, timeout=600)
        assert stored_dtypes(out) == stored_dtypes(theirs)
        # config.json names the dtype mergekit names (the recipe's, for methods a float32 factor
        # promotes to float32 tensors).
        mine, their_config = (json.loads((d / "config.json").read_text()) for d in (out, theirs))
        assert mine["dtype"] == (their_config.get("dtype") or their_config.get("torch_dtype"))
        for name, value in read_safetensors(theirs).items():
            np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    return out


def test_gpt2_copy(tmp_path, models):
    config = {"merge_method": "passthrough", "models": [{"model": models["gpt2"]}], "dtype": "bfloat16"}
    out = run_and_check_merge(tmp_path, config)
    assert set(read_safetensors(out)) == set(stored_dtypes(Path(models["gpt2"])))


def test_gpt2_stack(tmp_path, models):
    """Two copies of the twelve `transformer.h.N.` layers: 24 layers, `n_layer: 24` (no Llama key)."""
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": models["gpt2"], "layer_range": [0, 12]}]}] * 2,
        "dtype": "bfloat16",
    }
    out = run_and_check_merge(tmp_path, config)
    written = json.loads((out / "config.json").read_text())
    assert written["n_layer"] == 24 and "num_hidden_layers" not in written
    tensors = read_safetensors(out)
    assert len(tensors) == 24 * 12 + 4
    source = read_safetensors(Path(models["gpt2"]))
    for layer in range(24):
        copied = source[f"transformer.h.{layer % 12}.mlp.c_fc.weight"].astype(np.float32).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(tensors[f"transformer.h.{layer}.mlp.c_fc.weight"], copied.astype(np.float64))


def test_passthrough_scale(tmp_path, models):
    config = {
        "merge_method": "passthrough",
        "models": [{"model": models["a"], "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}],
    }
    out = run_and_check_merge(tmp_path, config)
    tensors = read_safetensors(out)
    o_proj = [n for n in tensors if "o_proj" in n]
    assert o_proj and all((tensors[n] == 0).all() for n in o_proj)
    assert np.count_nonzero(tensors["lm_head.weight"]) > 0


@pytest.mark.parametrize(
    ("method", "base", "params", "deterministic"),
    [
        ("linear", None, None, True),
        ("slerp", "a", {"t": 0.35}, True),
        ("task_arithmetic", "c", None, True),
        ("breadcrumbs", "c", None, True),
        ("ties", "c", {"density": 0.3}, True),
        ("sce", "c", {"select_topk": 0.5}, True),
        ("multislerp", "c", None, True),
        ("dare_ties", "c", {"density": 0.66}, False),
        ("nearswap", "a", {"t": 0.0001}, True),
        ("della", "c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}, False),
        ("karcher", "c", {"max_iter": 5, "tol": 1e-5}, True),
        ("ram", "c", None, True),
        ("ramplus_tl", "c", {"r": 0.05, "alpha": 1.0}, True),
    ],
)
def test_two_model_merges(tmp_path, models, method, base, params, deterministic):
    """The suite's two-model configs, in bfloat16 (karcher too: its half-precision dot is torch's
    own kernel, reproduced); dare and della are random."""
    config = two_model_config(models["a"], models["b"], method, models[base] if base else None, params)
    out = run_and_check_merge(tmp_path, config, deterministic)
    assert set(read_safetensors(out)) == set(stored_dtypes(Path(models["a"])))
    ignored = json.loads((out / "modelkin.json").read_text())["ignored"]
    assert bool(ignored) == (method in ("slerp", "sce", "nearswap", "karcher", "ram", "ramplus_tl")), ignored


@pytest.mark.parametrize("base", [None, "c"])
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_merges(tmp_path, models, base, row_wise, flatten):
    """The suite's nuslerp configs: over the flattened tensors (mergekit then ignores
    nuslerp_row_wise), per row, or per vector along the first axis (torch's strided norm and
    outer sum). Bit for bit with mergekit in every layout."""
    config = two_model_config(
        models["a"],
        models["b"],
        "nuslerp",
        models[base] if base else None,
        {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten},
    )
    run_and_check_merge(tmp_path, config, deterministic=True)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_merge(tmp_path, models, filter_wise):
    params = {"filter_wise": True} if filter_wise else None
    config = two_model_config(models["b"], models["c"], "model_stock", models["a"], params)
    run_and_check_merge(tmp_path, config)


def test_arcee_fusion_merge(tmp_path, models):
    """The suite's arcee_fusion recipe: identical to mergekit's (its tensors are below the million
    entries past which mergekit samples its quartiles at random), float32 as mergekit writes it."""
    config = two_model_config(models["a"], models["b"], "arcee_fusion", models["a"])
    out = run_and_check_merge(tmp_path, config)
    name = "model.layers.0.mlp.up_proj.weight"
    base = read_safetensors(Path(models["a"]))[name].astype(ml_dtypes.bfloat16).astype(np.float64)
    changed = np.mean(read_safetensors(out)[name] != base)
    assert 0 < changed < 0.5, changed


@pytest.mark.parametrize(
    ("method", "base", "params", "refusal"),
    [
        ("della", "c", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}, "epsilon 1.35 is outside"),
    ],
)
def test_refused_by_name(tmp_path, models, method, base, params, refusal):
    """The suite's invalid-epsilon case, and the recipes modelkin does not run yet: refused before
    anything is written, the message naming what is unsupported."""
    config = two_model_config(models["a"], models["b"], method, models[base] if base else None, params)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(config))
    with pytest.raises(RecipeError, match=refusal):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def mamba_like(path: Path, seed: int) -> str:
    """A one-layer MambaForCausalLM layout (mergekit's mamba architecture), its conv1d weight a
    tensor of three axes (widened to (16, 3, 5) so its vectors along the first axis are 15)."""
    rng = np.random.default_rng(seed)
    p = "backbone.layers.0.mixer."
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.embeddings.weight": (64, 8),
        f"{p}A_log": (16, 4),
        f"{p}conv1d.bias": (16,),
        f"{p}conv1d.weight": (16, 3, 5),
        f"{p}D": (16,),
        f"{p}dt_proj.bias": (16,),
        f"{p}dt_proj.weight": (16, 2),
        f"{p}in_proj.weight": (32, 8),
        f"{p}out_proj.weight": (8, 16),
        f"{p}x_proj.weight": (10, 16),
        "backbone.layers.0.norm.weight": (8,),
        "backbone.norm_f.weight": (8,),
        "lm_head.weight": (64, 8),
    }
    tensors = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
    config = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "num_hidden_layers": 1}
    save_model(path, tensors, "F32", config=config)
    return str(path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_row_wise_on_three_axes(tmp_path, monkeypatch, dtype, with_base):
    """nuslerp_row_wise with nuslerp_flatten: false on a tensor of three axes (a convolution's
    weight): mergekit's vectors along the first axis, bit for bit (float32 with the C library's
    trig on both sides, as in test_mergekit_compat: MKL's is not published)."""
    a, b, c = (mamba_like(tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    config = two_model_config(
        a, b, "nuslerp", c if with_base else None, {"nuslerp_row_wise": True, "nuslerp_flatten": False}
    )
    config["dtype"] = dtype
    if dtype == "float32":
        monkeypatch.setenv("MODELKIN_MKL", "")
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(config))
    merge(recipe, out)
    if MERGEKIT is None:
        pytest.skip("mergekit-yaml not found (install mergekit==0.1.5 in a separate venv)")
    theirs = tmp_path / "theirs"
    command = [MERGEKIT]
    if dtype == "float32":
        python = peer_python(MERGEKIT)
        if python is None:
            pytest.skip("mergekit's venv Python is needed to run it with the C library's trig")
        command = [str(python), str(Path(__file__).with_name("mergekit_libm_trig.py"))]
    subprocess.run([*command, str(recipe), str(theirs)], check=True, capture_output=True, timeout=600)
    ours = read_safetensors(out)
    for name, value in read_safetensors(theirs).items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_slice_level_parameters_base_model_and_residual_weight(tmp_path, models, method):
    """mergekit's slice-level keys: `parameters` (after each source's own, before the recipe's),
    `base_model` (the slice's base instead of the recipe's) and `residual_weight` (parsed and never
    applied by mergekit 0.1.5: ignored out loud). Bit for bit with mergekit."""
    a, b, c = models["a"], models["b"], models["c"]
    per_slice = {"ties": {"weight": 0.3, "density": 0.5}, "task_arithmetic": {"weight": 0.3}, "slerp": {"t": 0.2}}
    first = [{"model": m, "layer_range": [0, 1]} for m in (a, b, c)]
    second = [{"model": m, "layer_range": [1, 2]} for m in (a, b, c)]
    if method == "slerp":
        first, second = first[:2], [second[0], second[2]]
    else:
        first[1]["parameters"] = {"weight": 0.7}
    config = {
        "merge_method": method,
        "base_model": c if method != "slerp" else a,
        "dtype": "bfloat16",
        "parameters": {"density": 0.9, "weight": 0.5} if method == "ties" else {"t": 0.6} if method == "slerp" else {},
        "slices": [
            {"sources": first, "parameters": per_slice[method], "residual_weight": 0.2},
            {"sources": second, "base_model": a, "parameters": {**per_slice[method], "weight": 0.4}},
        ],
    }
    if method == "slerp":
        config["slices"][1]["parameters"] = {"t": 0.8}
    out = run_and_check_merge(tmp_path, config)
    ignored = json.loads((out / "modelkin.json").read_text())["ignored"]
    assert any("residual_weight" in line for line in ignored), ignored


@pytest.mark.parametrize("form", ["models", "slices"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_modules_recipe_form(tmp_path, models, form, method):
    """mergekit's `modules:` on a text model: its one module `default`, with the module's
    `parameters` looked up after the slice's and before the recipe's. Bit for bit with mergekit."""
    a, b, c = models["a"], models["b"], models["c"]
    merged = [a, b] if method == "slerp" else [a, b, c]
    base = a if method == "slerp" else c
    module_params = {"ties": {"weight": 0.3, "density": 0.5}, "task_arithmetic": {"weight": 0.3}, "slerp": {"t": 0.2}}
    module: dict = {"parameters": module_params[method]}
    if form == "models":
        module["models"] = [{"model": m} for m in merged]
        if method != "slerp":
            module["models"][0]["parameters"] = {"weight": 0.7}
    else:
        first = [{"model": m, "layer_range": [0, 1]} for m in merged]
        second = [{"model": m, "layer_range": [1, 2]} for m in merged]
        if method != "slerp":
            first[0]["parameters"] = {"weight": 0.7}
        module["slices"] = [
            {"sources": first},
            {"sources": second, "parameters": {"t": 0.9}} if method == "slerp" else {"sources": second},
        ]
    config = {
        "merge_method": method,
        "base_model": base,
        "dtype": "bfloat16",
        "parameters": {"density": 0.9, "weight": 0.5} if method == "ties" else {"t": 0.6} if method == "slerp" else {},
        "modules": {"default": module},
    }
    out = run_and_check_merge(tmp_path, config)
    # The module's parameters are applied: the same merge with them at the recipe's level.
    flat = {k: v for k, v in config.items() if k != "modules"}
    flat["parameters"] = {**config["parameters"], **module["parameters"]}
    flat["models" if form == "models" else "slices"] = module[form]
    (tmp_path / "flat.yml").write_text(yaml.safe_dump(flat))
    merge(tmp_path / "flat.yml", tmp_path / "flat")
    expected = read_safetensors(tmp_path / "flat")
    for name, value in read_safetensors(out).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

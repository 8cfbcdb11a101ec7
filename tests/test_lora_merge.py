"""``BASE+ADAPTER`` in merge recipes (issue 24, item 3): the adapter applied to its base as PEFT's
``merge_and_unload`` applies it (what mergekit 0.1.5's ``model+lora`` loads), in the engine, with no
cache directory. Checked against a numpy reference of PEFT's arithmetic for every config variant and
stored dtype, against merges of the materialised models for a whole recipe, against PEFT itself and
mergekit + PEFT where installed (skipped with the reason otherwise), and for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import yaml
from lora_support import VARIANTS, write_adapter
from peer import peer_python

import modelkin
from modelkin.evolve.family import write_task_family
from modelkin.io.safetensors import save_file, save_model
from modelkin.testing import make_family, read_safetensors, run_cli, stored_dtypes, tree_digest

MERGEKIT = os.environ.get("MODELKIN_MERGEKIT") or shutil.which("mergekit-yaml")
PEER = peer_python(MERGEKIT)
NO_PEER = "mergekit-yaml with peft beside it not found (install mergekit==0.1.5 and peft in a separate venv)"
NUMPY = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def fma_product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """B @ A in float32, each element one chain of fused multiply-adds over the rank in order: the
    product of two float32 numbers is exact in float64, and so is its sum with a float32 partial
    sum at these magnitudes, so one rounding to float32 per step is the fused one."""
    acc = np.zeros((b.shape[0], a.shape[1]), np.float32)
    for k in range(a.shape[0]):
        acc = (acc.astype(np.float64) + np.outer(b[:, k].astype(np.float64), a[k].astype(np.float64))).astype(
            np.float32
        )
    return acc


def peft_merged(base: dict[str, np.ndarray], dtype: str, adapter: Path) -> dict[str, np.ndarray]:
    """PEFT's merge_and_unload of ``adapter`` into ``base`` (stored values, in ``dtype``), in numpy."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    stored = read_safetensors(adapter)
    kind = NUMPY[dtype]
    out = {name: value.astype(kind) for name, value in base.items()}
    for key, value in stored.items():
        name = key.removeprefix("base_model.model.")
        for marker in (".modules_to_save.default.", ".base_layer."):
            if marker in name:
                module, rest = name.split(marker)
                out[f"{module}.{rest}"] = value.astype(kind)  # load_state_dict's cast
    for key in stored:
        for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if not key.endswith(a_name):
                continue
            module = key.removeprefix("base_model.model.").removesuffix("." + a_name)
            r = stored[key].shape[0]
            alpha = next(
                (v for p, v in (config.get("alpha_pattern") or {}).items() if module.endswith(p)), config["lora_alpha"]
            )
            scale = np.float32(alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r)
            delta = fma_product(stored[key.replace(a_name, b_name)].astype(np.float32), stored[key].astype(np.float32))
            delta = delta * scale
            embedding = a_name == "lora_embedding_A"
            if embedding or config.get("fan_in_fan_out"):
                delta = delta.T
            weight = out[f"{module}.weight"]
            if embedding:
                out[f"{module}.weight"] = (weight.astype(np.float32) + delta.astype(kind).astype(np.float32)).astype(
                    kind
                )
            else:
                out[f"{module}.weight"] = (weight.astype(np.float32) + delta).astype(kind)
    return {name: value.astype(np.float64) for name, value in out.items()}


@pytest.fixture(params=["BF16", "F16", "F32"])
def family(request, tmp_path):
    fam = make_family(tmp_path / "fam", n=1, dtype=request.param, seed=4)
    return fam, request.param


def recipe(tmp_path: Path, body: dict[str, Any], name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


VARIANTS_HERE = {**VARIANTS, "embedding with its base layer saved": VARIANTS["embedding and saved head"]}


@pytest.mark.parametrize("variant", list(VARIANTS_HERE))
def test_base_plus_adapter_is_pefts_merge_bit_for_bit(tmp_path, family, variant):
    fam, dtype = family
    base = fam.base_values
    write_adapter(tmp_path / "ad", base, *VARIANTS_HERE[variant], seed=7)
    if variant == "embedding with its base layer saved":
        # PEFT's save_embedding_layers: the (here: changed) base embedding saved beside its factors.
        tensors = read_safetensors(tmp_path / "ad")
        changed = base["model.embed_tokens.weight"] + 0.01
        tensors["base_model.model.model.embed_tokens.base_layer.weight"] = changed
        save_file(tmp_path / "ad" / "adapter_model.safetensors", tensors, "F32")
    want = peft_merged(base, dtype, tmp_path / "ad")
    spec = {
        "merge_method": "linear",
        "models": [{"model": f"{fam.base}+{tmp_path / 'ad'}", "parameters": {"weight": 1.0}}],
    }
    merged = modelkin.merge(recipe(tmp_path, spec))
    assert set(merged.tensor_names) == set(base)
    for name in base:
        np.testing.assert_array_equal(np.asarray(merged[name], dtype=np.float64), want[name], err_msg=name)
    assert {n: str(np.asarray(merged[n]).dtype) for n in base} == {n: str(np.dtype(NUMPY[dtype])) for n in base}, (
        "the adapted model keeps the base's dtype"
    )


def test_a_recipe_over_adapted_models_equals_it_over_the_materialised_models(tmp_path):
    fam = make_family(tmp_path / "fam", n=1, dtype="BF16", seed=5)
    base = fam.base_values
    for i, variant in enumerate(["plain", "rslora and patterns"]):
        write_adapter(tmp_path / f"ad{i}", base, *VARIANTS[variant], seed=10 + i)
        save_model(tmp_path / f"dense{i}", peft_merged(base, "BF16", tmp_path / f"ad{i}"), "BF16")
    body = {
        "merge_method": "ties",
        "base_model": str(fam.base),
        "parameters": {"density": 0.6},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    adapted = {
        **body,
        "models": [
            {"model": f"{fam.base}+{tmp_path / 'ad0'}", "parameters": {"weight": 0.7}},
            # A bare adapter that names no base: applied to the recipe's base_model.
            {"model": str(tmp_path / "ad1"), "parameters": {"weight": 0.5}},
            {"model": str(fam.models[0]), "parameters": {"weight": 0.3}},
        ],
    }
    dense = {
        **body,
        "models": [
            {"model": str(tmp_path / "dense0"), "parameters": {"weight": 0.7}},
            {"model": str(tmp_path / "dense1"), "parameters": {"weight": 0.5}},
            {"model": str(fam.models[0]), "parameters": {"weight": 0.3}},
        ],
    }
    modelkin.merge(recipe(tmp_path, adapted, "a.yml"), tmp_path / "out-adapted")
    modelkin.merge(recipe(tmp_path, dense, "d.yml"), tmp_path / "out-dense")
    ours, theirs = read_safetensors(tmp_path / "out-adapted"), read_safetensors(tmp_path / "out-dense")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert not any(p.name.startswith("lora") or "cache" in p.name for p in tmp_path.iterdir())


def test_bad_adapters_fail_in_one_line_with_nothing_written(tmp_path):
    fam = make_family(tmp_path / "fam", n=1, dtype="F32", seed=6)
    base = fam.base_values
    write_adapter(tmp_path / "ad", base, *VARIANTS["plain"], seed=1)
    cases: dict[str, tuple[str, str]] = {}
    # A target the base lacks.
    wrong = {f"{k}.x" if "q_proj" in k else k: v for k, v in read_safetensors(tmp_path / "ad").items()}
    (tmp_path / "missing").mkdir()
    shutil.copy(tmp_path / "ad" / "adapter_config.json", tmp_path / "missing")
    save_file(tmp_path / "missing" / "adapter_model.safetensors", wrong, "F32")
    cases["missing"] = (f"{fam.base}+{tmp_path / 'missing'}", "q_proj")
    # Factors whose shape does not fit the base tensor.
    short = {k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in read_safetensors(tmp_path / "ad").items()}
    (tmp_path / "short").mkdir()
    shutil.copy(tmp_path / "ad" / "adapter_config.json", tmp_path / "short")
    save_file(tmp_path / "short" / "adapter_model.safetensors", short, "F32")
    cases["short"] = (f"{fam.base}+{tmp_path / 'short'}", "do not fit")
    # Not an adapter after the '+'.
    cases["not an adapter"] = (f"{fam.base}+{fam.models[0]}", "not a LoRA adapter")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    # DoRA.
    shutil.copytree(tmp_path / "ad", tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases["dora"] = (f"{fam.base}+{tmp_path / 'dora'}", "use_dora")
    recipes = {}
    for label, (model, _) in cases.items():
        spec = {
            "merge_method": "task_arithmetic",
            "base_model": str(fam.base),
            "models": [{"model": model, "parameters": {"weight": 1.0}}],
        }
        recipes[label] = recipe(tmp_path, spec, f"bad-{label}.yml")
    before = tree_digest(tmp_path)
    for label, (_, words) in cases.items():
        done = run_cli("merge", str(recipes[label]), str(tmp_path / "out"))
        assert done.returncode == 2, (label, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (label, done.stderr)
        assert "Traceback" not in done.stderr
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


# -- peers ------------------------------------------------------------------------------------------

_PEFT_MAKE = """
import sys, torch
from transformers import LlamaForCausalLM
from peft import LoraConfig, get_peft_model
family, root, options = sys.argv[1], sys.argv[2], eval(sys.argv[3])
for dtype in ("bfloat16", "float16", "float32"):
    base = f"{root}/base-{dtype}"
    LlamaForCausalLM.from_pretrained(family, dtype=getattr(torch, dtype)).save_pretrained(base)
    for i, option in enumerate(options):
        torch.manual_seed(i)
        model = LlamaForCausalLM.from_pretrained(base)
        get_peft_model(model, LoraConfig(init_lora_weights=False, **option)).save_pretrained(f"{root}/ad-{dtype}-{i}")
"""

_PEFT_MERGE = """
import sys
from transformers import LlamaForCausalLM
from peft import PeftModel
for base, adapter, out in zip(*[iter(sys.argv[1:])] * 3):
    model = LlamaForCausalLM.from_pretrained(base)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""

PEFT_OPTIONS = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "embed_tokens"]},
    {
        "r": 6,
        "lora_alpha": 7,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 3},
        "alpha_pattern": {"o_proj": 5},
        "modules_to_save": ["lm_head"],
    },
]


@pytest.fixture(scope="module")
def peft_models(tmp_path_factory):
    """The bundled family's base in bf16, f16 and f32, and adapters PEFT made on it."""
    if PEER is None or subprocess.run([PEER, "-c", "import peft"], capture_output=True).returncode:
        pytest.skip(NO_PEER)
    root = tmp_path_factory.mktemp("peft")
    family = write_task_family(root / "family")
    done = subprocess.run(
        [PEER, "-c", _PEFT_MAKE, str(family["base"]), str(root), repr(PEFT_OPTIONS)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    made = [
        (root / f"base-{dtype}", root / f"ad-{dtype}-{i}")
        for dtype in ("bfloat16", "float16", "float32")
        for i in range(len(PEFT_OPTIONS))
    ]
    return made


def test_peft_made_adapters_merge_as_peft_merges_them(tmp_path, peft_models):
    outs = [tmp_path / f"{base.name}-{adapter.name}" for base, adapter in peft_models]
    args = [str(p) for (base, adapter), out in zip(peft_models, outs, strict=True) for p in (base, adapter, out)]
    done = subprocess.run([PEER, "-c", _PEFT_MERGE, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for (base, adapter), out in zip(peft_models, outs, strict=True):
        spec = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
        merged = modelkin.merge(recipe(tmp_path, spec))
        theirs = read_safetensors(out)
        assert set(merged.tensor_names) == set(theirs)
        for name in merged.tensor_names:
            np.testing.assert_array_equal(
                np.asarray(merged[name], dtype=np.float64), theirs[name], err_msg=f"{out.name} {name}"
            )


def test_mergekit_recipes_with_loras_are_bit_for_bit(tmp_path, peft_models):
    (b0, a0), (_, a1) = peft_models[0], peft_models[1]  # bf16 base, two adapters
    spec = {
        "merge_method": "ties",
        "base_model": str(b0),
        "parameters": {"density": 0.5},
        "dtype": "bfloat16",
        "models": [
            {"model": f"{b0}+{a0}", "parameters": {"weight": 0.6}},
            {"model": f"{b0}+{a1}", "parameters": {"weight": 0.4}},
        ],
    }
    path = recipe(tmp_path, spec)
    done = subprocess.run(
        [
            MERGEKIT,
            str(path),
            str(tmp_path / "theirs"),
            "--lora-merge-cache",
            str(tmp_path / "cache"),
            "--no-copy-tokenizer",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours = run_cli("merge", str(path), str(tmp_path / "ours"))
    assert ours.returncode == 0, ours.stderr
    a, b = read_safetensors(tmp_path / "ours"), read_safetensors(tmp_path / "theirs")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert stored_dtypes(tmp_path / "ours") == stored_dtypes(tmp_path / "theirs")

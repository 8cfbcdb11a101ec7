"""mergekit's `modules:` recipe form over VLMs (issue 25, item 5): LLaVAs merged whole, module by
module, with the modules mergekit 0.1.5 infers from their tensor names (one per layer stack,
`default` for the rest), each module's `parameters` between its slices' and the recipe's. Checked
against a float64 reference, and bit for bit with mergekit where it is installed. (The text-model
form, module `default`, is in test_mergekit_suite.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_task_family import peer_python
from test_vlm import write_llava

import modelkin
from modelkin.evolve.family import write_task_family
from modelkin.io.safetensors import save_file
from modelkin.testing import read_safetensors, run_cli

LANGUAGE = "model.language_model.layers"
VISION = "model.vision_tower.encoder.layers"
MERGEKIT = os.environ.get("MODELKIN_MERGEKIT") or shutil.which("mergekit-yaml")


def with_vision_layers(path: Path, seed: int) -> None:
    """Two CLIP encoder layers added to a numpy LLaVA, so its vision tower is a layer stack."""
    rng = np.random.default_rng(seed)
    tensors = read_safetensors(path)
    for layer in range(2):
        tensors[f"{VISION}.{layer}.mlp.fc1.weight"] = rng.normal(0, 0.1, (32, 16)).astype(np.float32)
        tensors[f"{VISION}.{layer}.layer_norm1.weight"] = rng.normal(1, 0.1, (16,)).astype(np.float32)
    save_file(path / "model.safetensors", tensors, "F32")


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    root = tmp_path_factory.mktemp("modules")
    write_task_family(root / "family")
    out = {}
    for i, (name, text) in enumerate((("base", "base"), ("a", "ft-sort"), ("b", "ft-reverse"))):
        write_llava(root / name, root / "family" / text, seed=i)
        with_vision_layers(root / name, seed=10 + i)
        out[name] = root / name
    out["llm"] = root / "family" / "ft-shift"
    return out


def write_recipe(tmp_path: Path, body: dict[str, Any], name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def task_arithmetic_modules(llavas: dict[str, Path]) -> dict[str, Any]:
    a, b = str(llavas["a"]), str(llavas["b"])
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(llavas["base"]),
        "dtype": "float32",
        "parameters": {"weight": 0.5},
        "modules": {
            LANGUAGE: {
                "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b}],
                "parameters": {"weight": 0.2},
            },
            VISION: {"models": [{"model": a}, {"model": b}], "parameters": {"weight": 0.4}},
            "default": {"models": [{"model": a}, {"model": b}]},
        },
    }


def test_llavas_merge_whole_module_by_module_with_each_modules_parameters(tmp_path, llavas):
    out = tmp_path / "out"
    done = run_cli("merge", str(write_recipe(tmp_path, task_arithmetic_modules(llavas))), str(out))
    assert done.returncode == 0, done.stderr
    assert "module by module" in done.stderr
    base, a, b = (read_safetensors(llavas[k]) for k in ("base", "a", "b"))
    merged = read_safetensors(out)
    assert set(merged) == set(base)
    for name, value in merged.items():
        # source > module > recipe: the language layers weigh a 0.7 and b 0.2; the vision layers
        # 0.4 each; the rest (embeddings, norms, head, vision embeddings, projector) 0.5 each.
        wa, wb = (0.7, 0.2) if name.startswith(LANGUAGE) else (0.4, 0.4) if name.startswith(VISION) else (0.5, 0.5)
        x = base[name].astype(np.float64)
        expected = x + wa * (a[name] - x) + wb * (b[name] - x)
        np.testing.assert_allclose(value, expected, rtol=2e-6, atol=1e-7, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["num_hidden_layers"] == 2
    assert (out / "preprocessor_config.json").exists()
    provenance = json.loads((out / "modelkin.json").read_text())
    assert provenance["vlm"]["merged_whole"] and provenance["vlm"]["modules"] == [LANGUAGE, VISION, "default"]


def test_a_module_left_out_is_not_written_and_says_so(tmp_path, llavas):
    body = task_arithmetic_modules(llavas)
    del body["modules"][VISION]
    merged = modelkin.merge(write_recipe(tmp_path, body), tmp_path / "out")
    tensors = read_safetensors(merged.path)
    assert not any(name.startswith(VISION) for name in tensors)
    assert any(name.startswith(LANGUAGE) for name in tensors)
    ignored = json.loads((merged.path / "modelkin.json").read_text())["ignored"]
    assert any(VISION in line and "not written" in line for line in ignored), ignored


def test_stacking_the_language_module_sets_the_text_layer_count(tmp_path, llavas):
    a, b = str(llavas["a"]), str(llavas["b"])
    body = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "modules": {
            LANGUAGE: {
                "slices": [
                    {"sources": [{"model": a, "layer_range": [0, 2]}]},
                    {"sources": [{"model": b, "layer_range": [1, 2]}]},
                ]
            },
            VISION: {"models": [{"model": b}]},
            "default": {"models": [{"model": a}]},
        },
    }
    merged = modelkin.merge(write_recipe(tmp_path, body))
    assert merged.config is not None and merged.config["text_config"]["num_hidden_layers"] == 3
    theirs_a, theirs_b = read_safetensors(llavas["a"]), read_safetensors(llavas["b"])
    np.testing.assert_array_equal(
        np.asarray(merged[f"{LANGUAGE}.2.mlp.up_proj.weight"]), theirs_b[f"{LANGUAGE}.1.mlp.up_proj.weight"]
    )
    np.testing.assert_array_equal(
        np.asarray(merged[f"{VISION}.1.mlp.fc1.weight"]), theirs_b[f"{VISION}.1.mlp.fc1.weight"]
    )
    name = "model.multi_modal_projector.linear_1.weight"
    np.testing.assert_array_equal(np.asarray(merged[name]), theirs_a[name])


def refusal(tmp_path: Path, body: dict[str, Any]) -> str:
    out = tmp_path / "refused"
    done = run_cli("merge", str(write_recipe(tmp_path, body, "bad.yml")), str(out))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()
    return done.stderr


def test_bad_modules_recipes_are_refused_by_name(tmp_path, llavas):
    good = task_arithmetic_modules(llavas)
    a = str(llavas["a"])

    def changed(**modules: Any) -> dict[str, Any]:
        return {**good, "modules": {**good["modules"], **modules}}

    assert "modules.model.vision_tower.layers: not a module" in refusal(
        tmp_path, changed(**{"model.vision_tower.layers": {"models": [{"model": a}]}})
    )
    assert "either models: or slices:" in refusal(
        tmp_path,
        changed(default={"models": [{"model": a}], "slices": [{"sources": [{"model": a, "layer_range": [0, 0]}]}]}),
    )
    assert "modules.default.weight" in refusal(tmp_path, changed(default={"models": [{"model": a}], "weight": 1}))
    assert "changes the layer count of the language model only" in refusal(
        tmp_path, changed(**{VISION: {"slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]}]}})
    )
    assert "is not a VLM" in refusal(
        tmp_path, changed(default={"models": [{"model": a}, {"model": str(llavas["llm"])}]})
    )
    assert "past the module's 2 layers" in refusal(
        tmp_path, changed(**{LANGUAGE: {"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]}]}})
    )


def test_models_and_modules_together_are_refused(tmp_path, llavas):
    body = {**task_arithmetic_modules(llavas), "models": [{"model": str(llavas["a"])}]}
    assert "use one of models:, slices: or modules:" in refusal(tmp_path, body)


def test_a_global_parameter_must_agree_across_modules(tmp_path, llavas):
    a, b = str(llavas["a"]), str(llavas["b"])
    body = {
        "merge_method": "ties",
        "base_model": str(llavas["base"]),
        "parameters": {"weight": 0.5, "density": 0.5},
        "modules": {
            LANGUAGE: {"models": [{"model": a}, {"model": b}], "parameters": {"normalize": False}},
            VISION: {"models": [{"model": a}, {"model": b}]},
            "default": {"models": [{"model": a}, {"model": b}]},
        },
    }
    assert "takes one normalize for the whole merge" in refusal(tmp_path, body)
    # The same value in every module is applied: equal to the recipe-level setting.
    for module in body["modules"].values():
        module["parameters"] = {"normalize": False}
    merged = modelkin.merge(write_recipe(tmp_path, body, "agree.yml"))
    flat = {**body, "parameters": {**body["parameters"], "normalize": False}}
    flat["modules"] = {k: {"models": v["models"]} for k, v in body["modules"].items()}
    expected = modelkin.merge(write_recipe(tmp_path, flat, "flat.yml"))
    for name in merged.tensor_names:
        np.testing.assert_array_equal(np.asarray(merged[name]), np.asarray(expected[name]), err_msg=name)


_RENAMED = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def renamed(name: str) -> str:
    """A LLaVA tensor's name in transformers 5's naming (its checkpoint conversion mapping)."""
    return next((new + name[len(old) :] for old, new in _RENAMED if name.startswith(old)), name)


_BUILD = """
import sys, torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, CLIPVisionConfig, LlamaConfig
text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=64)
vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=8, patch_size=4, projection_dim=16)
for i, out in enumerate(sys.argv[1:]):
    torch.manual_seed(i)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=31)
    LlavaForConditionalGeneration(config).save_pretrained(out)
"""

_LOAD = """
import sys, torch
from transformers import LlavaForConditionalGeneration
model, info = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], output_loading_info=True)
assert not any(info.values()), info
print(model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape)
"""


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_modules_over_llavas_bit_for_bit_with_mergekit(tmp_path, method):
    python = peer_python()
    if python is None or MERGEKIT is None:
        pytest.skip("mergekit 0.1.5 and transformers not installed (a separate venv; MODELKIN_MERGEKIT)")
    legacy = [tmp_path / f"{n}-legacy" for n in ("base", "a", "b")]
    done = subprocess.run([python, "-c", _BUILD, *map(str, legacy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # transformers 5.24 saves LLaVA in the older naming, where mergekit 0.1.5 finds no language
    # tensors (it names them as transformers 5 does and drops what it cannot find); for the
    # comparison the same models are written in transformers 5's naming as well.
    paths = [tmp_path / n for n in ("base", "a", "b")]
    for old, new in zip(legacy, paths, strict=True):
        shutil.copytree(old, new)
        save_file(new / "model.safetensors", {renamed(k): v for k, v in read_safetensors(old).items()}, "F32")
    base, a, b = map(str, paths)
    per_module = {
        "ties": ({"weight": 0.3, "density": 0.5}, {"weight": 0.6, "density": 0.8}),
        "task_arithmetic": ({"weight": 0.3}, {"weight": 0.6}),
        "slerp": ({"t": 0.2}, {"t": 0.7}),
    }[method]
    merged = [{"model": a}, {"model": b}]
    # mergekit wants a slice's base among its sources.
    sources = merged if method == "slerp" else [*merged, {"model": base}]
    body: dict[str, Any] = {
        "merge_method": method,
        "base_model": a if method == "slerp" else base,
        "dtype": "bfloat16",
        "parameters": {"t": 0.5}
        if method == "slerp"
        else {"weight": 0.5, "density": 0.9}
        if method == "ties"
        else {"weight": 0.5},
        "modules": {
            LANGUAGE: {"models": merged, "parameters": per_module[0]},
            VISION: {
                "slices": [
                    {"sources": [{**m, "layer_range": [0, 1]} for m in sources], "parameters": per_module[1]},
                    {"sources": [{**m, "layer_range": [1, 2]} for m in sources]},
                ]
            },
            "default": {"models": merged},
        },
    }
    if method != "slerp":
        body["modules"][LANGUAGE]["models"] = [{"model": a, "parameters": {"weight": 0.9}}, {"model": b}]
    recipe = write_recipe(tmp_path, body)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    done = run_cli("merge", str(recipe), str(ours))
    assert done.returncode == 0, done.stderr
    subprocess.run([MERGEKIT, str(recipe), str(theirs)], check=True, capture_output=True, timeout=600)
    mine, their = read_safetensors(ours), read_safetensors(theirs)
    assert set(mine) == set(their)
    for name, value in their.items():
        np.testing.assert_array_equal(mine[name], value, err_msg=name)
    loaded = subprocess.run([python, "-c", _LOAD, str(ours)], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    # The files in the older naming: the same modules (by mergekit's names), the same merge, written
    # in the files' naming.
    text = recipe.read_text()
    for old, new in zip(legacy, paths, strict=True):
        text = text.replace(f"{new}\n", f"{old}\n")
    older = write_recipe(tmp_path, yaml.safe_load(text), "legacy.yml")
    done = run_cli("merge", str(older), str(tmp_path / "older"))
    assert done.returncode == 0, done.stderr
    again = {renamed(k): v for k, v in read_safetensors(tmp_path / "older").items()}
    assert set(again) == set(mine)
    for name, value in mine.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)

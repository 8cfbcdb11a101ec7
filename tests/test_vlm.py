"""Vision-language models through their language model (issue 25, items 1-3): a tiny LLaVA whose
text model is the task family's (numpy-written, in transformers 5's naming and the older one)
measures and merges with the family's LLMs. Kinship equals, to the last bit, the kinship of its
language tensors extracted under the text names; a merge is written as the VLM: its vision tensors
byte-identical, its language tensors the text-only merge, its config and processor files; where
transformers is installed, the merged VLM loads as LlavaForConditionalGeneration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_task_family import peer_python

import modelkin
from evolve_support import strategy_specs
from modelkin.evolve.family import write_task_family
from modelkin.io.safetensors import save_file
from modelkin.testing import read_safetensors, run_cli, stored_dtypes

NAMINGS = {
    "transformers5": (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
    "older": (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
}
VISION = {
    "model.vision_tower.vision_model.embeddings.patch_embedding.weight": (16, 3, 4, 4),
    "model.vision_tower.vision_model.post_layernorm.weight": (16,),
    "model.multi_modal_projector.linear_1.weight": (64, 16),
    "model.multi_modal_projector.linear_2.weight": (64, 64),
}


def vlm_name(text: str, naming: str) -> str:
    for prefix_text, prefix_vlm in NAMINGS[naming]:
        if text.startswith(prefix_text):
            return prefix_vlm + text[len(prefix_text) :]
    raise AssertionError(text)


def write_llava(out: Path, text_model: Path, naming: str = "transformers5", seed: int = 0) -> dict[str, np.ndarray]:
    """A LLaVA whose language model is ``text_model`` (a family model); returns its vision tensors."""
    rng = np.random.default_rng(seed)
    tensors = {vlm_name(k, naming): v for k, v in read_safetensors(text_model).items()}
    vision = {
        (k if naming == "transformers5" else k.removeprefix("model.")): rng.normal(0, 0.1, s).astype(np.float32)
        for k, s in VISION.items()
    }
    out.mkdir(parents=True)
    save_file(out / "model.safetensors", {**tensors, **vision}, "F32")
    text_config = json.loads((text_model / "config.json").read_text())
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "image_size": 8, "patch_size": 4},
        "image_token_index": 31,
        "projector_hidden_act": "gelu",
    }
    (out / "config.json").write_text(json.dumps(config))
    (out / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    for file in text_model.iterdir():
        if file.name.startswith("tokenizer"):
            (out / file.name).write_bytes(file.read_bytes())
    return vision


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    write_task_family(root)
    for naming in NAMINGS:
        write_llava(root / f"llava-sort-{naming}", root / "ft-sort", naming)
    return root


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_vlm_kinship_is_its_language_models_to_the_last_bit(family, naming):
    vlm = family / f"llava-sort-{naming}"
    theirs = modelkin.kinship(family / "ft-sort", family / "ft-reverse", base=family / "base", per_tensor=True)
    ours = modelkin.kinship(vlm, family / "ft-reverse", base=family / "base", per_tensor=True)
    assert ours.metrics == theirs.metrics and ours.n == theirs.n and ours.per_tensor == theirs.per_tensor
    assert any("outside its language model" in name for name, _ in ours.skipped)
    matrix = modelkin.kinship_matrix([vlm, family / "ft-reverse", family / "ft-shift"], base=family / "base")
    text = modelkin.kinship_matrix(
        [family / "ft-sort", family / "ft-reverse", family / "ft-shift"], base=family / "base"
    )
    for metric in ("pcc", "cs", "ed"):
        np.testing.assert_array_equal(matrix.metrics[metric], text.metrics[metric])


def recipe(tmp_path: Path, body: dict[str, Any], name: str) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_a_merge_into_a_vlm_is_the_text_merge_with_the_vlms_other_tensors(tmp_path, family, naming, method):
    vlm = family / f"llava-sort-{naming}"
    params: dict[str, Any] = {"ties": {"density": 0.5, "weight": 0.5}, "task_arithmetic": {"weight": 0.5}}.get(
        method, {}
    )
    body: dict[str, Any] = {"merge_method": method, "base_model": str(family / "base"), "dtype": "float32"}
    if method == "slerp":
        body |= {"base_model": "VLM", "parameters": {"t": 0.3}, "models": [{"model": "VLM"}, {"model": "ft-reverse"}]}
    else:
        body |= {"models": [{"model": m, "parameters": params} for m in ("VLM", "ft-reverse", "ft-shift")]}

    def resolved(text_model: Path) -> dict[str, Any]:
        where = {"VLM": str(text_model), "ft-reverse": str(family / "ft-reverse"), "ft-shift": str(family / "ft-shift")}
        out = json.loads(json.dumps(body))
        out["models"] = [{**m, "model": where[m["model"]]} for m in out["models"]]
        if out["base_model"] == "VLM":
            out["base_model"] = str(text_model)
        return out

    done = run_cli("merge", str(recipe(tmp_path, resolved(vlm), "vlm.yml")), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "merged into the llava VLM" in done.stderr
    modelkin.merge(recipe(tmp_path, resolved(family / "ft-sort"), "text.yml"), tmp_path / "text")
    ours, text = read_safetensors(tmp_path / "out"), read_safetensors(tmp_path / "text")
    source = read_safetensors(vlm)
    assert set(ours) == set(source)
    for name, value in text.items():
        np.testing.assert_array_equal(ours[vlm_name(name, naming)], value, err_msg=name)
    for name in source:
        if "vision" in name or "projector" in name:
            np.testing.assert_array_equal(ours[name], source[name], err_msg=name)
    assert stored_dtypes(tmp_path / "out")[next(n for n in source if "projector" in n)] == "F32"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["num_hidden_layers"] == 2
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    assert json.loads((tmp_path / "out" / "modelkin.json").read_text())["vlm"]["architecture"] == "llava"


def test_stacking_slices_into_a_vlm_updates_its_text_config(tmp_path, family):
    vlm = family / "llava-sort-transformers5"
    body = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(vlm), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(family / "ft-reverse"), "layer_range": [1, 2]}]},
        ],
    }
    merged = modelkin.merge(recipe(tmp_path, body, "stack.yml"))
    assert merged.config is not None and merged.config["text_config"]["num_hidden_layers"] == 3
    assert "model.language_model.layers.2.self_attn.q_proj.weight" in merged.tensor_names
    reverse = read_safetensors(family / "ft-reverse")
    np.testing.assert_array_equal(
        np.asarray(merged["model.language_model.layers.2.mlp.up_proj.weight"]),
        reverse["model.layers.1.mlp.up_proj.weight"],
    )
    assert "model.vision_tower.vision_model.post_layernorm.weight" in merged.tensor_names


def test_a_vlm_of_an_unlisted_architecture_is_refused_by_name(tmp_path, family):
    other = tmp_path / "qwen"
    write_llava(other, family / "ft-sort")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    done = run_cli("kinship", str(other), str(family / "ft-reverse"), "--base", str(family / "base"))
    assert done.returncode == 2 and "qwen2_vl" in done.stderr and "llava" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


_LOAD = """
import sys, torch
from transformers import LlavaForConditionalGeneration
model, info = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], output_loading_info=True)
assert not any(info.values()), info
ids = torch.tensor([[1, 2, 3, 4]])
print(model(input_ids=ids).logits.shape)
"""

_BUILD = """
import sys, json, torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, CLIPVisionConfig, LlamaConfig
text = json.load(open(sys.argv[1] + "/config.json"))
config = LlavaConfig(
    text_config=LlamaConfig(**{k: v for k, v in text.items() if k not in ("architectures", "modelkin_task_family")}),
    vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=8, patch_size=4, projection_dim=16),
    image_token_index=31,
)
torch.manual_seed(0)
LlavaForConditionalGeneration(config).save_pretrained(sys.argv[2])
"""


def test_transformers_loads_the_merged_vlm(tmp_path, family):
    python = peer_python()
    if python is None:
        pytest.skip("transformers and torch not installed (they go in a separate venv; MODELKIN_PEER_PYTHON)")
    built = tmp_path / "llava-random"
    done = subprocess.run([python, "-c", _BUILD, str(family / "ft-sort"), str(built)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # Its language model replaced by ft-sort's, so the family's LLMs are fine-tunes of its text base.
    tensors = read_safetensors(built)
    for name, value in read_safetensors(family / "ft-sort").items():
        tensors[vlm_name(name, "transformers5")] = value
    save_file(built / "model.safetensors", tensors, "F32")
    body = {
        "merge_method": "task_arithmetic",
        "base_model": str(family / "base"),
        "models": [
            {"model": str(built), "parameters": {"weight": 0.6}},
            {"model": str(family / "ft-reverse"), "parameters": {"weight": 0.4}},
        ],
    }
    done = run_cli("merge", str(recipe(tmp_path, body, "r.yml")), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    loaded = subprocess.run([python, "-c", _LOAD, str(tmp_path / "out")], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]


# Layer groups in the genome: the VLM's language layers weighed one by one.
EVOLVE = strategy_specs(layer_granularity=1, max_evals=10)


@pytest.mark.parametrize("strategy", list(EVOLVE))
@pytest.mark.parametrize("resident", [True, False])
def test_a_pool_with_a_vlm_evolves_vlms_as_the_text_pool_evolves_llms(tmp_path, family, strategy, resident):
    import modelkin.evolve as evo

    def config(first: str) -> dict[str, Any]:
        spec = json.loads(json.dumps(EVOLVE[strategy]))
        models = [str(family / m) for m in (first, "ft-reverse", "ft-shift", "ft-swap")]
        where = spec["genome"] if strategy == "cmaes" else spec
        where |= {("models" if strategy == "cmaes" else "pool"): models, "base_model": str(family / "base")}
        return spec | {"evaluator": {"python": "modelkin.evolve.family:evaluate", "resident": resident}}

    vlm = evo.evolve(config("llava-sort-transformers5"), tmp_path / "vlm")
    text = evo.evolve(config("ft-sort"), tmp_path / "text")
    summary = [(c.generation, c.role, c.parents, c.objective_search, c.objective_test) for c in vlm.candidates]
    assert summary == [(c.generation, c.role, c.parents, c.objective_search, c.objective_test) for c in text.candidates]
    done = run_cli("runs", "best", str(tmp_path / "vlm"), str(tmp_path / "best"))
    assert done.returncode == 0, done.stderr
    best = json.loads((tmp_path / "best" / "config.json").read_text())
    assert vlm.best is not None
    # The best is written as the VLM when the VLM went into it (its recipe names it), else as an LLM.
    made_from_vlm = "llava-sort" in json.dumps(vlm.best.recipe) or "llava-sort" in str(vlm.best.path)
    assert (best.get("model_type") == "llava") == made_from_vlm
    if made_from_vlm:
        assert "model.vision_tower.vision_model.post_layernorm.weight" in read_safetensors(tmp_path / "best")

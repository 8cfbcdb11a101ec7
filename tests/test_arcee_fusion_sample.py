"""arcee_fusion's quartiles in tensors past a million entries (issue 25, item 6): mergekit 0.1.5
estimates them from a million importances drawn with torch's generator, which ``--random-seed``
seeds; modelkin draws the same sample from the merge's seed, in mergekit's tensor order (by name),
and keeps the exact quartiles as an option (``exact_quantiles: true``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import modelkin
from modelkin.io.safetensors import save_model
from modelkin.testing import read_safetensors

MERGEKIT = os.environ.get("MODELKIN_MERGEKIT") or shutil.which("mergekit-yaml")
# Rows 32 wide, each of these past a million entries; the norm is small (not sampled).
# Every tensor of a one-layer Llama (mergekit reads them all).
SHAPES = {
    "lm_head.weight": (31_300, 32),
    "model.embed_tokens.weight": (31_400, 32),
    "model.layers.0.mlp.up_proj.weight": (31_500, 32),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.0.post_attention_layernorm.weight": (32,),
    **{f"model.layers.0.self_attn.{p}_proj.weight": (32, 32) for p in "qkvo"},
    "model.layers.0.mlp.gate_proj.weight": (48, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 48),
    "model.norm.weight": (32,),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    rng = np.random.default_rng(0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
    base = {n: rng.normal(0, 0.05, s) for n, s in SHAPES.items()}
    save_model(root / "a", base, "F32", config=config)
    save_model(root / "b", {n: v + rng.normal(0, 0.01, v.shape) for n, v in base.items()}, "F32", config=config)
    return root


def recipe(root: Path, name: str, exact: bool = False, dtype: str = "bfloat16") -> Path:
    body: dict[str, object] = {
        "merge_method": "arcee_fusion",
        "base_model": str(root / "a"),
        "models": [{"model": str(root / "a")}, {"model": str(root / "b")}],
        "dtype": dtype,
    }
    if exact:
        body["parameters"] = {"exact_quantiles": True}
    path = root / name
    path.write_text(yaml.safe_dump(body))
    return path


def test_the_sample_follows_the_seed_and_exact_quantiles_are_an_option(pair):
    merged = {
        # float32: finer quartiles than bfloat16's, so another sample moves them.
        label: modelkin.merge(recipe(pair, f"{label}.yml", exact=label == "exact", dtype="float32"), seed=seed)
        for label, seed in (("seed0", 0), ("seed0-again", 0), ("seed1", 1), ("exact", 0))
    }
    big = "model.layers.0.mlp.up_proj.weight"
    values = {label: np.asarray(m[big], dtype=np.float64) for label, m in merged.items()}
    np.testing.assert_array_equal(values["seed0"], values["seed0-again"])
    assert (values["seed0"] != values["seed1"]).any(), "another seed draws another sample"
    assert (values["seed0"] != values["exact"]).any(), "the exact quartiles give another threshold"
    # Small tensors are never sampled: every variant agrees on them.
    small = "model.norm.weight"
    for label in merged:
        np.testing.assert_array_equal(np.asarray(merged[label][small]), np.asarray(merged["exact"][small]))


def test_the_sample_is_mergekits(tmp_path, pair):
    """mergekit with --random-seed draws the same sample: the outputs differ only where the
    importances do (torch's vectorised float32 softmax is not reproduced to the last bit: a few
    entries in 10⁵), far fewer than with the exact quartiles."""
    if MERGEKIT is None:
        pytest.skip("mergekit-yaml not found (install mergekit==0.1.5 in a separate venv)")
    theirs = tmp_path / "theirs"
    done = subprocess.run(
        [MERGEKIT, str(recipe(pair, "mk.yml")), str(theirs), "--random-seed", "7"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reference = read_safetensors(theirs)
    total = sum(v.size for v in reference.values())
    differing = {}
    for label, exact in (("sampled", False), ("exact", True)):
        merged = modelkin.merge(recipe(pair, f"{label}.yml", exact=exact), seed=7)
        differing[label] = sum(int((np.asarray(merged[n], dtype=np.float64) != v).sum()) for n, v in reference.items())
    assert differing["sampled"] < 1e-4 * total, differing
    assert differing["sampled"] * 5 < differing["exact"], differing

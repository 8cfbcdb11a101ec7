"""Adapter-to-adapter merges written as PEFT adapters (issue 24, item 4: ``out_format: adapter``):
linear and task arithmetic exactly by concatenation, ``adapter_rank: k`` with its exact truncation
error, the refusals, and (where peft is installed) the written adapter loaded by peft."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from lora_support import VARIANTS, write_adapter
from test_lora_merge import NO_PEER, PEER

import modelkin
from modelkin.io.adapter import load_adapter
from modelkin.testing import make_family, read_safetensors, run_cli, tree_digest


def materialised(base: dict[str, np.ndarray], adapter: Path) -> dict[str, np.ndarray]:
    """base + ΔW of every tensor, in float64, from the adapter's factors."""
    loaded = load_adapter(adapter)
    out = {n: v.astype(np.float64) for n, v in base.items()}
    for name, value in loaded.replaced.items():
        out[name] = value.copy()
    for name, delta in loaded.low_rank.items():
        out[name] = out[name] + delta.dense()
    return out


def write_recipe(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def adapters(tmp_path):
    fam = make_family(tmp_path / "fam", n=1, dtype="F32", seed=8)
    base = fam.base_values
    write_adapter(tmp_path / "a", base, *VARIANTS["plain"], seed=1)
    write_adapter(tmp_path / "b", base, *VARIANTS["rslora and patterns"], seed=2)
    write_adapter(tmp_path / "c", base, *VARIANTS["embedding and saved head"], seed=3)
    return fam, base


@pytest.mark.parametrize(
    "method,extra", [("task_arithmetic", {"parameters": {"lambda": 0.8}}), ("linear", {}), ("linear", {"normalize": 1})]
)
def test_linear_and_task_arithmetic_of_adapters_are_exact(tmp_path, adapters, method, extra):
    fam, base = adapters
    weights = {"a": 0.7, "b": 0.5, "c": 0.3} if extra.get("normalize") is None else {"a": 0.5, "b": 0.3, "c": 0.2}
    body: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(fam.base),
        "models": [{"model": str(tmp_path / k), "parameters": {"weight": w}} for k, w in weights.items()],
        **{k: v for k, v in extra.items() if k != "normalize"},
    }
    if extra.get("normalize"):
        body["parameters"] = {"normalize": False}
    dense = modelkin.merge(write_recipe(tmp_path / "dense.yml", body), precise=True)
    result = modelkin.merge(write_recipe(tmp_path / "ad.yml", {**body, "out_format": "adapter"}), tmp_path / "out")
    assert result.path == tmp_path / "out"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]
    assert config["modules_to_save"] == ["lm_head"]
    ours = materialised(base, tmp_path / "out")
    for name in base:
        want = np.asarray(dense[name], dtype=np.float64)
        # The dense merge is rounded once to float32, the adapter's factors are stored in float32.
        np.testing.assert_allclose(ours[name], want, rtol=2e-6, atol=1e-7, err_msg=name)
    provenance = json.loads((tmp_path / "out" / "modelkin.json").read_text())
    assert provenance["truncation_error"]["frobenius_total"] == 0.0
    # Rank of q_proj in layer 0: a's 4, b's 2 (rank_pattern), concatenated.
    assert provenance["ranks"]["model.layers.0.self_attn.q_proj"] == 6


def test_adapter_rank_reduces_with_the_exact_truncation_error(tmp_path, adapters):
    fam, base = adapters
    body = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "models": [{"model": str(tmp_path / k), "parameters": {"weight": 1.0}} for k in ("a", "b")],
        "out_format": "adapter",
    }
    modelkin.merge(write_recipe(tmp_path / "full.yml", body), tmp_path / "full")
    done = run_cli("merge", str(write_recipe(tmp_path / "cut.yml", {**body, "adapter_rank": 3})), str(tmp_path / "cut"))
    assert done.returncode == 0, done.stderr
    assert "adapter_rank 3" in done.stderr and "dropped Frobenius norm" in done.stderr
    full, cut = materialised(base, tmp_path / "full"), materialised(base, tmp_path / "cut")
    provenance = json.loads((tmp_path / "cut" / "modelkin.json").read_text())
    errors = provenance["truncation_error"]["frobenius_per_module"]
    # Every module above rank 3: q_proj of layer 0 (4 + 2), q_proj of layer 1 and up_proj (4 each).
    assert set(errors) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    }
    for module, error in errors.items():
        name = f"{module}.weight"
        assert np.linalg.norm(full[name] - cut[name]) == pytest.approx(error, rel=1e-5)
        # The best rank-3 approximation: the error is the norm of the dropped singular values.
        sigma = np.linalg.svd(full[name] - base[name], compute_uv=False)
        assert error == pytest.approx(np.sqrt(np.sum(sigma[3:] ** 2)), rel=1e-6)  # factors stored in f32
    total = provenance["truncation_error"]["frobenius_total"]
    assert total == pytest.approx(np.sqrt(sum(e * e for e in errors.values())))
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert config["r"] == 3 and provenance["ranks"]["model.layers.0.self_attn.q_proj"] == 3


def test_what_adapter_output_refuses(tmp_path, adapters):
    fam, _ = adapters
    models = [{"model": str(tmp_path / k), "parameters": {"weight": 0.5}} for k in ("a", "b")]
    common = {"base_model": str(fam.base), "models": models, "out_format": "adapter"}
    cases = {
        "ties": ({**common, "merge_method": "ties", "parameters": {"density": 0.5}}, "ties is not exact"),
        "dtype": ({**common, "merge_method": "linear", "dtype": "bfloat16"}, "dtype"),
        "full model": (
            {
                **common,
                "merge_method": "linear",
                "models": [*models, {"model": str(fam.models[0]), "parameters": {"weight": 0.5}}],
            },
            "is not a LoRA adapter",
        ),
        "rank": ({**common, "merge_method": "linear", "adapter_rank": 0}, "adapter_rank"),
        "format": ({**common, "merge_method": "linear", "out_format": "lora"}, "out_format"),
        "unnormalized": (
            {
                **common,
                "merge_method": "linear",
                "parameters": {"normalize": False},
                "models": [{"model": str(tmp_path / k), "parameters": {"weight": 0.7}} for k in ("a", "b")],
            },
            "scales the base too",
        ),
    }
    recipes = {label: write_recipe(tmp_path / f"{label}.yml", body) for label, (body, _) in cases.items()}
    before = tree_digest(tmp_path)
    for label, (_, words) in cases.items():
        done = run_cli("merge", str(recipes[label]), str(tmp_path / "out"))
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            label,
            done.stderr,
        )
    assert tree_digest(tmp_path) == before


_PEFT_LOAD = """
import sys, json, torch, numpy as np
from transformers import LlamaForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
assert not any(p.numel() == 0 for p in model.parameters())
merged = model.merge_and_unload()
np.savez(out, **{k: v.float().numpy() for k, v in merged.state_dict().items()})
"""


def test_peft_loads_the_written_adapter_and_merges_it_as_modelkin_does(tmp_path):
    if PEER is None or subprocess.run([PEER, "-c", "import peft"], capture_output=True).returncode:
        pytest.skip(NO_PEER)
    from modelkin.evolve.family import write_task_family

    family = write_task_family(tmp_path / "family")
    base = read_safetensors(family["base"])
    targets = {f"model.layers.{i}.self_attn.{m}": {} for i in range(2) for m in ("q_proj", "v_proj")}
    write_adapter(tmp_path / "a", base, targets, {"r": 4, "lora_alpha": 8}, seed=1)
    write_adapter(
        tmp_path / "b", base, {**targets, "model.embed_tokens": {"kind": "embedding"}}, {"use_rslora": True}, seed=2
    )
    body = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(tmp_path / k), "parameters": {"weight": w}} for k, w in (("a", 0.6), ("b", 0.4))],
    }
    dense = modelkin.merge(write_recipe(tmp_path / "dense.yml", body), precise=True)
    modelkin.merge(write_recipe(tmp_path / "ad.yml", {**body, "out_format": "adapter"}), tmp_path / "out")
    done = subprocess.run(
        [PEER, "-c", _PEFT_LOAD, str(family["base"]), str(tmp_path / "out"), str(tmp_path / "peft.npz")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = np.load(tmp_path / "peft.npz")
    for name in dense.tensor_names:
        np.testing.assert_allclose(theirs[name], np.asarray(dense[name]), rtol=2e-6, atol=2e-7, err_msg=name)


def test_slices_may_weigh_layers_but_not_move_them(tmp_path, adapters):
    fam, base = adapters

    def slices(ranges: list[tuple[int, int]], weights: list[float]) -> list[dict[str, Any]]:
        return [
            {
                "sources": [
                    {"model": str(tmp_path / k), "layer_range": list(r), "parameters": {"weight": w}}
                    for k in ("a", "b")
                ]
            }
            for r, w in zip(ranges, weights, strict=True)
        ]

    body = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "slices": slices([(0, 1), (1, 2)], [0.3, 0.9]),
    }
    dense = modelkin.merge(write_recipe(tmp_path / "dense.yml", body), precise=True)
    modelkin.merge(write_recipe(tmp_path / "ad.yml", {**body, "out_format": "adapter"}), tmp_path / "out")
    ours = materialised(base, tmp_path / "out")
    for name in base:
        np.testing.assert_allclose(ours[name], np.asarray(dense[name]), rtol=2e-6, atol=1e-7, err_msg=name)
    moved = {**body, "slices": slices([(1, 2), (0, 1)], [0.3, 0.9]), "out_format": "adapter"}
    done = run_cli("merge", str(write_recipe(tmp_path / "moved.yml", moved)), str(tmp_path / "moved"))
    assert done.returncode == 2 and "move or stack layers" in done.stderr, done.stderr
    assert not (tmp_path / "moved").exists()

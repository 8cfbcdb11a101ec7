"""LoRA adapters written with numpy in PEFT's layout, and their exact deltas, for the adapter
tests (kinship from the factors, model+lora merges, adapter output)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from modelkin.io.safetensors import save_file

RANK = 4


def write_adapter(
    path: Path, base: dict[str, np.ndarray], targets: dict[str, dict[str, Any]], config: dict[str, Any], seed: int
) -> dict[str, np.ndarray]:
    """A PEFT adapter directory; returns each targeted tensor's exact float64 delta. ``targets``
    maps a module to its r (and kind: linear, embedding, fan_in_fan_out, save)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    default_r, alpha = config.get("r", RANK), config.get("lora_alpha", 8)
    for module, spec in targets.items():
        weight = base[f"{module}.weight"]
        r = spec.get("r", default_r)
        a_alpha = spec.get("alpha", alpha)
        scale = a_alpha / math.sqrt(r) if config.get("use_rslora") else a_alpha / r
        prefix = f"base_model.model.{module}"
        kind = spec.get("kind", "linear")
        if kind == "save":
            replaced = (weight + rng.normal(0, 0.05, weight.shape)).astype(np.float32)
            tensors[f"{prefix}.modules_to_save.default.weight"] = replaced
            deltas[f"{module}.weight"] = replaced.astype(np.float64) - weight.astype(np.float64)
            continue
        rows, cols = weight.shape
        if kind == "embedding":  # lora_embedding_A: r x vocab, lora_embedding_B: dim x r
            a = rng.normal(0, 0.3, (r, rows)).astype(np.float32)
            b = rng.normal(0, 0.3, (cols, r)).astype(np.float32)
            tensors[f"{prefix}.lora_embedding_A"] = a
            tensors[f"{prefix}.lora_embedding_B"] = b
            delta = scale * (b.astype(np.float64) @ a.astype(np.float64)).T
        elif kind == "fan_in_fan_out":  # the weight is stored in x out
            a = rng.normal(0, 0.3, (r, rows)).astype(np.float32)
            b = rng.normal(0, 0.3, (cols, r)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
            delta = scale * (b.astype(np.float64) @ a.astype(np.float64)).T
        else:
            a = rng.normal(0, 0.3, (r, cols)).astype(np.float32)
            b = rng.normal(0, 0.3, (rows, r)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
            delta = scale * (b.astype(np.float64) @ a.astype(np.float64))
        deltas[f"{module}.weight"] = delta
    path.mkdir(parents=True)
    save_file(path / "adapter_model.safetensors", tensors, "F32")
    (path / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": default_r, "lora_alpha": alpha, "target_modules": list(targets), **config}
        )
    )
    return deltas


def exact_deltas(base: dict[str, np.ndarray], deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = base["lm_head.weight"].shape[0]
    return {n: (deltas[n] if n in deltas else np.zeros(z.shape))[:rows].ravel() for n, z in base.items()}


VARIANTS: dict[str, tuple[dict[str, dict[str, Any]], dict[str, Any]]] = {
    "plain": ({"model.layers.0.self_attn.q_proj": {}, "model.layers.1.mlp.up_proj": {}}, {}),
    "rslora and patterns": (
        {"model.layers.0.self_attn.q_proj": {"r": 2, "alpha": 3}, "model.layers.1.self_attn.q_proj": {}},
        {
            "use_rslora": True,
            "rank_pattern": {"layers.0.self_attn.q_proj": 2},
            "alpha_pattern": {"0.self_attn.q_proj": 3},
        },
    ),
    "embedding and saved head": (
        {"model.embed_tokens": {"kind": "embedding"}, "lm_head": {"kind": "save"}, "model.layers.0.mlp.up_proj": {}},
        {},
    ),
    "fan_in_fan_out": ({"model.layers.1.mlp.up_proj": {"kind": "fan_in_fan_out"}}, {"fan_in_fan_out": True}),
}

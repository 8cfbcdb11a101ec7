"""Writes the bundled family's LoRA adapters (run by a developer, never at install; numpy only).

Each of the four trained fine-tunes becomes a PEFT LoRA adapter of the base, extracted as
mergekit-extract-lora extracts one: every 2-D projection's delta cut to its best rank-r
approximation by SVD (B = U_r S_r, A = V_rᵀ, lora_alpha = r so the scale is 1), and the tensors LoRA
does not cover (the embedding, the head and the norms) saved whole as ``modules_to_save``. At rank 8
each adapter still masters its task (the scores are printed):

    .venv/bin/python scripts/extract_family_adapters.py python/modelkin/evolve/family/weights
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from modelkin.evolve.family import WEIGHTS, evaluate
from modelkin.io.resident import AdaptedModel
from modelkin.io.safetensors import save_file
from modelkin.testing import read_safetensors

TASKS = ("reverse", "sort", "shift", "swap")


def extract(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], rank: int) -> tuple[dict, list, list]:
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    saved: list[str] = []
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        delta = tuned[name] - weight
        if delta.ndim == 2 and "embed" not in name and name != "lm_head.weight":
            u, s, vt = np.linalg.svd(delta, full_matrices=False)
            tensors[f"base_model.model.{module}.lora_A.weight"] = vt[:rank]
            tensors[f"base_model.model.{module}.lora_B.weight"] = u[:, :rank] * s[:rank]
            targets.append(module)
        else:
            tensors[f"base_model.model.{name}"] = tuned[name]
            saved.append(module)
    return tensors, targets, saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the family's weights directory")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    base = read_safetensors(WEIGHTS / "base")
    for task in TASKS:
        tensors, targets, saved = extract(base, read_safetensors(WEIGHTS / f"ft-{task}"), args.rank)
        out = args.out / f"lora-{task}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(out / "adapter_model.safetensors", tensors, "F32")
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "base",  # beside the adapters, as write_task_family lays them out
            "r": args.rank,
            "lora_alpha": args.rank,
            "target_modules": targets,
            "modules_to_save": saved,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(task, evaluate(AdaptedModel(out, WEIGHTS / "base")), "fine-tune:", evaluate(str(WEIGHTS / f"ft-{task}")))


if __name__ == "__main__":
    main()

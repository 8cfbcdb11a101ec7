"""Adapter-to-adapter merges written as a PEFT adapter (recipe key ``out_format: adapter``).

Linear and task arithmetic of LoRA adapters of one base are again a low-rank delta of that base:
W₀ + Σ cᵢ·sᵢ·Bᵢ·Aᵢ, with cᵢ the method's coefficient of adapter i at that tensor (linear: wᵢ / Σw;
task arithmetic: λ·wᵢ, / Σw when normalized). The merge is written exactly by concatenation,
B = [c₁s₁B₁ | c₂s₂B₂ | …], A = [A₁; A₂; …], of rank Σrᵢ with lora_alpha = rank (scale 1) and
``use_rslora: false`` (the per-module ranks in ``rank_pattern``/``alpha_pattern``).
``adapter_rank: k`` reduces each module above rank k by QR of B and Aᵀ and the SVD of the small
core, keeping the k largest singular values; the Frobenius norm of what is dropped is exact and is
recorded per module and in total in ``modelkin.json``. Tensors an adapter stores whole
(``modules_to_save``) merge densely and are saved whole. Factors are computed in float64 and stored
in float32 (``out_dtype`` may ask for bfloat16 or float16)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import __version__
from ..io.adapter import CONFIG, WEIGHTS, Adapter, load_adapter
from ..io.errors import RecipeError
from ..io.safetensors import Dtype, read_tensor, save_file
from .planner import MergePlan

Array = npt.NDArray[np.float64]
_DTYPES: dict[str, Dtype] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass(frozen=True)
class AdapterResult:
    """What an adapter merge wrote: the directory, its rank per module, and the truncation error."""

    path: Path
    ranks: dict[str, int]
    # Frobenius norm of the dropped part of each reduced module's ΔW, and in total (0 when exact).
    errors: dict[str, float]
    total_error: float


def _coefficients(plan: MergePlan, weights: list[float]) -> list[float]:
    options = plan.options
    total = sum(weights)
    if plan.method == "linear":
        if options.get("normalize", True):
            return [w / total for w in weights]
        if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-12):
            raise RecipeError(
                "out_format: adapter: linear with normalize: false and weights summing to"
                f" {total:g} scales the base too, which no adapter can express"
            )
        return weights
    scale = float(options.get("lambda", 1.0))
    divide = total if options.get("normalize", False) else 1.0
    return [scale * w / divide for w in weights]


def _reduce(left: Array, right: Array, rank: int) -> tuple[Array, Array, float]:
    """left @ right (rows x R, R x cols) cut to ``rank``: QR of both factors, the SVD of the R x R
    core; returns the factors and the Frobenius norm of the dropped part."""
    q_left, r_left = np.linalg.qr(left)
    q_right, r_right = np.linalg.qr(right.T)
    u, sigma, vt = np.linalg.svd(r_left @ r_right.T)
    dropped = float(np.sqrt(np.sum(sigma[rank:] ** 2)))
    root = np.sqrt(sigma[:rank])
    return (q_left @ u[:, :rank]) * root, (root[:, None] * vt[:rank]) @ q_right.T, dropped


def write_adapter_merge(plan: MergePlan, staging: Path) -> AdapterResult:
    """Writes the plan's merge (``out_format: adapter``) into ``staging`` as a PEFT adapter."""
    refs = list(plan.paths)
    plain = [e.model for e in plan.entries if e.model not in plan.adapters]
    if plain:
        raise RecipeError(f"out_format: adapter: {plain[0]} is not a LoRA adapter (every merged model must be one)")
    bases = {plan.paths[e.model].resolve() for e in plan.entries}
    if plan.base is not None:
        bases.add(plan.paths[plan.base].resolve())
        if plan.base in plan.adapters:
            raise RecipeError(f"out_format: adapter: the base_model {plan.base} is itself adapted")
    if len(bases) != 1:
        raise RecipeError(f"out_format: adapter: the adapters apply to different bases ({', '.join(map(str, bases))})")
    base_path = bases.pop()
    adapters: dict[str, Adapter] = {e.model: load_adapter(plan.adapters[e.model].path) for e in plan.entries}
    configs = {ref: json.loads((plan.adapters[ref].path / CONFIG).read_text()) for ref in adapters}
    fans = {bool(c.get("fan_in_fan_out", False)) for c in configs.values()}
    if len(fans) != 1:
        raise RecipeError("out_format: adapter: the adapters disagree on fan_in_fan_out")
    fan_in_fan_out = fans.pop()
    embeddings = {t.tensor for ref in adapters for t in plan.adapters[ref].targets if t.embedding}
    tensors: dict[str, npt.NDArray[Any]] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    saved: list[str] = []
    for recipe in plan.recipes:
        name = recipe["name"]
        inputs = [(refs[i["model"]], i["tensor"], float(i.get("weight", 1.0))) for i in recipe["inputs"]]
        moved = next((tensor for _, tensor, _ in inputs if tensor != name), None)
        if moved is not None or (plan.base is not None and recipe["base_tensor"] not in (None, name)):
            # A delta of the base is a delta per tensor: slices may weigh layers, not move them.
            raise RecipeError(f"out_format: adapter: slices that move or stack layers ({name} from {moved})")
        coefficients = _coefficients(plan, [w for _, _, w in inputs])
        low: list[tuple[Array, Array]] = []
        dense: Array | None = None
        for (ref, tensor, _), c in zip(inputs, coefficients, strict=True):
            adapter = adapters[ref]
            if tensor in adapter.replaced:
                reference, _ = read_tensor(base_path, tensor)
                part = c * (adapter.replaced[tensor] - reference)
                dense = part if dense is None else dense + part
            if tensor in adapter.low_rank and c != 0.0:
                delta = adapter.low_rank[tensor]
                low.append((c * delta.scale * delta.left, delta.right))
        module = name.removesuffix(".weight")
        if dense is not None:
            # Stored whole in some adapter: the merged tensor is dense, saved whole.
            reference, _ = read_tensor(base_path, name)
            for left, right in low:
                dense = dense + left @ right
            tensors[f"base_model.model.{name}"] = reference + dense
            saved.append(module)
            continue
        if not low:
            continue
        left = np.concatenate([x for x, _ in low], axis=1)
        right = np.concatenate([y for _, y in low], axis=0)
        if plan.config.adapter_rank is not None and left.shape[1] > plan.config.adapter_rank:
            left, right, errors[module] = _reduce(left, right, plan.config.adapter_rank)
        ranks[module] = left.shape[1]
        prefix = f"base_model.model.{module}"
        if name in embeddings:  # stored transposed: lora_embedding_A is r x vocab, _B dim x r
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = left.T, right.T
        elif fan_in_fan_out:  # a Conv1D weight (in x out), transposed as the embedding's
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = left.T, right.T
        else:
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = right, left
    if not ranks and not saved:
        raise RecipeError("out_format: adapter: the merge changes no tensor of the base")
    dtype = _DTYPES[plan.config.out_dtype or "float32"]
    save_file(staging / WEIGHTS, tensors, dtype)
    first = configs[plan.entries[0].model]
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": plan.base or first.get("base_model_name_or_path") or str(base_path),
        "r": common,
        "lora_alpha": common,
        "rank_pattern": {m: r for m, r in ranks.items() if r != common},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != common},
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (staging / CONFIG).write_text(json.dumps(config, indent=2))
    total = math.sqrt(sum(e * e for e in errors.values()))
    (staging / "mergekit_config.yml").write_text(plan.config.text)
    provenance = {
        "parents": list(plan.models),
        "base": plan.base,
        "method": plan.method,
        "out_format": "adapter",
        "adapter_rank": plan.config.adapter_rank,
        "ranks": ranks,
        "truncation_error": {"frobenius_total": total, "frobenius_per_module": errors},
        "modelkin_version": __version__,
    }
    (staging / "modelkin.json").write_text(json.dumps(provenance, indent=2))
    return AdapterResult(staging, ranks, errors, total)

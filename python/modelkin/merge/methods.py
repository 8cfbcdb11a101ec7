"""The merge-method table, as the Rust core declares it: names, what each does with base_model,
how many models, every parameter with its scope, default and valid range."""

from __future__ import annotations

from typing import Any

from .._core import MethodInfo, ParameterInfo
from .recipe import METHODS

__all__ = ["MethodInfo", "ParameterInfo", "method_dict", "methods"]


def methods() -> dict[str, MethodInfo]:
    """Every merge method by name, in the table's order."""
    return {name: spec.info for name, spec in METHODS.items()}


def method_dict(info: MethodInfo) -> dict[str, Any]:
    """One method as plain JSON-able data (what ``modelkin methods --json`` prints)."""
    return {
        "name": info.name,
        "summary": info.summary,
        "base_model": info.base,
        "models": {"min": info.min_models, "max": info.max_models},
        "statistics": info.statistics,
        "sparsification": info.sparsification,
        "sign_consensus": info.sign_consensus,
        "task_vectors": info.task_vectors,
        "float32_result": info.float32_result,
        "parameters": [_parameter_dict(p) for p in info.parameters],
    }


def _parameter_dict(p: ParameterInfo) -> dict[str, Any]:
    return {
        "name": p.name,
        "scope": p.scope,
        "required": p.required,
        "default": p.default,
        "range": p.range_text,
        "help": p.help,
        **({"ignored": p.ignored} if p.ignored else {}),
    }

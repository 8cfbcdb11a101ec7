"""The dtype names modelkin meets, in one place: recipe names (mergekit's `dtype:` spellings),
safetensors names (what files store) and torch names (what config.json says)."""

from __future__ import annotations

from typing import Final, Literal

# The stored dtype of the merged tensors, as safetensors names it.
OutDtypeName = Literal["F64", "F32", "F16", "BF16"]
# The arithmetic: mergekit's rounding in that dtype, or exact (float64).
ComputeName = Literal["float64", "float32", "bfloat16", "float16"]

# A recipe's `dtype` / `out_dtype` spellings (as mergekit accepts them) → the safetensors dtype.
RECIPE_DTYPES: Final[dict[str, OutDtypeName]] = {
    "float64": "F64",
    "fp64": "F64",
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}

# A safetensors dtype → its torch name (config.json's `dtype`, and the arithmetic mergekit does in it).
TORCH_NAMES: Final[dict[str, ComputeName]] = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def compute_name(recipe_dtype: str) -> ComputeName:
    """The arithmetic a recipe's `dtype` asks for."""
    return TORCH_NAMES[RECIPE_DTYPES[recipe_dtype]]

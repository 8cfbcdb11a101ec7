"""The typed job the Rust engine runs (``modelkin._core.run_merge``): the planner builds it, mypy
checks it, and serde on the Rust side reads it into modelkin-core's ``MergeJob``."""

from __future__ import annotations

from typing_extensions import NotRequired, TypedDict

from ..io.dtypes import ComputeName, OutDtypeName

__all__ = ["ComputeName", "MergeInput", "MergeJob", "OutDtypeName", "RamOptions", "SphericalOptions", "TensorRecipe"]


class MergeInput(TypedDict):
    """One model's contribution to one output tensor, its parameters resolved for that tensor."""

    model: int
    tensor: str
    weight: NotRequired[float]
    density: NotRequired[float]
    gamma: NotRequired[float]
    epsilon: NotRequired[float]


class TensorRecipe(TypedDict):
    """How one output tensor is made."""

    name: str
    base_tensor: str | None
    base_model: NotRequired[int | None]
    inputs: list[MergeInput]
    t: NotRequired[float]
    select_topk: NotRequired[float]
    draws_before: NotRequired[int]


class RamOptions(TypedDict, total=False):
    epsilon: float
    r: float
    alpha: float


class SphericalOptions(TypedDict, total=False):
    normalize_weights: bool
    eps: float
    max_iter: int
    tol: float
    flatten: bool
    row_wise: bool


# A whole merge as the engine runs it (modelkin-core's `MergeJob`, read by serde on the Rust side:
# a key it does not know is refused there). Functional syntax: "lambda" is a Python keyword.
MergeJob = TypedDict(
    "MergeJob",
    {
        "models": list[str],
        "base": int | None,
        "method": str,
        "normalize": bool,
        "rescale": bool,
        "lambda": float,
        "seed": int,
        "out_dtype": OutDtypeName,
        "compute": NotRequired[ComputeName],
        "kinship": NotRequired[bool],
        "ram": NotRequired[RamOptions],
        "filter_wise": NotRequired[bool],
        "spherical": NotRequired[SphericalOptions],
        "sort_order_bytes": NotRequired[int],
        "mkl": NotRequired[str],
        "out_dir": str | None,
        "max_shard_bytes": int,
        "threads": int,
        "tensors": list[TensorRecipe],
    },
)

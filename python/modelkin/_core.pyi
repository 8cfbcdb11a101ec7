import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, final

from .merge.job import MergeJob

__all__ = [
    "DtypeError",
    "InvalidModelError",
    "KinshipPlan",
    "KinshipStats",
    "MergeOutcome",
    "MethodInfo",
    "MissingTensorError",
    "ModelHandle",
    "ModelReferenceError",
    "ModelkinError",
    "NonFiniteError",
    "ParameterInfo",
    "RecipeError",
    "ShapeMismatchError",
    "UnsupportedFormatError",
    "__version__",
    "apply_adapter",
    "compose_model",
    "methods",
    "open_model",
    "run_merge",
]

__version__: str

class ModelkinError(Exception): ...
class InvalidModelError(ModelkinError): ...
class UnsupportedFormatError(ModelkinError): ...
class MissingTensorError(ModelkinError): ...
class ShapeMismatchError(ModelkinError): ...
class DtypeError(ModelkinError): ...
class NonFiniteError(ModelkinError): ...
class ModelReferenceError(ModelkinError): ...

class RecipeError(ModelkinError, ValueError):
    """A merge recipe, argument or option is invalid; the message names the key (and, for YAML, its line)."""

_MomentBlock = tuple[int, int, npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]

@final
class KinshipStats:
    @property
    def k(self) -> int: ...
    @property
    def elements(self) -> int: ...
    @property
    def tensor_names(self) -> list[str]: ...
    @property
    def tensor_shapes(self) -> list[list[int]]: ...
    @property
    def tensor_elements(self) -> list[int]: ...
    @property
    def skipped(self) -> list[tuple[str, str]]: ...
    def matrix(self, metric: str, mode: str) -> npt.NDArray[np.float64]: ...
    def value(self, metric: str, mode: str, i: int, j: int) -> float:
        """Entry (i, j) of :meth:`matrix` as a float (a pair's kinship, without importing numpy)."""
    def per_tensor(self, metric: str) -> npt.NDArray[np.float64]: ...

@final
class KinshipPlan:
    def __new__(
        cls,
        base: str | ModelHandle,
        models: Sequence[str | ModelHandle],
        *,
        skip_missing: bool = False,
        count_tied_embeddings_twice: bool = False,
    ) -> Self: ...
    @property
    def k(self) -> int: ...
    @property
    def tensors(self) -> list[tuple[str, list[int], int]]: ...
    @property
    def skipped(self) -> list[tuple[str, str]]: ...
    @property
    def tensor_bytes(self) -> int: ...
    def read(self, tensor: int, source: int, first: int, count: int) -> npt.NDArray[np.float64]: ...
    def file_of(self, tensor: int, source: int) -> str: ...
    def nonfinite_error(self, tensor: int, source: int) -> NonFiniteError:
        """The exception the Rust pass raises for NaN/Inf in one model's copy of a planned tensor."""
    def run(
        self,
        *,
        low_precision: str | None = None,
        skip_nonfinite: bool = False,
        threads: int = 0,
        progress: Callable[[int, int], object] | None = None,
    ) -> KinshipStats: ...
    def report(self, blocks: Sequence[_MomentBlock], skipped: Sequence[tuple[str, str]]) -> KinshipStats: ...

def open_model(path: str | os.PathLike[str]) -> ModelHandle:
    """Opens a model (a safetensors file or a directory of shards): its files mapped and headers
    read, for any number of merges and kinship passes."""

def apply_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    targets: Sequence[tuple[str, str, str, float, Literal["plain", "transposed"], Literal["sum", "delta_first"]]],
    replacements: Sequence[tuple[str, str]],
    label: str,
) -> ModelHandle:
    """The model at `base` with a LoRA adapter (its safetensors file `adapter`) applied as PEFT's
    `merge_and_unload` applies it, bit for bit: `targets` are (base tensor, A tensor, B tensor,
    scale, layout, where the delta is rounded), `replacements` (base tensor, the adapter tensor
    stored whole). The changed tensors are held in memory, the rest mapped from the base's files;
    `label` names the model in messages."""

def compose_model(parts: Sequence[tuple[ModelHandle, Sequence[tuple[str, str]]]], label: str) -> ModelHandle:
    """A model made of views of others: each part a model and the (new name, name there) of the
    tensors it gives; a later part's tensor replaces an earlier one's of the same name. Nothing is
    copied (files are mapped again, bytes in memory shared); `label` names it in messages."""

@final
class ModelHandle:
    """A model the core holds open: memory-mapped safetensors files (`open_model`), or a merged
    model held in memory (one safetensors image). Its tensors are read by numpy arrays without
    copies."""

    @property
    def path(self) -> Path:
        """The path it was opened from (for a merged model, the label it goes by in messages)."""
    def tensors(self) -> list[tuple[str, list[int], str]]:
        """(name, shape, safetensors dtype name) of every tensor, in storage order."""

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order."""
    def info(self, name: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype name) of a tensor; KeyError naming it when there is none."""
    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The stored bytes of a tensor as a uint8 array sharing this object's memory (no copy)."""
    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held."""
    def save(self, directory: str, max_shard_bytes: int) -> int:
        """Writes the tensors into `directory` (which must exist) as `modelkin merge` writes them."""

@final
class MergeOutcome:
    """What a merge produced besides its files."""

    @property
    def bytes_written(self) -> int: ...
    @property
    def kinship(self) -> KinshipStats | None:
        """The parents' kinship against the base, measured while merging (none without a base)."""
    @property
    def model(self) -> ModelHandle | None:
        """The merged model, when the job had no output directory."""
    @property
    def tensor_seconds(self) -> float:
        """Seconds the engine spent on the tensors, after opening the models and resolving the job."""

def run_merge(
    job: MergeJob,
    *,
    models: Sequence[ModelHandle] = ...,
    progress: Callable[[int, int], object] | None = None,
) -> MergeOutcome:
    """Runs the merge described by `job` with the GIL released; `models[i]`, already open (from
    the same path), stands for `job["models"][i]`, and the rest are opened here."""

@final
class ParameterInfo:
    """One parameter of a merge method."""

    @property
    def name(self) -> str: ...
    @property
    def scope(self) -> Literal["global", "per_model"]: ...
    @property
    def required(self) -> bool: ...
    @property
    def default(self) -> float | int | bool | None: ...
    @property
    def range(self) -> tuple[float, float, bool, bool] | None:
        """(low, high, low_open, high_open) when its values are limited."""
    @property
    def range_text(self) -> str | None:
        """The range in interval notation: "[0, 1]"."""
    @property
    def help(self) -> str: ...
    @property
    def ignored(self) -> str | None:
        """Why it is accepted and has no effect (mergekit declares it and ignores it), if so."""

@final
class MethodInfo:
    """One merge method: a row of the core's method table."""

    @property
    def name(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def base(self) -> Literal["required", "optional", "input", "ignored"]: ...
    @property
    def min_models(self) -> int: ...
    @property
    def max_models(self) -> int | None: ...
    @property
    def parameters(self) -> list[ParameterInfo]: ...
    @property
    def statistics(self) -> Literal["none", "sparsification", "norms", "variance", "importance"]: ...
    @property
    def sparsification(self) -> Literal["magnitude", "random", "magnitude_outliers", "della"] | None: ...
    @property
    def sign_consensus(self) -> bool: ...
    @property
    def task_vectors(self) -> bool: ...
    @property
    def float32_result(self) -> bool:
        """Whether its result is float32 even from half-precision inputs (a float32 factor promotes it)."""

def methods() -> list[MethodInfo]:
    """Every merge method, in the table's order."""

"""A model held in memory by the engine rather than stored in files (a merge made without an output
directory). It reads as a mapping from tensor names to read-only numpy arrays that share the engine's
buffers, and every layer that takes a model reference (kinship, merging) accepts one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import ModelHandle

_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
}


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of a safetensors dtype name (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if name == "BF16":
        import ml_dtypes  # only needed for bf16 tensors

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return _NUMPY_DTYPES[name]


class ResidentModel(Mapping[str, npt.NDArray[Any]], ABC):
    """Tensors the engine holds (a :class:`ModelHandle`), read without a copy."""

    def __init__(self, tensors: ModelHandle) -> None:
        self._tensors = tensors
        self._names = tuple(tensors.names)

    @property
    def handle(self) -> ModelHandle:
        """The engine's handle on the tensors (what kinship and merges read, without a copy)."""
        return self._tensors

    @property
    @abstractmethod
    def label(self) -> str:
        """How results name this model (it has no path)."""

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def nbytes(self) -> int:
        return int(self._tensors.nbytes)

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        shape, dtype = self._tensors.info(name)  # KeyError naming the tensor when absent
        array = self._tensors.raw(name).view(numpy_dtype(dtype)).reshape(shape)
        array.flags.writeable = False
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

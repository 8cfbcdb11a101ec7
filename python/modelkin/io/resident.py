"""A model the engine holds: in memory (a merge made without an output directory) or a model directory
mapped from its files (:class:`StoredModel`). It reads as a mapping from tensor names to read-only
numpy arrays that share the engine's buffers, and every layer that takes a model reference (kinship,
merging, an evaluator given models in memory) accepts one."""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._core import ModelHandle, open_model
from .adapter import apply_adapter, resolve_adapted
from .errors import InvalidModelError

if TYPE_CHECKING:
    # numpy loads when a tensor is read, not with the module: `modelkin kinship` never needs it.
    import numpy as np
    import numpy.typing as npt


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of a safetensors dtype name (bfloat16 as ``ml_dtypes.bfloat16``)."""
    import numpy as np

    if name == "BF16":
        import ml_dtypes  # only needed for bf16 tensors

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    dtype: np.dtype[Any] = np.dtype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[name])
    return dtype


# The files a model directory's tokenizer (and generation config) is made of: copied with a model.
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|"
    r"chat_template.*|generation_config\.json)$"
)

# The numpy view of a safetensors dtype's bytes that torch.from_numpy takes (bf16 through int16).
TORCH_VIEWS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "int16"}


class ResidentModel(Mapping[str, "npt.NDArray[Any]"], ABC):
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
    @abstractmethod
    def config(self) -> dict[str, Any] | None:
        """The model's config.json (None when it has none)."""

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

    def torch_tensor(self, name: str) -> Any:
        """One tensor as a ``torch.Tensor`` sharing the engine's buffer (no copy; bf16 as
        ``torch.bfloat16``). The memory is read-only: copy the tensor before writing to it. torch
        is imported here, never by modelkin otherwise."""
        import warnings

        import torch

        shape, dtype = self._tensors.info(name)
        if dtype not in TORCH_VIEWS:
            raise TypeError(f"tensor {name}: {dtype} has no torch view")
        raw = self._tensors.raw(name).view(TORCH_VIEWS[dtype])
        with warnings.catch_warnings():
            # torch warns that the array is not writable: the tensor shares read-only memory.
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(raw)
        if dtype == "BF16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.reshape(shape)

    def torch_state_dict(self) -> dict[str, Any]:
        """The model as a torch state dict of tensors sharing the engine's buffers (see
        :meth:`torch_tensor`): what ``model.load_state_dict`` takes, without a copy in between."""
        return {name: self.torch_tensor(name) for name in self._names}

    def __len__(self) -> int:
        return len(self._names)


class StoredModel(ResidentModel):
    """A model directory (or safetensors file) opened by the engine: its files memory-mapped, its
    tensors read without a copy, as a merged model's are. What an evaluator that takes models in
    memory receives for a model that is already on disk (a pool member, a kept candidate)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        super().__init__(open_model(self.path))

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def config(self) -> dict[str, Any] | None:
        file = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        if not file.is_file():
            return None
        loaded: dict[str, Any] = json.loads(file.read_text())
        return loaded

    def __repr__(self) -> str:
        return f"StoredModel({str(self.path)!r}, {len(self)} tensors)"


class AdaptedModel(ResidentModel):
    """A LoRA adapter applied to its base (as PEFT's ``merge_and_unload`` applies it, bit for bit),
    held by the engine: the changed tensors in memory, the rest mapped from the base's files. What
    an evaluator receives for an adapter in an evolution's pool; ``base`` is the base's path (else
    the base the adapter's config names)."""

    def __init__(self, adapter: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> None:
        found = resolve_adapted(os.fspath(adapter), base=Path(base) if base is not None else None)
        if found is None:
            raise InvalidModelError(f"{adapter}: not a LoRA adapter (no adapter_config.json)")
        self.path = Path(adapter)
        self.base_path, self.adapter = found
        super().__init__(apply_adapter(self.base_path, self.adapter, str(self.path)))

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def tokenizer_dir(self) -> Path:
        """Where its tokenizer files are: the base's directory."""
        return self.base_path if self.base_path.is_dir() else self.base_path.parent

    @property
    def config(self) -> dict[str, Any] | None:
        file = self.tokenizer_dir / "config.json"
        if not file.is_file():
            return None
        loaded: dict[str, Any] = json.loads(file.read_text())
        return loaded

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the applied model into the empty or new ``directory``: its tensors, and the base's
        config and tokenizer files."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.handle.save(str(out), 5 << 30)
        for file in self.tokenizer_dir.iterdir():
            if file.is_file() and (file.name == "config.json" or TOKENIZER_FILES.match(file.name)):
                shutil.copyfile(file, out / file.name)
        return out

    def __repr__(self) -> str:
        return f"AdaptedModel({str(self.path)!r} on {str(self.base_path)!r})"

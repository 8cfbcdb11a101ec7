"""Writing safetensors checkpoints from numpy arrays, including bfloat16, which numpy lacks.

Used to build the bundled example family and the test fixtures. Reading goes through the Rust
core; this writer exists because the `safetensors` package's numpy API cannot store bf16."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

Dtype = Literal["F64", "F32", "F16", "BF16"]


def bf16_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of ``values``, rounded to nearest even like torch's conversion."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    out[nan] = 0x7FC0
    return out


def stored_values(values: npt.ArrayLike, dtype: Dtype) -> npt.NDArray[np.float64]:
    """The exact values a tensor holds once stored as ``dtype``, widened to float64."""
    if dtype == "BF16":
        bits = bf16_bits(values).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    numpy_dtype = {"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype]
    return np.asarray(values, dtype=numpy_dtype).astype(np.float64)


def encode(values: npt.ArrayLike, dtype: Dtype) -> bytes:
    """Little-endian bytes of ``values`` stored as ``dtype``."""
    if dtype == "BF16":
        return bf16_bits(values).astype("<u2").tobytes()
    numpy_dtype = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]
    return np.asarray(values).astype(numpy_dtype).tobytes()


def save_file(
    path: str | Path,
    tensors: Mapping[str, npt.ArrayLike],
    dtype: Dtype | Mapping[str, Dtype] = "BF16",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes one safetensors file; ``dtype`` is one dtype for all or a per-tensor mapping."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for name, values in tensors.items():
        kind = dtype if isinstance(dtype, str) else dtype[name]
        data = encode(values, kind)
        header[name] = {"dtype": kind, "shape": list(np.shape(values)), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    # Odd padding on purpose: readers must not assume aligned tensor data.
    text += b" " * ((8 - len(text) % 8) % 8 + 1)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for chunk in chunks:
            out.write(chunk)


def save_model(
    directory: str | Path,
    tensors: Mapping[str, npt.ArrayLike],
    dtype: Dtype | Mapping[str, Dtype] = "BF16",
    shards: int = 1,
    config: Mapping[str, object] | None = None,
) -> Path:
    """Writes a model directory in the Hugging Face layout: ``model.safetensors``, or ``shards``
    files ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    if shards <= 1:
        save_file(directory / "model.safetensors", tensors, dtype)
        return directory
    weight_map: dict[str, str] = {}
    for i, group in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: tensors[names[j]] for j in group}
        save_file(directory / file, part, dtype if isinstance(dtype, str) else {n: dtype[n] for n in part})
        weight_map.update(dict.fromkeys(part, file))
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    total = sum(int(np.size(tensors[n])) * sizes[dtype if isinstance(dtype, str) else dtype[n]] for n in names)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def load_file(path: str | Path) -> dict[str, npt.NDArray[np.float32]]:
    """Reads a small safetensors file into float32 arrays (bf16 widened exactly). For the bundled
    task family's evaluator; the engine reads real checkpoints in Rust, streamed."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as error:
        raise ValueError(f"{path}: not a safetensors file (bad header)") from error
    body = memoryview(data)[8 + size :]
    out: dict[str, npt.NDArray[np.float32]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = body[begin:end]
        if info["dtype"] == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _NUMPY:
            values = np.frombuffer(raw, dtype=_NUMPY[info["dtype"]]).astype(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']} (F64, F32, F16, BF16 are read)")
        out[name] = values.reshape(info["shape"])
    return out


def load_model(directory: str | Path) -> dict[str, npt.NDArray[np.float32]]:
    """All tensors of a model directory (``model.safetensors`` or its shards), or of one file."""
    path = Path(directory)
    if path.is_file():
        return load_file(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    out: dict[str, npt.NDArray[np.float32]] = {}
    for file in files:
        out.update(load_file(file))
    return out


def _tensor_file(model: Path, name: str) -> Path:
    """The safetensors file of a model (a file, or a directory with one file or an index) that
    holds tensor ``name``."""
    if model.is_file():
        return model
    index = model / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
        if name in weight_map:
            return model / weight_map[name]
    for file in sorted(model.glob("*.safetensors")):
        (size,) = struct.unpack("<Q", file.open("rb").read(8))
        with file.open("rb") as f:
            f.seek(8)
            if name in json.loads(f.read(size)):
                return file
    raise KeyError(f"{model}: no tensor {name}")


def read_tensor(model: str | Path, name: str) -> tuple[npt.NDArray[np.float64], Dtype]:
    """One tensor of a model, widened exactly to float64, with its stored dtype. Reads only that
    tensor's bytes (for the few token-indexed tensors laid out in Python before a merge)."""
    file = _tensor_file(Path(model), name)
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(size))[name]
        begin, end = info["data_offsets"]
        f.seek(8 + size + begin)
        raw = f.read(end - begin)
    kind = info["dtype"]
    if kind != "BF16" and kind not in _NUMPY:
        raise ValueError(f"{file}: tensor {name} has dtype {kind} (F64, F32, F16, BF16 are read)")
    return decode_tensor(raw, kind, info["shape"]), kind


def decode_tensor(raw: bytes | npt.NDArray[np.uint8], kind: Dtype, shape: Sequence[int]) -> npt.NDArray[np.float64]:
    """Stored bytes of an F64, F32, F16 or BF16 tensor widened exactly to float64."""
    if kind == "BF16":
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        values = np.frombuffer(raw, dtype=_NUMPY[kind]).astype(np.float64)
    return values.reshape(tuple(shape))

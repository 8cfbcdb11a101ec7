"""Helpers to test code that uses modelkin, and modelkin itself: small Llama-shaped model families
written with numpy (their exact stored values kept for references), a numpy-only safetensors
reader independent of the Rust core, a digest of a directory tree, and the CLI run as a process.
Tests and benches import them from here."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io.safetensors import Dtype, save_model, stored_values

__all__ = [
    "HIDDEN",
    "VOCAB",
    "Family",
    "llama_shapes",
    "make_family",
    "read_safetensors",
    "run_cli",
    "stored_dtypes",
    "tree_digest",
]

Array = np.ndarray

HIDDEN = 24
VOCAB = 64


def llama_shapes(layers: int = 2, vocab: int = VOCAB, tied: bool = False) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * HIDDEN, HIDDEN)
    shapes["model.norm.weight"] = (HIDDEN,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


@dataclass
class Family:
    root: Path
    base: Path
    models: list[Path]
    # exact stored values of every tensor, per model (base first)
    values: list[dict[str, np.ndarray]]

    @property
    def base_values(self) -> dict[str, np.ndarray]:
        return self.values[0]


def make_family(
    root: Path,
    *,
    n: int = 2,
    dtype: Dtype = "BF16",
    shards: int = 1,
    extra_vocab: tuple[int, ...] = (),
    tied: bool = False,
    seed: int = 0,
    shared: float = 0.7,
    base_dtype: Dtype | None = None,
) -> Family:
    """A base and ``n`` fine-tunes that share part of their delta (so kinship is nontrivial)."""
    rng = np.random.default_rng(seed)
    shapes = llama_shapes(tied=tied)
    base = {k: rng.normal(0.0, 0.05, s) for k, s in shapes.items()}
    common = {k: rng.normal(0.001, 0.01, s) for k, s in shapes.items()}
    paths, values = [], []
    bdtype = base_dtype or dtype
    paths.append(save_model(root / "base", base, bdtype, shards=shards))
    values.append({k: stored_values(v, bdtype) for k, v in base.items()})
    for i in range(n):
        tensors = {}
        for k, s in shapes.items():
            t = base[k] + shared * common[k] + rng.normal(0.0, 0.01, s)
            extra = extra_vocab[i] if i < len(extra_vocab) else 0
            if extra and k in ("model.embed_tokens.weight", "lm_head.weight"):
                t = np.concatenate([t, rng.normal(0, 0.05, (extra, HIDDEN))])
            tensors[k] = t
        paths.append(save_model(root / f"ft{i}", tensors, dtype, shards=shards))
        values.append({k: stored_values(v, dtype) for k, v in tensors.items()})
    return Family(root, paths[0], paths[1:], values)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def run_cli(
    *args: str, env: dict[str, str] | None = None, module: str = "modelkin.cli"
) -> subprocess.CompletedProcess[str]:
    # import_module, not `import a.b.c as m`: that form walks attributes, and `modelkin.kinship` and
    # `modelkin.merge` are the public functions, which shadow the layer packages of the same name.
    code = f"import importlib; importlib.import_module({module!r}).main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def stored_dtypes(directory: Path) -> dict[str, str]:
    """Each tensor's safetensors dtype in a model directory."""
    out: dict[str, str] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        out.update({name: info["dtype"] for name, info in header.items() if name != "__metadata__"})
    return out


def read_safetensors(directory: Path) -> dict[str, Array]:
    """Every tensor of a model directory, widened to float64 (numpy only)."""
    out: dict[str, Array] = {}
    for file in sorted(directory.glob("*.safetensors")):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        body = data[8 + length :]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            raw = body[start:end]
            if info["dtype"] == "BF16":
                values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                values = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[info["dtype"]])
            out[name] = values.astype(np.float64).reshape(info["shape"])
    return out

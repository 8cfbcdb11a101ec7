"""A numpy forward pass of a Llama-architecture causal LM (transformers' ``LlamaForCausalLM``):
RMSNorm, rotary embeddings (rotate-half layout), grouped-query causal attention, SwiGLU MLP.

It computes in float64 from the stored weights, so it needs neither torch nor a GPU; it is sized for
the bundled task family (tiny models, short sequences), not for real LLMs."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_heap_kept = False


def _keep_heap() -> None:
    """Keeps the forward pass's temporaries (a few MB each) on the heap. glibc serves blocks above
    its mmap threshold with fresh mappings and trims the heap eagerly, so every temporary page-faults
    again: measured 100k faults and 0.86 s per evaluation of a fine-tune, 0.34 s with the thresholds
    raised (and then one BLAS thread is as fast as two). Process-wide, once; a no-op off glibc."""
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


class LlamaModel:
    """Weights and config of a Llama checkpoint, ready to run."""

    def __init__(self, tensors: Mapping[str, npt.NDArray[Any]], config: Mapping[str, Any]) -> None:
        _keep_heap()
        self.w = {name: np.asarray(t, dtype=np.float64) for name, t in tensors.items()}
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        hidden = int(config["hidden_size"])
        self.head_dim = int(config.get("head_dim") or hidden // self.heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.theta = float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e4))
        tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.w
        self.head = self.w["model.embed_tokens.weight"] if tied else self.w["lm_head.weight"]
        missing = [n for n in self._names() if n not in self.w]
        if missing:
            raise ValueError(f"checkpoint lacks tensor {missing[0]} (Llama layout expected)")

    def _names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            names += [
                p + s
                for s in (
                    "input_layernorm.weight",
                    "post_attention_layernorm.weight",
                    "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight",
                    "mlp.gate_proj.weight",
                    "mlp.up_proj.weight",
                    "mlp.down_proj.weight",
                )
            ]
        return names

    def _norm(self, x: Array, weight: str) -> Array:
        scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)
        out: Array = x * scale * self.w[weight]
        return out

    def _rope(self, x: Array, positions: int) -> Array:
        # x: (batch, heads, seq, head_dim); transformers' rotate-half convention.
        inv_freq = 1.0 / self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
        cos = np.cos(np.concatenate([angles, angles], axis=-1))
        sin = np.sin(np.concatenate([angles, angles], axis=-1))
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        out: Array = x * cos + rotated * sin
        return out

    def _linear(self, x: Array, weight: str) -> Array:
        # One 2-D product: numpy loops over the leading axes of a 3-D matmul one small product at a time.
        out: Array = (x.reshape(-1, x.shape[-1]) @ self.w[weight].T).reshape(*x.shape[:-1], -1)
        return out

    def _attention(self, x: Array, p: str) -> Array:
        batch, seq, _ = x.shape
        q = self._linear(x, p + "q_proj.weight").reshape(batch, seq, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self._linear(x, p + "k_proj.weight").reshape(batch, seq, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self._linear(x, p + "v_proj.weight").reshape(batch, seq, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q, k = self._rope(q, seq), self._rope(k, seq)
        group = self.heads // self.kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(self.head_dim)
        scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        mixed = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, seq, self.heads * self.head_dim)
        return self._linear(mixed, p + "o_proj.weight")

    def _mlp(self, x: Array, p: str) -> Array:
        gate = self._linear(x, p + "gate_proj.weight")
        up = self._linear(x, p + "up_proj.weight")
        return self._linear(gate / (1.0 + np.exp(-gate)) * up, p + "down_proj.weight")

    def logits(self, ids: npt.NDArray[np.int64]) -> Array:
        """Logits of every position of a batch of token-id rows, shape (batch, seq, vocab)."""
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            x = x + self._attention(self._norm(x, p + "input_layernorm.weight"), p + "self_attn.")
            x = x + self._mlp(self._norm(x, p + "post_attention_layernorm.weight"), p + "mlp.")
        out: Array = (self._norm(x, "model.norm.weight").reshape(-1, x.shape[-1]) @ self.head.T).reshape(
            *x.shape[:-1], -1
        )
        return out

    def generate(self, prompts: npt.NDArray[np.int64], steps: int) -> npt.NDArray[np.int64]:
        """Greedy continuation of equal-length prompts by ``steps`` tokens."""
        ids = prompts
        for _ in range(steps):
            nxt = self.logits(ids)[:, -1, :].argmax(axis=-1)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
        out: npt.NDArray[np.int64] = ids[:, prompts.shape[1] :]
        return out

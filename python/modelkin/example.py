"""A tiny Llama-shaped model family with known relatedness, so the main job runs with no download.

Fine-tunes are the base plus mixtures of two "task vectors" and noise, so their kinship is known
by construction: ``math-a`` and ``math-b`` share the math task (high kinship), ``code`` has its own
task (low kinship with both), ``math-code`` mixes the two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from .io.safetensors import save_model

LAYERS = 4
HIDDEN = 64
INTERMEDIATE = 160
VOCAB = 512

# name -> (weight of the math task, weight of the code task, noise scale, shards, vocab rows added)
FINE_TUNES: dict[str, tuple[float, float, float, int, int]] = {
    "math-a": (1.0, 0.0, 0.3, 1, 0),
    "math-b": (0.9, 0.1, 0.3, 2, 8),
    "code": (0.0, 1.0, 0.3, 1, 0),
    "math-code": (0.6, 0.6, 0.3, 3, 0),
}


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-style decoder (``kv`` rows in the k/v projections)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def llama_config(shapes: dict[str, tuple[int, ...]], head_dim: int) -> dict[str, object]:
    """A transformers `config.json` matching ``shapes`` (as :func:`llama_shapes` lays them out)."""
    vocab, hidden = shapes["model.embed_tokens.weight"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
        "num_hidden_layers": sum(1 for n in shapes if n.endswith("input_layernorm.weight")),
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }


def _shapes() -> dict[str, tuple[int, ...]]:
    return llama_shapes(HIDDEN, INTERMEDIATE, LAYERS, VOCAB, kv=HIDDEN // 4)


def _config(vocab: int) -> dict[str, object]:
    return {**llama_config(_shapes(), head_dim=HIDDEN // 4), "vocab_size": vocab}


def write_example_family(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Writes ``base`` and the fine-tunes of FINE_TUNES under ``directory`` (bf16); returns their paths."""
    root = Path(directory)
    rng = np.random.default_rng(seed)
    shapes = _shapes()
    base = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
    math_task = {n: rng.normal(0, 0.002, s) for n, s in shapes.items()}
    code_task = {n: rng.normal(0, 0.002, s) for n, s in shapes.items()}
    paths = {"base": save_model(root / "base", base, "BF16", config=_config(VOCAB))}
    for name, (w_math, w_code, noise, shards, extra_rows) in FINE_TUNES.items():
        tensors: dict[str, npt.NDArray[np.float32]] = {}
        for n, s in shapes.items():
            delta = w_math * math_task[n] + w_code * code_task[n] + noise * rng.normal(0, 0.002, s)
            tensor = (base[n] + delta).astype(np.float32)
            if extra_rows and n in ("model.embed_tokens.weight", "lm_head.weight"):
                tensor = np.concatenate([tensor, rng.normal(0, 0.02, (extra_rows, HIDDEN)).astype(np.float32)])
            tensors[n] = tensor
        paths[name] = save_model(root / name, tensors, "BF16", shards=shards, config=_config(VOCAB + extra_rows))
    return paths

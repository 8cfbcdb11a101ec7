"""Trains the bundled task family (run by a developer, never at install; needs torch + transformers).

A tiny LlamaForCausalLM base is trained briefly on all four synthetic tasks (so it scores part of
each), then one fine-tune per task is trained from it on that task alone (it masters its task and
forgets part of the others). Seeds are tried until the family is one where merging has something to
do: the uniform soup of the fine-tunes beats the base and every fine-tune on the search split.

    .venv-peers/bin/python scripts/train_task_family.py python/modelkin/evolve/family/weights
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> types.ModuleType:
    """A module of the family loaded by path, so this script does not import the compiled package:
    tasks.py needs only numpy, hf.py (the tokenizer and generation files) nothing."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"python/modelkin/evolve/family/{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tasks = _load("tasks")
hf = _load("hf")

CONFIG = {
    "vocab_size": tasks.VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": None,
}


# The base sees the slow-to-learn reversal more often, so every task is partly learned when it stops.
BASE_MIX = {"reverse": 4, "sort": 1, "shift": 1, "swap": 1}


def data(names: list[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = [], []
    for name in [n for n in names for _ in range(BASE_MIX[n] if len(names) > 1 else 1)]:
        prompts, answers = tasks.examples(name, split)
        seq = np.concatenate([prompts, answers], axis=1)
        lab = seq.copy()
        lab[:, : tasks.PROMPT_LEN] = -100
        ids.append(seq)
        labels.append(lab)
    return torch.tensor(np.concatenate(ids)), torch.tensor(np.concatenate(labels))


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, split: str) -> dict[str, float]:
    out = {}
    for name in tasks.TASKS:
        prompts, answers = tasks.examples(name, split)
        ids = torch.tensor(prompts)
        for _ in range(tasks.ANSWER_LEN):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        got = ids[:, tasks.PROMPT_LEN :].numpy()
        out[name] = float((got == answers).all(axis=1).mean())
    return out


def train(model: LlamaForCausalLM, names: list[str], steps: int, lr: float, seed: int, stop=None) -> int:
    ids, labels = data(names, "train")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(ids), (256,), generator=gen)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if stop is not None and step % 5 == 0:
            model.eval()
            done = stop(accuracy(model, "search"))
            model.train()
            if done:
                break
    model.eval()
    return step


def average(models: list[LlamaForCausalLM]) -> LlamaForCausalLM:
    soup = LlamaForCausalLM(LlamaConfig(**CONFIG))
    states = [m.state_dict() for m in models]
    soup.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return soup.eval()


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


Family = tuple[dict[str, LlamaForCausalLM], dict[str, dict[str, float]]]


def family(seed: int, base_target: float, ft_steps: int, base_lr: float, ft_lr: float) -> Family:
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG))

    def partly_trained(scores: dict[str, float]) -> bool:
        return min(scores.values()) >= base_target and mean(scores) >= 0.4

    steps = train(base, list(tasks.TASKS), 5000, base_lr, seed, stop=partly_trained)
    print(f"seed {seed}: base trained {steps} steps", flush=True)
    models = {"base": base}
    for i, name in enumerate(tasks.TASKS):
        ft = LlamaForCausalLM(LlamaConfig(**CONFIG))
        ft.load_state_dict(base.state_dict())
        steps = train(ft, [name], ft_steps, ft_lr, seed * 10 + i + 1)
        print(f"  {name}: {steps} steps", flush=True)
        models[f"ft-{name}"] = ft
    fts = [n for n in models if n.startswith("ft-")]
    models["soup"] = average([models[n] for n in fts])
    scores = {n: accuracy(m, "search") for n, m in models.items()}
    for i, a in enumerate(fts):
        for b in fts[i + 1 :]:
            scores[f"{a[3:]}+{b[3:]}"] = accuracy(average([models[a], models[b]]), "search")
    return models, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(16)))
    parser.add_argument("--base-target", type=float, default=0.2)
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--base-lr", type=float, default=5e-4)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for seed in args.seeds:
        start = time.time()
        models, scores = family(seed, args.base_target, args.ft_steps, args.base_lr, args.ft_lr)
        for n, s in scores.items():
            print(f"  {n:12s} mean {mean(s):.3f} " + " ".join(f"{t} {v:.2f}" for t, v in s.items()), flush=True)
        soup = mean(scores["soup"])
        fts = [mean(s) for n, s in scores.items() if n.startswith("ft-")]
        pairs = max(mean(s) for n, s in scores.items() if "+" in n)
        masters = all(s[n[3:]] >= 0.95 for n, s in scores.items() if n.startswith("ft-"))
        ok = max(soup, pairs) > mean(scores["base"]) and soup > max(fts) and masters
        print(f"seed {seed}: {'kept' if ok else 'rejected'} ({time.time() - start:.0f} s)", flush=True)
        if ok:
            break
    else:
        sys.exit("no seed gave a family where merging helps")
    for name, model in models.items():
        if name == "soup" or "+" in name:
            continue
        target = args.out / name
        target.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **CONFIG,
            "torch_dtype": "float32",
            "dtype": "float32",
            "modelkin_task_family": {"seed": seed, "trained_on": list(tasks.TASKS) if name == "base" else [name[3:]]},
        }
        (target / "config.json").write_text(json.dumps(config, indent=2))
        hf.write_hf_files(target, tasks.TOKENS, CONFIG["max_position_embeddings"])
    (args.out / "training.json").write_text(json.dumps({"seed": seed, "search_scores": scores}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

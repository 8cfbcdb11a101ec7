"""The bundled task family: its tasks, its shipped weights, and the numpy forward pass against
transformers' own LlamaForCausalLM (where a peer Python with torch and transformers is available)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from modelkin.evolve.family import MODELS, WEIGHTS, evaluate, load
from modelkin.evolve.family.tasks import TASKS, TOKEN_ID, decode, examples, split_of

ROOT = Path(__file__).resolve().parents[1]


def peer_python() -> str | None:
    """A Python with torch and transformers: MODELKIN_PEER_PYTHON, else the repo's .venv-peers."""
    candidate = os.environ.get("MODELKIN_PEER_PYTHON") or str(ROOT / ".venv-peers" / "bin" / "python")
    if not shutil.which(candidate) and not Path(candidate).is_file():
        return None
    probe = subprocess.run([candidate, "-c", "import torch, transformers"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def test_tasks_are_what_they_say():
    for task, (marker, _, answer) in TASKS.items():
        prompts, answers = examples(task, "test")
        assert len(prompts) > 100
        for p, a in zip(prompts[:20], answers[:20], strict=True):
            text = decode(p)
            assert text[0] == marker and text[-1] == "="
            assert decode(a) == answer(text[1:-1])
    assert decode(examples("reverse", "search")[0][0]) != decode(examples("reverse", "test")[0][0])
    assert TOKEN_ID["="] == 1


def test_splits_are_disjoint():
    for task in TASKS:
        seen = {split: {tuple(p) for p in examples(task, split)[0]} for split in ("search", "test", "train")}
        assert not (seen["search"] & seen["test"]) and not (seen["train"] & (seen["search"] | seen["test"]))
    assert {split_of(i) for i in range(100)} == {"search", "test", "train"}


def test_shipped_family_shows_what_merging_needs():
    scores = {name: evaluate(WEIGHTS / name, "test") for name in MODELS}
    for name in MODELS[1:]:
        task = name.removeprefix("ft-")
        assert scores[name][task] >= 0.95, (name, scores[name])
        others = [v for t, v in scores[name].items() if t != task]
        assert min(others) < 0.7, "each fine-tune has lost part of the other tasks"
    base_mean = np.mean(list(scores["base"].values()))
    assert all(np.mean(list(scores[n].values())) < base_mean for n in MODELS[1:])
    assert 0.0 < min(scores["base"].values()) < 0.8


def test_numpy_forward_matches_transformers(tmp_path):
    python = peer_python()
    if python is None:
        pytest.skip("no peer Python with torch and transformers (set MODELKIN_PEER_PYTHON or make .venv-peers)")
    prompts = np.concatenate([examples(t, "test")[0][:16] for t in TASKS])
    ids = np.concatenate([prompts, examples("sort", "test")[1][:1].repeat(len(prompts), 0)], axis=1)
    np.save(tmp_path / "ids.npy", ids)
    script = f"""
import numpy as np, torch
from transformers import LlamaForCausalLM
ids = torch.tensor(np.load({str(tmp_path / "ids.npy")!r}))
for name in {list(MODELS)!r}:
    model = LlamaForCausalLM.from_pretrained({str(WEIGHTS)!r} + "/" + name, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        np.save({str(tmp_path)!r} + f"/{{name}}.npy", model(input_ids=ids).logits.numpy())
"""
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in MODELS:
        theirs = np.load(tmp_path / f"{name}.npy")
        ours = load(WEIGHTS / name).logits(ids)
        # transformers keeps its rotary tables and RMSNorm in float32 even for a float64 model,
        # so the two agree to float32 precision; a wrong layout or rotary convention is off by 0.1.
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
        top2 = np.sort(theirs, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-3
        assert (ours.argmax(-1) == theirs.argmax(-1))[clear].all()


def test_configs_shipped_with_the_family(tmp_path):
    from modelkin.evolve.config import load_evolve_config
    from modelkin.evolve.family import write_task_family

    written = write_task_family(tmp_path / "fam")
    for name in ("evolve.yml", "soup.yml"):
        config = load_evolve_config(written[name])
        assert config.evaluator.python == "modelkin.evolve.family:evaluate"
        assert all(Path(config.model_path(p)).is_dir() for p in config.pool)
    config = json.loads((tmp_path / "fam" / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]

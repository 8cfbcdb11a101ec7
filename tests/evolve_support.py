"""Shared pieces of the evolution tests: a small model family, fast deterministic evaluators (a
Python callable and a command-line script), and config writers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from modelkin.io.safetensors import load_model, save_model

HERE = Path(__file__).resolve().parent
EVAL_SCRIPT = HERE / "fake_evaluator.py"


def hashed_scores(model: str | Path | Mapping[str, Any], split: str) -> dict[str, float]:
    """Deterministic scores from a model's weights: pseudo-random, so selection has work to do,
    and the same bits always give the same scores (any change in a merge changes them). ``model``
    is a directory, or the model in memory (a resident evaluator's)."""
    tensors = model if isinstance(model, Mapping) else load_model(model)
    total = sum(float(np.abs(tensors[name].astype(np.float64)).sum()) for name in sorted(tensors))
    layer = float(np.abs(tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)).sum())
    offset = 0.0 if split == "search" else 0.01
    return {"alpha": (total * 1e3) % 1.0 + offset, "beta": (layer * 1e4) % 1.0}


def small_family(root: Path, n: int = 4, seed: int = 0, dtype: str = "F32", vocab: int = 40) -> tuple[Path, list[Path]]:
    """A base and ``n`` fine-tunes (2 layers, hidden 32), config.json included."""
    rng = np.random.default_rng(seed)
    hidden, inter = 32, 48
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "torch_dtype": "float32",
    }
    base = {k: rng.normal(0, 0.05, s) for k, s in shapes.items()}
    base_path = save_model(root / "base", base, dtype, config=config)  # type: ignore[arg-type]
    shared = {k: rng.normal(0, 0.01, s) for k, s in shapes.items()}
    models = []
    for i in range(n):
        tensors = {k: base[k] + (0.5 if i % 2 else 0.0) * shared[k] + rng.normal(0, 0.01, s) for k, s in shapes.items()}
        models.append(save_model(root / f"ft{i}", tensors, dtype, config=config))  # type: ignore[arg-type]
    return base_path, models


def write_config(path: Path, **config: Any) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def command_evaluator(extra: str = "") -> str:
    """An evaluator command line running fake_evaluator.py with this interpreter."""
    return f"{sys.executable} {EVAL_SCRIPT} {{model}} --split {{split}} {extra}".strip()


def runs_json(run_dir: Path) -> dict[str, Any]:
    from modelkin.evolve import open_run

    return json.loads(json.dumps(open_run(run_dir).to_dict()))


def mortal_scores(model: str | Path, split: str) -> dict[str, float]:
    """hashed_scores, except that the worker process evaluating a model named in $EVOLVE_TEST_DIE or
    in the file $EVOLVE_TEST_DIR/victims ("c12,c15": a file reaches workers started before the test
    chose) kills itself with SIGKILL mid-evaluation: once per model (a marker file in $EVOLVE_TEST_DIR
    remembers), or every time when $EVOLVE_TEST_DIE_ALWAYS is set."""
    import os
    import signal

    name = Path(model).name
    listed = os.environ.get("EVOLVE_TEST_DIE", "")
    victims = Path(os.environ.get("EVOLVE_TEST_DIR", "/nonexistent")) / "victims"
    if victims.exists():
        listed += "," + victims.read_text()
    doomed = set(filter(None, listed.split(",")))
    if name in doomed:
        marker = Path(os.environ["EVOLVE_TEST_DIR"]) / f"died-{name}-{split}"
        if os.environ.get("EVOLVE_TEST_DIE_ALWAYS") or not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    return hashed_scores(model, split)


def search_config(
    base: Path, pool: list[Path], evaluator: dict[str, Any] | None = None, **cmaes: Any
) -> dict[str, Any]:
    """A CMA-ES config over per-layer task_arithmetic weights (float32 merges)."""
    return {
        "strategy": "cmaes",
        "genome": {
            "models": [str(p) for p in pool],
            "base_model": str(base),
            "merge_method": "task_arithmetic",
            "layer_granularity": 1,
            "dtype": "float32",
        },
        "cmaes": {"max_evals": 24, "seed": 3, **cmaes},
        "evaluator": evaluator or {"python": "evolve_support:hashed_scores"},
    }


def stored_scores(run_dir: Path) -> int:
    """How many (candidate, split) scores a run's store holds (0 before it exists)."""
    import sqlite3

    if not (run_dir / "run.sqlite").exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True, timeout=5)
        rows = db.execute("SELECT scores FROM candidates").fetchall()
        db.close()
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    return sum(len(json.loads(r[0])) for r in rows)


def recorded_evaluations(run_dir: Path) -> set[tuple[str, str]]:
    """(model path, split) of every score the store holds: the names fake_evaluator.py logs."""
    from modelkin.evolve import open_run

    if not (run_dir / "run.sqlite").exists():
        return set()
    out = set()
    for c in open_run(run_dir).candidates:
        paths = {c.path} if c.path else set()
        if c.recipe is not None:  # scratch (search) or kept (models/) copies
            paths |= {str(run_dir.resolve() / "scratch" / f"c{c.id}"), str(run_dir.resolve() / "models" / f"c{c.id}")}
        out |= {(p, split) for p in paths for split in c.scores}
    return out


def evaluations_after(log: Path, offset: int) -> list[tuple[str, str]]:
    """(model, split) of the evaluations that finished after the log's first ``offset`` lines."""
    lines = log.read_text().splitlines()[offset:] if log.exists() else []
    return [tuple(ln.split(" ", 1)[1].rsplit(" ", 1)) for ln in lines if ln.startswith("end ")]  # type: ignore[misc]


def log_length(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Asserts a refusal: exit 2, one `error:` line on stderr naming every fragment, no traceback
    (the live lines of a non-terminal, "#id role ...", come before it)."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def strategy_specs(layer_granularity: int = 0, max_evals: int = 8) -> dict[str, dict[str, Any]]:
    """Short topk, greedy-soup and CMA-ES configs (the pool and evaluator left to the caller), for
    tests that run every strategy over one pool and another and compare."""
    return {
        "topk": {
            "strategy": "topk",
            "topk": {"k": 2, "generations": 2, "explore": "kinship", "metric": "pcc"},
            "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        },
        "soup": {"strategy": "greedy_soup", "merge": {"merge_method": "linear", "dtype": "float32"}},
        "cmaes": {
            "strategy": "cmaes",
            "genome": {"merge_method": "task_arithmetic", "layer_granularity": layer_granularity, "dtype": "float32"},
            "cmaes": {"sigma0": 0.1667, "max_evals": max_evals, "seed": 0},
        },
    }

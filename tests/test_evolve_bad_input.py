"""Bad input to the evolution commands: one line, exit 2, nothing of the user's modified; a failing
candidate fails alone and the run goes on."""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import modelkin.evolve as evo
from evolve_support import command_evaluator, one_line_error, small_family, write_config
from modelkin.evolve.store import STORE_NAME
from modelkin.io.safetensors import save_model
from modelkin.testing import run_cli, tree_digest


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return small_family(tmp_path / "fam", n=3)


def config_for(base: Path, pool: list[Path], evaluator: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": {"k": 2, "generations": 2, "stop_kinship": None},
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        "evaluator": evaluator,
        **extra,
    }


def evolve_cli(
    tmp_path: Path, config: dict[str, object], *args: str, run: str = "run"
) -> subprocess.CompletedProcess[str]:
    path = write_config(tmp_path / f"{run}.yml", **config)
    return run_cli("evolve", str(path), str(tmp_path / run), *args)


def test_pool_model_that_is_not_a_fine_tune(family, tmp_path):
    base, pool = family
    stranger = tmp_path / "stranger"
    tensors = {"model.embed_tokens.weight": np.zeros((40, 16), np.float32)}
    save_model(stranger, tensors, "F32")
    before = tree_digest(tmp_path / "fam")
    done = evolve_cli(tmp_path, config_for(base, [*pool, stranger], {"command": command_evaluator()}))
    one_line_error(done, "stranger", "not a fine-tune")
    assert not (tmp_path / "run").exists(), "refused before anything ran"
    # Same tensors, one shape different.
    wrong = tmp_path / "wrong"
    from modelkin.io.safetensors import load_model

    values = load_model(pool[0])
    values["model.norm.weight"] = np.zeros(31, np.float32)
    save_model(wrong, values, "F32")
    done = evolve_cli(tmp_path, config_for(base, [pool[0], wrong], {"command": command_evaluator()}))
    one_line_error(done, "wrong", "model.norm.weight", "shape")
    assert tree_digest(tmp_path / "fam") == before


def test_missing_evaluator_command(family, tmp_path):
    base, pool = family
    done = evolve_cli(tmp_path, config_for(base, pool, {"command": "no-such-evaluator-xyz {model}"}))
    one_line_error(done, "base model could not be evaluated", "status 127")
    run = evo.open_run(tmp_path / "run")
    assert run.base.status == "failed" and "no-such-evaluator-xyz" in (run.base.error or "")


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("hang-merged", "timed out after 3 s"),
        ("no-json", "printed no JSON"),
        ("nan", "is nan"),
        ("fail", "out of GPU memory"),
    ],
)
def test_failing_evaluations_fail_their_candidate_only(family, tmp_path, mode, message):
    base, pool = family
    evaluator = {"command": command_evaluator(f"--mode {mode}"), "timeout": 3}
    done = evolve_cli(tmp_path, config_for(base, pool, evaluator, max_failures=10))
    assert done.returncode == 0, done.stderr
    run = evo.open_run(tmp_path / "run")
    merged = [c for c in run.candidates if c.recipe is not None]
    assert merged and all(c.status == "failed" for c in merged)
    assert all(message in (c.error or "") for c in merged), [c.error for c in merged]
    assert all(c.status == "done" for c in run.candidates if c.recipe is None)
    # The pool's best is the answer when every merge failed.
    assert run.best is not None and run.best.role == "pool"
    shown = json.loads(run_cli("runs", "show", str(tmp_path / "run"), "--json").stdout)
    assert all(c["error"] for c in shown["candidates"] if c["status"] == "failed")


def test_too_many_failures_in_a_row_stop_the_run(family, tmp_path):
    base, pool = family
    evaluator = {"command": command_evaluator("--mode fail")}
    done = evolve_cli(tmp_path, config_for(base, pool, evaluator, max_failures=2))
    one_line_error(done, "2 candidates failed in a row", "max_failures")


def test_objective_naming_an_unreported_task(family, tmp_path):
    base, pool = family
    config = config_for(base, pool, {"command": command_evaluator()}, objective={"weights": {"gamma": 1.0}})
    one_line_error(evolve_cli(tmp_path, config), "objective names task 'gamma'", "alpha, beta")


def test_run_directory_of_another_config(family, tmp_path):
    base, pool = family
    config = config_for(base, pool, {"python": "evolve_support:hashed_scores"})
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    path = write_config(tmp_path / "a.yml", **config)
    assert run_cli("evolve", str(path), str(tmp_path / "run"), env=env).returncode == 0
    before = tree_digest(tmp_path / "run")
    other = write_config(tmp_path / "b.yml", **{**config, "seed": 7})
    done = run_cli("evolve", str(other), str(tmp_path / "run"), env=env)
    one_line_error(done, "different config", "--force")
    assert tree_digest(tmp_path / "run") == before
    done = run_cli("evolve", str(other), str(tmp_path / "run"), "--force", env=env)
    assert done.returncode == 0, done.stderr
    # A directory that is not a run is not taken over either.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line_error(run_cli("evolve", str(path), str(tmp_path / "mine"), env=env), "not a run directory")


def test_disk_full_while_writing_a_child(family, tmp_path):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) on the run: children fail to be
    written, the candidates fail with the reason, the store stays consistent and the run goes on."""
    base, pool = small_family(tmp_path / "big", n=3, vocab=2000)
    # Children written in float64 are larger than the limit; the store's pages are far smaller.
    config = config_for(base, pool, {"python": "evolve_support:hashed_scores"}, max_failures=50)
    config["merge"] = {**config["merge"], "out_dtype": "float64"}  # type: ignore[dict-item]
    path = write_config(tmp_path / "full.yml", **config)
    limit = 700_000

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-c", "import modelkin.cli as m; m.main()", "evolve", str(path), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "run" / STORE_NAME)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    run = evo.open_run(tmp_path / "run")
    merged = [c for c in run.candidates if c.recipe is not None]
    assert merged and all(c.status == "failed" and "too large" in (c.error or "").lower() for c in merged)
    assert not list((tmp_path / "run" / "models").glob(".*")), "no staging directory left behind"
    assert not list((tmp_path / "run" / "models").iterdir())


def test_config_errors_name_key_and_line(family, tmp_path):
    base, pool = family
    text = f"""pool: [{pool[0]}, {pool[1]}]
base_model: {base}
strategy: topk
topk: {{k: 3, explre: kinship}}
evaluator: {{command: "x {{model}}"}}
"""
    (tmp_path / "bad.yml").write_text(text)
    done = run_cli("evolve", str(tmp_path / "bad.yml"), str(tmp_path / "run"))
    one_line_error(done, "topk.explre", "line 4", "unknown key")

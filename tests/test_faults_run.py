"""Faults of the machine during an evolution: a full disk, a lost worker, a second driver, a hanging
in-process evaluator. None of them may change what the search finds: a machine fault stops the run
with the candidate pending (never failed), and the resumed run ends exactly as a clean one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import modelkin.evolve as evo
from evolve_support import command_evaluator, hashed_scores, small_family, write_config
from modelkin.evolve.lock import LOCK_NAME
from modelkin.testing import run_cli

HERE = Path(__file__).resolve().parent


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return small_family(tmp_path / "fam", n=3)


def topk_config(base: Path, pool: list[Path], evaluator: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": {"k": 3, "generations": 3, "stop_kinship": None},
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        "evaluator": evaluator,
        **extra,
    }


def outcome(run: evo.Run) -> list[tuple[Any, ...]]:
    """What a run decided and measured (not where it wrote it)."""
    rows = [
        (c.id, c.key, c.role, c.status, json.dumps(c.scores, sort_keys=True), c.objective_search, c.objective_test)
        for c in run.candidates
    ]
    return [*rows, ("best", run.best_id, run.stop_reason)]


# --- evaluators the worker processes import by name ----------------------------------------------


def enospc_while_flagged(model: str, split: str) -> dict[str, float]:
    """hashed_scores, except that evaluating a merged model while $FAULT_FLAG exists meets a full disk
    (as an evaluator writing its cache would)."""
    flag = os.environ.get("FAULT_FLAG")
    if flag and Path(flag).exists() and Path(model).name.startswith("c"):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(model) / "eval-cache"))
    return hashed_scores(model, split)


def hang_on_merges(model: str, split: str) -> dict[str, float]:
    """hashed_scores for the pool and the base; a merged model's evaluation never ends."""
    if Path(model).name.startswith("c"):
        time.sleep(3600)
    return hashed_scores(model, split)


# --- a full disk ---------------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_full_disk_stops_the_run_and_resuming_changes_nothing(family, tmp_path):
    """A real full file system: the run's models/ on a tmpfs too small for them (a symlink, as a
    user puts models on another disk; the store beside it has room to record the fault)."""
    base, pool = family
    config = write_config(tmp_path / "run.yml", **topk_config(base, pool, {"command": command_evaluator()}))
    clean = run_cli("evolve", str(config), str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    models = sorted((tmp_path / "clean" / "models").iterdir())
    one_model = max(sum(f.stat().st_size for f in m.rglob("*")) for m in models)
    small = tmp_path / "small"
    # Room for about three of the seven merged models.
    if not _mount_tmpfs(small, (3 * one_model + one_model // 2) // 4096 * 4096 + 4096):
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); test_injected_full_disk covers the logic")
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "models").symlink_to(small)
        full = run_cli("evolve", str(config), str(tmp_path / "run"), "--force")
        assert full.returncode == 1, (full.stdout, full.stderr)
        lines = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "no space left on device" in lines[0].lower(), full.stderr
        assert "Traceback" not in full.stderr
        stopped = evo.open_run(tmp_path / "run")
        assert not [c for c in stopped.candidates if c.status == "failed"], "the disk's fault is no candidate's"
        assert stopped.faults and stopped.faults[0][1] is not None
        shown = run_cli("runs", "show", str(tmp_path / "run"))
        assert shown.returncode == 0 and "fault" in shown.stdout, shown.stdout
        # Mended: the same command resumes and ends exactly as the clean run.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        resumed = run_cli("evolve", str(config), str(tmp_path / "run"))
        assert resumed.returncode == 0, resumed.stderr
        assert outcome(evo.open_run(tmp_path / "run")) == outcome(evo.open_run(tmp_path / "clean"))
        assert evo.open_run(tmp_path / "run").faults, "the fault met stays on record"
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_injected_full_disk_leaves_the_candidate_pending(family, tmp_path, monkeypatch):
    """ENOSPC raised inside the evaluation (where mounting is not possible, and for the evaluator's
    own writes): the same rules, through the library API."""
    base, pool = family
    config = topk_config(base, pool, {"python": "test_faults_run:enospc_while_flagged"})
    flag = tmp_path / "disk-full"
    monkeypatch.setenv("FAULT_FLAG", str(flag))
    clean = evo.evolve(config, tmp_path / "clean")
    flag.write_text("")
    with pytest.raises(evo.MachineFault, match="no space left on device"):
        evo.evolve(config, tmp_path / "run")
    stopped = evo.open_run(tmp_path / "run")
    assert not [c for c in stopped.candidates if c.status == "failed"]
    [(_, candidate, split, message)] = stopped.faults
    assert candidate is not None and stopped.candidate(candidate).status == "pending"
    assert split == "search" and "eval-cache" in message
    flag.unlink()
    assert outcome(evo.evolve(config, tmp_path / "run")) == outcome(clean)


# --- one driver per run directory -----------------------------------------------------------------


def test_a_second_driver_is_refused_and_kill_9_leaves_no_stale_lock(family, tmp_path):
    base, pool = family
    config = write_config(
        tmp_path / "run.yml", **topk_config(base, pool, {"command": command_evaluator("--sleep 0.3")})
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    first = subprocess.Popen(
        [sys.executable, "-m", "modelkin", "evolve", str(config), str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / LOCK_NAME).exists() or not (run_dir / LOCK_NAME).read_text():
            assert time.monotonic() < deadline and first.poll() is None, "the first driver did not start"
            time.sleep(0.05)
        second = run_cli("evolve", str(config), str(run_dir))
        assert second.returncode == 2, second.stderr
        [line] = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert line.startswith("error: ") and "already running" in line and f"pid {first.pid}" in line, line
        # Readers never take the lock.
        assert run_cli("runs", "show", str(run_dir)).returncode == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead driver's lock: the run resumes at once.
    resumed = run_cli("evolve", str(config), str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert evo.open_run(run_dir).state == "done"


# --- a hanging in-process evaluator --------------------------------------------------------------


def test_in_process_evaluator_timeout_kills_and_restarts_its_worker(family, tmp_path):
    base, pool = family
    config = topk_config(base, pool, {"python": "test_faults_run:hang_on_merges", "timeout": 1.5}, max_failures=10)
    config["topk"] = {"k": 3, "generations": 1, "stop_kinship": None}
    run = evo.evolve(config, tmp_path / "run")
    merged = [c for c in run.candidates if c.recipe is not None]
    assert len(merged) == 3 and all(c.status == "failed" for c in merged)
    assert all((c.error or "").startswith("timeout:") for c in merged), [c.error for c in merged]
    assert all(c.status == "done" for c in run.candidates if c.recipe is None)
    assert run.worker_restarts == 3
    shown = run_cli("runs", "show", str(tmp_path / "run"))
    assert "worker processes restarted: 3" in shown.stdout


# --- live output ---------------------------------------------------------------------------------


def test_live_lines_are_printed_once_in_a_pipe(family, tmp_path):
    base, pool = family
    config = write_config(tmp_path / "run.yml", **topk_config(base, pool, {"command": command_evaluator()}))
    done = run_cli("evolve", str(config), str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("#")]
    assert lines and len(lines) == len(set(lines)), "\n".join(lines)
    # The base and the pool are scored on both splits: each split once, on its own line.
    assert sum(ln.startswith("#1 base") for ln in lines) == 2

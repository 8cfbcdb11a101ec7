"""A run killed with SIGKILL at random moments resumes to exactly the uninterrupted result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from evolve_support import (
    command_evaluator,
    evaluations_after,
    log_length,
    recorded_evaluations,
    runs_json,
    small_family,
    stored_scores,
    write_config,
)

KILLS = 10


def evolve_process(config: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    code = "import modelkin.cli as m; m.main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "evolve", str(config), str(run_dir), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )


def comparable(run_dir: Path) -> tuple[object, list[tuple[object, ...]]]:
    data = runs_json(run_dir)
    rows = [
        (c["id"], c["generation"], c["role"], tuple(c["parents"]), c["status"], repr(c["scores"]), repr(c["kinship"]))
        for c in data["candidates"]
    ]
    return data["best"], rows


def test_sigkill_at_random_points_resumes_to_the_same_run(tmp_path):
    base, pool = small_family(tmp_path / "fam")
    log = tmp_path / "evaluations.log"
    config = {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": {"k": 3, "generations": 4, "explore": "kinship", "stop_kinship": None, "patience": 4},
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        "evaluator": {"command": command_evaluator(f"--sleep 0.25 --log {log}")},
        "keep": "top",
    }
    path = write_config(tmp_path / "evolve.yml", **config)
    reference_config = write_config(
        tmp_path / "reference.yml", **{**config, "evaluator": {"command": command_evaluator("--sleep 0.25")}}
    )
    reference = evolve_process(reference_config, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read() if reference.stderr else ""

    # Kill points spread over the whole run: each kill waits until the store holds a target number
    # of scores (ten distinct targets, drawn at random), then lands a random few milliseconds later,
    # inside an evaluation, a merge, a kinship pass or a store write.
    rng = random.Random(1234)
    total = stored_scores(tmp_path / "reference")
    targets = sorted(rng.sample(range(1, total), KILLS))
    run_dir = tmp_path / "killed"
    moments: list[int] = []
    snapshots: list[tuple[set[tuple[str, str]], int]] = []
    for target in targets:
        proc = evolve_process(path, run_dir)
        while proc.poll() is None and stored_scores(run_dir) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, "the run finished before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        moments.append(stored_scores(run_dir))
        snapshots.append((recorded_evaluations(run_dir), log_length(log)))
    proc = evolve_process(path, run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    assert len(set(moments)) >= KILLS // 2, f"the kills landed at too few distinct moments: {moments}"
    assert comparable(run_dir) == comparable(tmp_path / "reference")
    # Zero recorded evaluations repeated: nothing stored when a kill landed was evaluated again.
    # A kill may lose the evaluation in flight (finished, maybe, but not yet recorded): at most one.
    assert snapshots[-1][0] & set(evaluations_after(log, 0)), "the snapshots name what the log names"
    for recorded, offset in snapshots:
        again = [e for e in evaluations_after(log, offset) if e in recorded]
        assert again == [], again
    ended = Counter(evaluations_after(log, 0))
    assert sum(n - 1 for n in ended.values()) <= KILLS, ended
    assert len(ended) == sum(len(c["scores"]) for c in runs_json(run_dir)["candidates"]), (
        "every stored score comes from an evaluation"
    )

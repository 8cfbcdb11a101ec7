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

from evolve_support import command_evaluator, runs_json, small_family, stored_scores, write_config

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
    for target in targets:
        proc = evolve_process(path, run_dir)
        while proc.poll() is None and stored_scores(run_dir) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, "the run finished before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        moments.append(stored_scores(run_dir))
    proc = evolve_process(path, run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    assert len(set(moments)) >= KILLS // 2, f"the kills landed at too few distinct moments: {moments}"
    assert comparable(run_dir) == comparable(tmp_path / "reference")
    # No evaluation that finished was done again. (Each kill lands at most 0.15 s after a stored
    # score, and an evaluation process takes longer than that, so none is cut between its end and
    # its commit; only evaluations the kills interrupted ran twice, and they never printed "end".)
    ended = Counter(line.split(" ", 1)[1] for line in log.read_text().splitlines() if line.startswith("end "))
    assert [k for k, n in ended.items() if n > 1] == []
    assert len(ended) == sum(len(c["scores"]) for c in runs_json(run_dir)["candidates"]), (
        "every stored score comes from exactly one evaluation"
    )

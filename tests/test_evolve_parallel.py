"""Parallel evaluation: local worker processes and a Ray cluster give the same search as one worker,
a worker killed mid-evaluation has its candidate retried once elsewhere, and a driver killed with
SIGKILL resumes a CMA-ES search without repeating an evaluation."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import modelkin.evolve as evo
from evolve_support import (
    command_evaluator,
    evaluations_after,
    log_length,
    recorded_evaluations,
    runs_json,
    search_config,
    small_family,
    stored_scores,
    write_config,
)

TESTS = Path(__file__).resolve().parent


def outcome(run: evo.Run) -> list[tuple[Any, ...]]:
    return [(c.id, c.key, c.status, c.genes, json.dumps(c.scores, sort_keys=True)) for c in run.candidates] + [
        ("best", run.best_id)
    ]


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return small_family(tmp_path / "fam", n=3)


@pytest.fixture
def mortal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EVOLVE_TEST_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    return tmp_path


def test_two_local_workers_give_the_same_search(family, tmp_path):
    base, pool = family
    config = search_config(base, pool, {"python": "evolve_support:hashed_scores"}, seed=5)
    one = evo.evolve(config, tmp_path / "one")
    two = evo.evolve(config, tmp_path / "two", workers=2)
    assert outcome(one) == outcome(two)
    # topk too: a generation's merges run concurrently, its decisions wait for all of them
    topk = {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "topk": {"k": 3, "generations": 3, "stop_kinship": None},
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        "evaluator": {"command": command_evaluator()},
    }
    assert outcome(evo.evolve(topk, tmp_path / "t1")) == outcome(evo.evolve(topk, tmp_path / "t2", workers=2))


def test_local_worker_killed_mid_evaluation_is_retried_once(family, tmp_path, mortal, monkeypatch):
    base, pool = family
    config = search_config(base, pool, {"python": "evolve_support:mortal_scores"}, seed=5)
    reference = evo.evolve(config, tmp_path / "reference")
    searched = [c for c in reference.candidates if c.role == "search"]
    victims = [f"c{searched[1].id}", f"c{searched[4].id}"]
    monkeypatch.setenv("EVOLVE_TEST_DIE", ",".join(victims))
    run = evo.evolve(config, tmp_path / "killed", workers=2)
    assert sorted(p.name for p in mortal.glob("died-*")) == sorted(f"died-{v}-search" for v in victims)
    assert outcome(run) == outcome(reference)  # the retried candidates scored as if nothing happened
    # A job whose worker dies on every attempt is the machine's fault, not the candidate's: the run
    # stops with the candidate pending and the fault recorded; mended, it resumes to the same run.
    monkeypatch.setenv("EVOLVE_TEST_DIE_ALWAYS", "1")
    with pytest.raises(evo.MachineFault, match="worker process lost 3 times"):
        evo.evolve(config, tmp_path / "lost", workers=2)
    stopped = evo.open_run(tmp_path / "lost")
    assert not [c for c in stopped.candidates if c.status == "failed"]
    assert stopped.faults and all(f"c{f[1]}" in victims for f in stopped.faults)
    assert all(stopped.candidate(f[1]).status == "pending" for f in stopped.faults)  # type: ignore[arg-type]
    assert stopped.worker_restarts >= 3
    monkeypatch.delenv("EVOLVE_TEST_DIE_ALWAYS")
    monkeypatch.delenv("EVOLVE_TEST_DIE")
    assert outcome(evo.evolve(config, tmp_path / "lost", workers=2)) == outcome(reference)


@pytest.fixture
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real Ray head on 127.0.0.1 with two CPUs, started and stopped by the test."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'modelkin[ray]')")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed beside this Python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        "EVOLVE_TEST_DIR": str(temp),
        "RAY_AUTH_MODE": "disabled",
    }
    start = subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    if start.returncode != 0:
        pytest.fail(f"ray start failed: {start.stderr[-2000:]}")
    yield f"127.0.0.1:{port}", temp
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_ray_cluster_search_with_a_worker_killed(family, tmp_path, ray_cluster, monkeypatch):
    base, pool = family
    address, marker_dir = ray_cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("EVOLVE_TEST_DIR", str(marker_dir))
    config = search_config(base, pool, {"python": "evolve_support:mortal_scores"}, seed=5)
    reference = evo.evolve(config, tmp_path / "reference")
    searched = [c for c in reference.candidates if c.role == "search"]
    victim = f"c{searched[2].id}"
    # The cluster's workers were started before the victim was chosen: it reaches them in a file.
    (marker_dir / "victims").write_text(victim)
    run = evo.evolve(config, tmp_path / "ray", ray=address)
    assert outcome(run) == outcome(reference)
    assert (marker_dir / f"died-{victim}-search").exists(), "the victim's worker was killed once"


@pytest.mark.parametrize("workers", [1, 2])
def test_search_driver_killed_resumes_without_repeating(family, tmp_path, workers):
    base, pool = family
    log = tmp_path / "log"
    config = search_config(
        base, pool, {"command": command_evaluator(f"--sleep 0.25 --log {log}")}, max_evals=30, seed=5
    )
    path = write_config(tmp_path / "s.yml", **config)
    reference_path = write_config(
        tmp_path / "r.yml", **{**config, "evaluator": {"command": command_evaluator("--sleep 0.25")}}
    )

    def driver(config_path: Path, run_dir: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import modelkin.cli as m; m.main()",
                "evolve",
                str(config_path),
                str(run_dir),
                "--workers",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    assert driver(reference_path, tmp_path / "reference").wait(timeout=300) == 0
    total = stored_scores(tmp_path / "reference")
    rng = random.Random(7)
    kills = 6
    snapshots: list[tuple[set[tuple[str, str]], int]] = []
    for target in sorted(rng.sample(range(1, total), kills)):
        proc = driver(path, tmp_path / "run")
        while proc.poll() is None and stored_scores(tmp_path / "run") < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # orphaned workers notice and stop (or finish what nobody will record)
        snapshots.append((recorded_evaluations(tmp_path / "run"), log_length(log)))
    # The driver's workers die with it (their pipe closes); none keeps evaluating.
    proc = driver(path, tmp_path / "run")
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""

    def comparable(run_dir: Path) -> list[tuple[Any, ...]]:
        data = runs_json(run_dir)
        return [(c["id"], c["status"], json.dumps(c["scores"], sort_keys=True)) for c in data["candidates"]] + [
            ("best", data["best"])
        ]

    assert comparable(tmp_path / "run") == comparable(tmp_path / "reference")
    # Zero recorded evaluations repeated: nothing stored when a kill landed was evaluated again.
    # What a kill loses is the evaluation in flight on each worker (finished, maybe, but not yet
    # recorded), at most one per worker per kill.
    assert snapshots[-1][0] & set(evaluations_after(log, 0)), "the snapshots name what the log names"
    for recorded, offset in snapshots:
        again = [e for e in evaluations_after(log, offset) if e in recorded]
        assert again == [], again
    ended = Counter(evaluations_after(log, 0))
    repeated = sum(n - 1 for n in ended.values())
    assert repeated <= kills * workers, ended

"""Faults a user meets, met by real processes: a merge stopped by SIGINT, SIGTERM or SIGHUP cleans up
and exits 128 + the signal's number; one killed outright (SIGKILL) leaves its temporary directory,
which the next merge into the same place removes and reports; outputs follow the umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

import modelkin
import modelkin.evolve as evo
from evolve_support import small_family
from modelkin.example import write_example_family
from modelkin.io.safetensors import save_model
from modelkin.io.staging import host_name
from modelkin.testing import run_cli

CLI = "import importlib; importlib.import_module('modelkin.cli').main()"


@pytest.fixture(scope="module")
def slow_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merge that takes seconds on one thread while reading only ~40 MB: karcher in bfloat16
    iterates over every tensor until it converges (about 3.5 s on one core of the test machine,
    the first shard written after 2.5 s)."""
    root = tmp_path_factory.mktemp("slow")
    rng = np.random.default_rng(0)
    rows, hidden = 8192, 256
    shapes = {
        "model.embed_tokens.weight": (rows, hidden),
        "model.layers.0.mlp.up_proj.weight": (rows, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (rows, hidden),
    }
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
    base = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
    save_model(root / "base", base, "F32", config=config)
    for i in range(2):
        tuned = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
        save_model(root / f"ft{i}", tuned, "F32", config=config)
    recipe = {
        "merge_method": "karcher",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "ft0")}, {"model": str(root / "ft1")}],
        "dtype": "bfloat16",
    }
    path = root / "karcher.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.modelkin-*"))


def start_merge(recipe: Path, out: Path) -> subprocess.Popen[str]:
    # SIGHUP at its default, as a terminal's child has it: under nohup the merge would rightly
    # ignore the hangup and run on.
    return subprocess.Popen(
        [sys.executable, "-c", CLI, "merge", str(recipe), str(out), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )


def wait_mid_merge(proc: subprocess.Popen[str], out: Path) -> Path:
    """Waits until the engine is at work: the staging directory is there (the engine starts
    within milliseconds of making it), and a moment more. The merge goes on for seconds after."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the merge ended before it could be stopped: {proc.communicate()}"
        found = temporaries(out)
        if found:
            time.sleep(0.3)
            assert proc.poll() is None, f"the merge ended before it could be stopped: {proc.communicate()}"
            return found[0]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the merge never started writing")


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_signal_mid_merge_cleans_up(slow_recipe: Path, tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "merged"
    proc = start_merge(slow_recipe, out)
    staging = wait_mid_merge(proc, out)
    # The directory names its writer: this host and the merge's pid.
    assert staging.name.startswith(f".merged.modelkin-{host_name()}-{proc.pid}-")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted")
    assert temporaries(out) == []
    assert not out.exists()


def test_sigkill_leaves_staging_that_the_next_merge_removes(slow_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    proc = start_merge(slow_recipe, out)
    staging = wait_mid_merge(proc, out)
    proc.kill()
    proc.wait()
    assert temporaries(out) == [staging] and not out.exists()
    # The next merge into the same place (a quick recipe: any writer of OUT cleans up after a dead one).
    quick = yaml.safe_load(slow_recipe.read_text())
    quick["merge_method"] = "linear"
    quick["models"] = [{**m, "parameters": {"weight": 0.5}} for m in quick["models"]]
    recipe = tmp_path / "linear.yml"
    recipe.write_text(yaml.safe_dump(quick))
    done = run_cli("merge", str(recipe), str(out))
    assert done.returncode == 0, done.stderr
    said = f"removed stale temporary directory {staging} left by pid {proc.pid} on {host_name()}"
    assert said in done.stderr.splitlines()
    assert temporaries(out) == []
    assert (out / "model.safetensors").is_file()


def test_only_dead_writers_temporaries_are_removed(tmp_path: Path) -> None:
    family = write_example_family(tmp_path / "family")
    recipe = tmp_path / "linear.yml"
    recipe.write_text(yaml.safe_dump(_linear(family)))
    out = tmp_path / "merged"
    host = host_name()
    dead = _dead_pid()
    hour_ago = time.time() - 2 * 3600
    leftovers = {
        f".merged.modelkin-{host}-{dead}-0123abcd": True,  # this host, its pid gone
        f".merged.modelkin-{host}-{dead}-old-0123abcd": True,  # an output set aside, writer gone
        f".merged.modelkin-{host}-{os.getpid()}-0123abcd": False,  # a live writer (this test)
        f".merged.modelkin-not-{host}-{dead}-0123abcd": False,  # another host: cannot be checked
        ".merged.modelkin-ab_cd123": True,  # an earlier modelkin's, untouched for two hours
        ".merged.modelkin-old-12345": True,
        ".merged.modelkin-efgh5678": False,  # an earlier modelkin's, touched just now
        ".other.modelkin-ab_cd123": False,  # another output's
    }
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        if "ab_cd123" in name or "old-12345" in name:
            for path in (tmp_path / name / "model.safetensors", tmp_path / name):
                os.utime(path, (hour_ago, hour_ago))
    done = run_cli("merge", str(recipe), str(out))
    assert done.returncode == 0, done.stderr
    removed = [line for line in done.stderr.splitlines() if line.startswith("removed stale temporary directory")]
    assert len(removed) == sum(leftovers.values()), done.stderr
    for name, stale in leftovers.items():
        assert (tmp_path / name).exists() != stale, name
    assert any(line.endswith(f"left by pid {dead} on {host}") for line in removed)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> tuple[set[int], set[int]]:
    """The permission bits of the directories (root included) and of the files under root."""
    dirs, files = {stat.S_IMODE(root.stat().st_mode)}, set[int]()
    for path in root.rglob("*"):
        (dirs if path.is_dir() else files).add(stat.S_IMODE(path.stat().st_mode))
    return dirs, files


EXPECTED = {0o022: ({0o755}, {0o644}), 0o077: ({0o700}, {0o600})}


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_merge_output_follows_umask(tmp_path: Path, mask: int) -> None:
    family = write_example_family(tmp_path / "family")
    # Tokenizer files are copied from a parent, whatever their own mode.
    for model in family.values():
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (model / name).write_text("{}")
            (model / name).chmod(0o444)
    recipe = tmp_path / "linear.yml"
    recipe.write_text(yaml.safe_dump({**_linear(family), "chat_template": "chatml"}))
    out = tmp_path / "deep" / "merged"
    with umask(mask):
        done = run_cli("merge", str(recipe), str(out), "--out-shard-size", "200KB")
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "modelkin.json", "README.md"} <= names
    assert {"mergekit_config.yml", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"} <= names
    assert sum(name.endswith(".safetensors") for name in names) > 1
    assert modes(out) == EXPECTED[mask]
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) in EXPECTED[mask][0]  # the parent made for OUT


def test_runs_best_and_candidates_follow_umask(tmp_path: Path) -> None:
    base, pool = small_family(tmp_path / "family", n=2)
    config = {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": {"k": 2, "generations": 1, "explore": "none", "patience": 1},
        "merge": {"merge_method": "linear", "dtype": "float32"},
        "evaluator": {"python": "evolve_support:hashed_scores"},
    }
    run_dir = tmp_path / "run"
    with umask(0o077):
        run = evo.evolve(config, run_dir)
    merged = [Path(c.path) for c in run.candidates if c.recipe is not None and c.path]
    assert merged
    for path in merged:
        assert modes(path) == EXPECTED[0o077]
    # The best model is copied as new files: the modes follow the umask of `runs best`.
    for mask in (0o022, 0o077):
        out = tmp_path / f"best-{mask:o}"
        with umask(mask):
            done = run_cli("runs", "best", str(run_dir), str(out))
        assert done.returncode == 0, done.stderr
        assert (out / "modelkin_lineage.json").is_file()
        assert modes(out) == EXPECTED[mask]
        assert temporaries(out) == []


def test_library_calls_leave_signal_handlers_alone(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    family = write_example_family(tmp_path / "family")
    modelkin.merge(_linear(family), tmp_path / "merged")
    assert {s: signal.getsignal(s) for s in before} == before


def _linear(family: dict[str, Path]) -> dict[str, object]:
    return {
        "merge_method": "linear",
        "models": [{"model": str(family[n]), "parameters": {"weight": 0.5}} for n in ("math-a", "code")],
        "base_model": str(family["base"]),
        "dtype": "bfloat16",
    }


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid

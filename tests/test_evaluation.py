"""Evaluation as real runs need it: lm-eval task directories (include_path, --task-search-path), a
true held-out split (test_tasks; a split an evaluator cannot score is absent, never a copy of
search), the metric rule of an lm-eval task entry, lm-eval's noise kept off the terminal, and the
report's polish (one-line soups, the lineage plot's colour bar and title, the matplotlib hint).

lm-eval itself is not needed: a stand-in package written per test (``lm_eval`` with ``tasks`` and
``evaluator`` modules) finds tasks only through its TaskManager's include_path, as the real one
finds custom tasks, and scores the model it is given from its weights. The test with the real
package is skipped where it is not installed."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import modelkin.evolve as evo
from evolve_support import (
    EVAL_SCRIPT,
    command_evaluator,
    hashed_scores,
    one_line_error,
    search_config,
    small_family,
    write_config,
)
from modelkin.evolve.config import load_evolve_config, with_task_search_path
from modelkin.evolve.evaluator_registry import make_evaluator, unscored_splits
from modelkin.evolve.evaluators import NO_SPLIT_PLACEHOLDER, NO_TEST_TASKS, ObjectiveError, SplitNotScored
from modelkin.evolve.lmeval import lm_eval_evaluator, pick_metric
from modelkin.io.errors import RecipeError
from modelkin.testing import run_cli

HERE = Path(__file__).resolve().parent

# The stand-in lm_eval package. Its TaskManager indexes `task: NAME` lines of the *.yaml files
# under include_path (lm-eval's own discovery, reduced); simple_evaluate refuses a task the manager
# does not know (with no manager, none: custom tasks need include_path, as in lm-eval), prints
# what the real one prints to a terminal (a warning on its logger, the git probe's complaint), and
# reports exact_match (and its stderr and alias) from the model's weights: tasks named *_test
# score the model's test split, so a held-out column differs from search.
FAKE_INIT = """
from .evaluator import simple_evaluate
"""
FAKE_TASKS = """
import json, os
from pathlib import Path


class TaskManager:
    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        paths = include_path if isinstance(include_path, list) else [include_path] if include_path else []
        self.include_path = [str(p) for p in paths]
        self.metadata = metadata
        self.tasks = {}
        for root in paths:
            for yaml_file in sorted(Path(root).glob("**/*.yaml")):
                for line in yaml_file.read_text().splitlines():
                    if line.startswith("task:"):
                        self.tasks[line.split(":", 1)[1].strip()] = str(yaml_file)
"""
FAKE_EVALUATOR = """
import json, logging, os, sys

from evolve_support import hashed_scores

logger = logging.getLogger("lm_eval.evaluator")


def get_git_commit_hash():
    print("fatal: not a git repository (or any of the parent directories): .git", file=sys.stderr)
    return None


def simple_evaluate(model, model_args=None, tasks=None, limit=None, num_fewshot=None, batch_size=None,
                    device=None, task_manager=None, verbosity=None, **kwargs):
    logger.warning("NOISE: lm-eval talks on its logger")
    get_git_commit_hash()
    known = task_manager.tasks if task_manager is not None else {}
    log = os.environ.get("FAKE_LM_EVAL_LOG")
    args = dict(a.split("=", 1) for a in model_args.split(","))
    if log:
        with open(log, "a") as f:
            record = {
                "tasks": tasks, "model": args["pretrained"], "verbosity": verbosity,
                "include_path": None if task_manager is None else task_manager.include_path,
                "metadata": None if task_manager is None else task_manager.metadata,
            }
            f.write(json.dumps(record) + "\\n")
    results = {}
    for name in tasks:
        if name not in known:
            raise KeyError(f"Spec '{name}' is not a registered task")
        scores = hashed_scores(args["pretrained"], "test" if name.endswith("_test") else "search")
        value = scores["alpha"] if "alpha" in name else scores["beta"]
        results[name] = {"alias": name, "exact_match,none": value, "exact_match_stderr,none": 0.01}
        if name.startswith("two_metrics"):
            results[name]["acc,none"] = value
    return {"results": results, "git_hash": None}
"""


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return small_family(tmp_path / "fam", n=3)


@pytest.fixture
def fake_lm_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Writes the stand-in package, makes it importable here and in subprocesses, and returns the
    log its simple_evaluate appends one JSON line per call to (the stand-in is forgotten after)."""
    package = tmp_path / "fakes" / "lm_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_INIT)
    (package / "tasks.py").write_text(FAKE_TASKS)
    (package / "evaluator.py").write_text(FAKE_EVALUATOR)
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(package.parent))
    log = tmp_path / "lm_eval_calls.jsonl"
    monkeypatch.setenv("FAKE_LM_EVAL_LOG", str(log))
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package.parent), str(HERE), *inherited]))
    monkeypatch.delenv("LMEVAL_LOG_LEVEL", raising=False)
    yield log
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        del sys.modules[name]


def task_dir(root: Path, *names: str) -> Path:
    """A directory of lm-eval task YAMLs, one per name."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.yaml").write_text(f"task: {name}\noutput_type: generate_until\n")
    return root


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def topk(base: Path, pool: list[Path], evaluator: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "pool": [str(p) for p in pool],
        "base_model": str(base),
        "strategy": "topk",
        "topk": {"k": 2, "generations": 2, "stop_kinship": None},
        "merge": {"merge_method": "slerp", "parameters": {"t": 0.5}, "dtype": "float32"},
        **({"evaluator": evaluator} if evaluator is not None else {}),
        **extra,
    }


def flat(text: str) -> str:
    """Text with its whitespace runs made single spaces (rich wraps long lines)."""
    return " ".join(text.split())


def squeeze(text: str) -> str:
    return "".join(text.split())


# --- config -------------------------------------------------------------------------------------
LM = {"pool": ["a", "b"], "base_model": "z"}


def test_include_path_resolves_from_the_config_directory(tmp_path):
    tasks = task_dir(tmp_path / "cfg" / "eval_tasks", "alpha_search")
    other = task_dir(tmp_path / "more", "beta_search")
    path = tmp_path / "cfg" / "evolve.yml"
    path.write_text(
        "pool: [a, b]\nbase_model: z\nevaluator:\n  lm_eval:\n    tasks: [alpha_search]\n"
        f"    include_path: [eval_tasks, {other}]\n"
    )
    config = load_evolve_config(path)
    assert config.evaluator.lm_eval["include_path"] == [str(tasks.resolve()), str(other.resolve())]
    # One directory (a string) is a list of one; mergekit-evolve's top-level form takes it too.
    path.write_text("pool: [a, b]\nbase_model: z\ntasks: [alpha_search]\ninclude_path: eval_tasks\n")
    assert load_evolve_config(path).evaluator.lm_eval["include_path"] == [str(tasks.resolve())]


@pytest.mark.parametrize(
    ("lm_eval", "message"),
    [
        (
            {"tasks": ["x"], "include_path": 3},
            "evaluator.lm_eval.include_path (line {}): must be a directory of lm-eval",
        ),
        ({"tasks": ["x"], "include_path": []}, "evaluator.lm_eval.include_path (line {}): must be a directory"),
        ({"tasks": ["x"], "include_path": "nowhere"}, "evaluator.lm_eval.include_path (line {}): nowhere is not a dir"),
        ({"tasks": ["x"], "test_tasks": "y"}, "evaluator.lm_eval.test_tasks (line {}): a non-empty list of tasks"),
        ({"tasks": ["x"], "test_tasks": [{"weight": 1}]}, "test_tasks[0] (line {}): each task needs a name"),
        (
            {"tasks": ["x"], "test_tasks": [{"name": "y", "split": "test"}]},
            "test_tasks[0].split (line {}): unknown key",
        ),
        ({"tasks": ["x"], "test_tasks": [{"name": "y", "weight": "high"}]}, "weight (line {}): must be a number"),
        ({"tasks": ["x"], "test_tasks": [{"name": "y", "metric": 1}]}, "metric (line {}): must be a metric name"),
        ({"tasks": ["x"], "test_tasks": ["y", "y"]}, "test_tasks[1] (line {}): task 'y' is listed twice"),
        ({"tasks": [{"name": "x", "weight": 0}]}, "evaluator.lm_eval.tasks (line {}): every task's weight is zero"),
    ],
)
def test_lm_eval_settings_are_checked_by_key_and_line(tmp_path, lm_eval, message):
    path = write_config(tmp_path / "evolve.yml", **LM, evaluator={"lm_eval": lm_eval})
    with pytest.raises(RecipeError) as error:
        load_evolve_config(path)
    text = str(error.value)
    key, rest = message.split(" (line {}): ")
    assert re.search(re.escape(key) + r" \(line \d+\): " + re.escape(rest), text) and "\n" not in text, text


def test_a_bad_include_path_names_its_line(tmp_path):
    path = tmp_path / "evolve.yml"
    path.write_text("pool: [a, b]\nbase_model: z\ntasks: [x]\ninclude_path:\n  - ./eval_tasks\n")
    with pytest.raises(RecipeError) as error:
        load_evolve_config(path)
    assert str(error.value) == (
        f"{path}: include_path (line 5): ./eval_tasks is not a directory (resolved: {tmp_path / 'eval_tasks'})"
    )


def test_test_tasks_weigh_the_test_split():
    settings = {"tasks": [{"name": "a", "weight": 2}, "b"], "test_tasks": ["a_test", {"name": "b_test", "weight": 3}]}
    config = load_evolve_config({**LM, "evaluator": {"lm_eval": settings}})
    assert config.split_weights("search") == {"a": 2.0, "b": 1.0}
    assert config.split_weights("test") == {"a_test": 1.0, "b_test": 3.0}
    # Without weights in the entries, each split's objective is its plain mean.
    plain = load_evolve_config({**LM, "evaluator": {"lm_eval": {"tasks": ["a"], "test_tasks": ["a_test"]}}})
    assert plain.split_weights("search") is None and plain.split_weights("test") is None
    # objective.weights applies to both splits: test_tasks must list what it weighs.
    both = {"tasks": ["a"], "test_tasks": ["a", "b"]}
    config = load_evolve_config({**LM, "evaluator": {"lm_eval": both}, "objective": {"weights": {"a": 1.0}}})
    assert config.split_weights("test") == config.split_weights("search") == {"a": 1.0}
    with pytest.raises(RecipeError, match="weighs task 'a', which test_tasks does not list"):
        load_evolve_config(
            {
                **LM,
                "evaluator": {"lm_eval": {"tasks": ["a"], "test_tasks": ["a_test"]}},
                "objective": {"weights": {"a": 1}},
            }
        )
    # Other evaluators score the same tasks on both splits.
    command = load_evolve_config(
        {**LM, "evaluator": {"command": "e {model} {split}"}, "objective": {"weights": {"x": 1}}}
    )
    assert command.split_weights("test") == {"x": 1.0}


def test_top_level_lm_eval_keys_need_tasks(tmp_path):
    path = write_config(tmp_path / "evolve.yml", **LM, evaluator={"command": "e {model}"}, test_tasks=["y"])
    with pytest.raises(RecipeError, match=r"test_tasks \(line \d+\): test_tasks: configures lm-eval tasks"):
        load_evolve_config(path)


def test_task_search_path_adds_to_include_path(tmp_path, monkeypatch):
    first = task_dir(tmp_path / "cfg" / "eval_tasks", "a")
    second = task_dir(tmp_path / "cwd" / "more_tasks", "b")
    path = write_config(
        tmp_path / "cfg" / "evolve.yml",
        **LM,
        evaluator={"lm_eval": {"tasks": ["a", "b"], "include_path": "eval_tasks"}},
    )
    config = load_evolve_config(path)
    monkeypatch.chdir(tmp_path / "cwd")  # a command-line path reads from the working directory
    added = with_task_search_path(config, ["more_tasks", str(first)])
    assert added.evaluator.lm_eval["include_path"] == [str(first.resolve()), str(second.resolve())]
    assert added.fingerprint != config.fingerprint  # which tasks resolve is part of the experiment
    assert with_task_search_path(config, []) is config
    with pytest.raises(RecipeError, match="--task-search-path: missing is not a directory"):
        with_task_search_path(config, ["missing"])
    command = load_evolve_config({**LM, "evaluator": {"command": "e {model} {split}"}})
    with pytest.raises(RecipeError, match=r"lm-eval task directories are for the lm_eval evaluator.*command evaluator"):
        with_task_search_path(command, [str(first)])


def test_task_search_path_is_refused_without_lm_eval(family, tmp_path):
    base, pool = family
    task_dir(tmp_path / "eval_tasks", "alpha_search")
    path = write_config(tmp_path / "run.yml", **topk(base, pool, {"command": command_evaluator()}))
    done = run_cli("evolve", str(path), str(tmp_path / "run"), "--task-search-path", str(tmp_path / "eval_tasks"))
    one_line_error(done, "--task-search-path", "lm_eval evaluator", "command evaluator")
    assert not (tmp_path / "run").exists()
    # The Python API's evaluator callable replaces the configured one: no task directories for it.
    with pytest.raises(evo.RunError, match="task_search_path is for the lm_eval evaluator"):
        evo.evolve(
            topk(base, pool, {"command": command_evaluator()}),
            tmp_path / "r2",
            evaluator=hashed_scores,
            task_search_path=[tmp_path],
        )


# --- the metric of a task entry -----------------------------------------------------------------
def test_metric_is_the_entry_s_else_the_only_one_reported():
    one = {"alias": "gen", "exact_match,none": 0.4, "exact_match_stderr,none": 0.02}
    assert pick_metric("gen", one, None) == "exact_match,none"
    assert pick_metric("gen", one, "exact_match,none") == "exact_match,none"
    assert pick_metric("gen", one, "exact_match") == "exact_match,none"  # the filter is implied when one is
    two = {"alias": "mc", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.1}
    assert pick_metric("mc", two, "acc_norm,none") == "acc_norm,none"
    with pytest.raises(ObjectiveError) as error:
        pick_metric("mc", two, None)
    assert str(error.value) == (
        "lm_eval task 'mc' reports 2 metrics (acc,none, acc_norm,none): name one with metric: in its tasks entry"
    )
    with pytest.raises(ObjectiveError, match=r"no 'f1,none' for task 'mc' \(it reports: acc,none, acc_norm,none\)"):
        pick_metric("mc", two, "f1,none")
    filters = {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}
    with pytest.raises(ObjectiveError, match="no 'exact_match' for task 'g'"):
        pick_metric("g", filters, "exact_match")  # two filters: the name alone is ambiguous
    with pytest.raises(ObjectiveError, match="reported no metric for task 'empty'"):
        pick_metric("empty", {"alias": "empty"}, None)


def test_an_ambiguous_metric_stops_the_run_at_the_first_evaluation(family, tmp_path, fake_lm_eval):
    base, pool = family
    tasks = task_dir(tmp_path / "eval_tasks", "two_metrics_alpha")
    config = topk(
        base, pool, {"resident": False, "lm_eval": {"tasks": ["two_metrics_alpha"], "include_path": str(tasks)}}
    )
    done = run_cli("evolve", str(write_config(tmp_path / "run.yml", **config)), str(tmp_path / "run"))
    one_line_error(done, "'two_metrics_alpha' reports 2 metrics (exact_match,none, acc,none)", "metric:")
    assert len(calls(fake_lm_eval)) == 1  # the base, once: no candidate after it was tried
    run = evo.open_run(tmp_path / "run")
    assert run.base.status == "pending" and run.base.error is None  # the config's fault, not the base's


# --- lm-eval with custom tasks and a held-out split ----------------------------------------------
def test_custom_tasks_and_test_tasks_through_the_cli(family, tmp_path, fake_lm_eval):
    """mergekit-evolve's command line with modelkin evolve: a task directory given by
    --task-search-path (relative to the working directory), tasks scoring search and test_tasks
    scoring test, each task's only metric as its score."""
    base, pool = family
    cwd = tmp_path / "work"
    task_dir(cwd / "eval_tasks", "alpha_search", "beta_search", "alpha_test", "beta_test")
    lm = {"tasks": ["alpha_search", {"name": "beta_search", "weight": 3}], "test_tasks": ["alpha_test", "beta_test"]}
    path = write_config(cwd / "evolve.yml", **topk(base, pool, {"resident": False, "lm_eval": lm}))
    done = subprocess.run(
        [sys.executable, "-m", "modelkin", "evolve", "evolve.yml", "runs/exp1", "--task-search-path", "./eval_tasks"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # lm-eval's own noise stays off the terminal: its logger and its git probe.
    assert "NOISE" not in done.stderr and "fatal: not a git repository" not in done.stderr, done.stderr
    seen = calls(fake_lm_eval)
    assert {tuple(c["include_path"]) for c in seen} == {(str((cwd / "eval_tasks").resolve()),)}
    assert all(c["metadata"]["pretrained"] == c["model"] for c in seen)  # as simple_evaluate's own manager
    assert all(c["verbosity"] == "ERROR" for c in seen)
    run = evo.open_run(cwd / "runs" / "exp1")
    assert path.exists() and run.best is not None
    for c in run.candidates:
        assert c.status == "done"
        search = hashed_scores(c.path, "search")  # type: ignore[arg-type]
        assert c.scores["search"] == {"alpha_search": search["alpha"], "beta_search": search["beta"]}
        assert c.objective_search == pytest.approx((search["alpha"] + 3 * search["beta"]) / 4)
        if "test" in c.scores:
            test = hashed_scores(c.path, "test")  # type: ignore[arg-type]
            assert c.scores["test"] == {"alpha_test": test["alpha"], "beta_test": test["beta"]}
            assert c.objective_test == pytest.approx((test["alpha"] + test["beta"]) / 2)  # test_tasks: no weights
            assert c.objective_test != c.objective_search
    assert run.best.objective_test is not None and run.not_scored() == {}
    test_calls = [c for c in seen if c["tasks"] == ["alpha_test", "beta_test"]]
    assert test_calls and all(
        c["tasks"] in (["alpha_search", "beta_search"], ["alpha_test", "beta_test"]) for c in seen
    )


def test_custom_task_without_its_directory_is_not_found(family, tmp_path, fake_lm_eval):
    """Without include_path (or --task-search-path) lm-eval knows only its own tasks."""
    base, pool = family
    config = topk(base, pool, {"resident": False, "lm_eval": {"tasks": ["alpha_search"]}})
    done = run_cli("evolve", str(write_config(tmp_path / "run.yml", **config)), str(tmp_path / "run"))
    one_line_error(done, "base model could not be evaluated", "'alpha_search' is not a registered task")


def test_lm_eval_without_test_tasks_leaves_test_empty(family, tmp_path, fake_lm_eval):
    base, pool = family
    tasks = task_dir(tmp_path / "eval_tasks", "alpha_search")
    config = topk(base, pool, {"resident": False, "lm_eval": {"tasks": ["alpha_search"], "include_path": str(tasks)}})
    run = evo.evolve(config, tmp_path / "run")
    assert all(c["tasks"] == ["alpha_search"] for c in calls(fake_lm_eval))  # test was never asked for
    assert_no_test_column(run, NO_TEST_TASKS)
    assert unscored_splits(run_config(config).evaluator) == {"test": NO_TEST_TASKS}
    with pytest.raises(SplitNotScored, match="lm_eval has no test_tasks"):
        lm_eval_evaluator({"tasks": ["alpha_search"]})("/m", "test")


def run_config(config: dict[str, Any]) -> evo.EvolveConfig:
    return load_evolve_config(config)


def test_lm_eval_noise_is_quieted_in_the_evaluator_only(tmp_path, fake_lm_eval, capfd, caplog):
    tasks = task_dir(tmp_path / "eval_tasks", "alpha_search")
    model = small_family(tmp_path / "fam", n=1)[0]
    logging.getLogger("lm_eval").setLevel(logging.NOTSET)
    settings = {"tasks": ["alpha_search"], "include_path": str(tasks)}
    evaluate = make_evaluator(
        load_evolve_config({**LM, "evaluator": {"resident": False, "lm_eval": settings}}).evaluator
    )
    assert logging.getLogger("lm_eval").level == logging.NOTSET  # nothing changes before lm-eval is used
    assert evaluate(str(model), "search") == {"alpha_search": hashed_scores(model, "search")["alpha"]}
    assert "fatal:" not in capfd.readouterr().err  # its git probe
    assert logging.getLogger("lm_eval").level == logging.ERROR
    assert not [r for r in caplog.records if "NOISE" in r.getMessage()]
    # lm-eval's own LMEVAL_LOG_LEVEL still shows its logging when asked for.
    os.environ["LMEVAL_LOG_LEVEL"] = "warning"
    try:
        evaluate(str(model), "search")
    finally:
        del os.environ["LMEVAL_LOG_LEVEL"]
    assert [r for r in caplog.records if "NOISE" in r.getMessage()]


# --- no copied test column, for every evaluator --------------------------------------------------
def assert_no_test_column(run: evo.Run, reason: str) -> None:
    """Every candidate done on search, none with a test score or objective, each recording why;
    runs show --json gives test null; the tables and the card say why."""
    assert run.best is not None
    for c in run.candidates:
        assert c.status == "done", (c.id, c.error)
        assert "test" not in c.scores and c.objective_test is None
        assert c.objective_search is not None
    assert run.not_scored() == {"test": [reason]}
    data = json.loads(json.dumps(run.to_dict()))
    for c in data["candidates"]:
        assert c["objective"]["test"] is None and "test" not in c["scores"]
    assert any(c["not_scored"] == {"test": reason} for c in data["candidates"])
    from modelkin.evolve.cli import best_table
    from modelkin.evolve.report import candidates_table, lineage_card

    for table in (candidates_table(run), best_table(run, run.best)):
        console = Console(width=200, record=True)
        console.print(table)
        # (a caption wider than its table is folded, words split: compared without whitespace)
        assert squeeze(f"test: not scored: {reason}") in squeeze(console.export_text())
    assert f"test: not scored: {reason}." in lineage_card(run, run.best)


def test_command_without_split_scores_search_only(family, tmp_path):
    base, pool = family
    log = tmp_path / "eval.log"
    evaluator = {"command": f"{sys.executable} {EVAL_SCRIPT} {{model}} --log {log}"}
    path = write_config(tmp_path / "run.yml", **topk(base, pool, evaluator))
    done = run_cli("evolve", str(path), str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert f"test: not scored: {NO_SPLIT_PLACEHOLDER}" in flat(done.stdout)  # the best table
    lines = log.read_text().splitlines()
    assert lines and all(line.endswith(" search") for line in lines)  # never run as if it were test
    run = evo.open_run(tmp_path / "run")
    assert_no_test_column(run, NO_SPLIT_PLACEHOLDER)
    shown = run_cli("runs", "show", str(tmp_path / "run"), "--json")
    assert shown.returncode == 0, shown.stderr
    assert all(c["objective"]["test"] is None for c in json.loads(shown.stdout)["candidates"])
    table = run_cli("runs", "show", str(tmp_path / "run"))
    assert f"test: not scored: {NO_SPLIT_PLACEHOLDER}" in flat(table.stdout)
    best = run_cli("runs", "best", str(tmp_path / "run"), str(tmp_path / "best"))
    assert best.returncode == 0, best.stderr
    assert f"test: not scored: {NO_SPLIT_PLACEHOLDER}." in (tmp_path / "best" / "README.md").read_text()
    # With {split}, the same command scores both splits.
    assert unscored_splits(run_config(topk(base, pool, {"command": command_evaluator()})).evaluator) == {}


def search_only(model: str, split: str) -> dict[str, float] | None:
    """A Python evaluator without a test split: it says so by returning None."""
    return hashed_scores(model, split) if split == "search" else None


def search_only_raising(model: str, split: str) -> dict[str, float]:
    if split != "search":
        raise SplitNotScored("the benchmark's test set is private")
    return hashed_scores(model, split)


def test_python_evaluator_returning_none_leaves_test_empty(family, tmp_path):
    base, pool = family
    asked: list[tuple[str, str]] = []

    def counting(model: str, split: str) -> dict[str, float] | None:
        asked.append((model, split))
        return search_only(model, split)

    config = topk(base, pool, {"python": "test_evaluation:search_only"})
    run = evo.evolve(config, tmp_path / "run", evaluator=counting)
    reason = "evaluator test_python_evaluator_returning_none_leaves_test_empty.<locals>.counting has no test split"
    assert_no_test_column(run, reason)
    # Asked once per split; a resumed run asks nothing again (the absence is recorded).
    n = len(asked)
    assert n == len(set(asked)) and any(split == "test" for _, split in asked)
    evo.evolve(config, tmp_path / "run", evaluator=counting)
    assert len(asked) == n
    # Through the config, in worker processes, with the evaluator's own reason.
    config = topk(base, pool, {"python": "test_evaluation:search_only_raising"})
    run = evo.evolve(config, tmp_path / "run2", workers=2)
    assert_no_test_column(run, "the benchmark's test set is private")


def test_python_evaluator_without_search_fails_the_candidate(family, tmp_path):
    base, pool = family
    with pytest.raises(evo.RunError, match="base model could not be evaluated: the search split was not scored"):
        evo.evolve(topk(base, pool, {"python": "x:y"}), tmp_path / "run", evaluator=lambda model, split: None)


def test_search_without_test_split_keeps_its_best_model(family, tmp_path):
    """CMA-ES re-scores its best on test at the end; with no test split the best is still made
    and kept (for runs best), and selection never needed test."""
    base, pool = family
    log = tmp_path / "eval.log"
    evaluator = {"command": f"{sys.executable} {EVAL_SCRIPT} {{model}} --log {log}"}
    run = evo.evolve(search_config(base, pool, evaluator, max_evals=9), tmp_path / "run")
    best = run.best
    assert best is not None and best.path is not None and Path(best.path).is_dir()
    assert best.objective_test is None and best.unscored == {"test": NO_SPLIT_PLACEHOLDER}
    assert hashed_scores(best.path, "search") == best.scores["search"]
    assert all(line.endswith(" search") for line in log.read_text().splitlines())


# --- report polish --------------------------------------------------------------------------------
def test_soup_ingredients_stay_on_one_line(tmp_path):
    base, pool = small_family(tmp_path / "fam", n=4)
    named = []
    for i, model in enumerate(pool):
        target = model.with_name(f"ft-ingredient-{'abcd'[i]}")
        model.rename(target)
        named.append(target)
    config = {
        "pool": [str(p) for p in named],
        "base_model": str(base),
        "strategy": "greedy_soup",
        "merge": {"merge_method": "linear", "dtype": "float32"},
        "evaluator": {"python": "evolve_support:hashed_scores"},
    }
    run = evo.evolve(config, tmp_path / "soup")
    from modelkin.evolve.report import candidates_table

    uniform = next(c for c in run.candidates if c.role == "uniform_soup")
    for width in (80, 120, 200):
        console = Console(width=width, record=True)
        console.print(candidates_table(run))
        lines = console.export_text().splitlines()
        row = [i for i, line in enumerate(lines) if line.startswith(f"│ {uniform.id:>3} ")]
        assert len(row) == 1, lines
        # The row is one line: the next line is the next candidate's (or the table's end).
        following = lines[row[0] + 1]
        assert following.startswith((f"│ {uniform.id + 1:>3}", "└")), lines
        if width == 200:
            assert " + ".join(p.name for p in named) in lines[row[0]]


def test_lineage_plot_has_a_colour_bar_and_its_whole_title(family, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'modelkin[plot]')")
    base, pool = family
    run_dir = tmp_path / ("a-run-directory-with-a-rather-long-name-" * 3).rstrip("-")
    run = evo.evolve(topk(base, pool, {"python": "evolve_support:hashed_scores"}), run_dir)
    from modelkin.evolve.report import plot_tree, tree_figure

    fig = tree_figure(run)
    try:
        colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(colourbars) == 1 and colourbars[0].get_ylabel() == "objective (search split)"
        title = fig.axes[0].title
        assert run_dir.name[:20] in title.get_text().replace("\n", "")
        fig.canvas.draw()
        box, page = title.get_window_extent(), fig.bbox
        assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    plot_tree(run, tmp_path / "tree.png")
    assert (tmp_path / "tree.png").stat().st_size > 1000


@pytest.mark.parametrize("command", [("runs", "show"), ("runs", "tree")])
def test_plots_without_matplotlib_are_one_line(family, tmp_path, command):
    base, pool = family
    run_dir = tmp_path / "run"
    evo.evolve(topk(base, pool, {"python": "evolve_support:hashed_scores"}), run_dir)
    # None in sys.modules makes `import matplotlib` fail as if it were not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None; import importlib; importlib.import_module('modelkin.cli').main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *command, str(run_dir), "--plot", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line_error(done, "--plot needs matplotlib", "pip install 'modelkin[plot]'")
    assert "Traceback" not in done.stderr and not (tmp_path / "p.png").exists()


# --- the real lm-eval -------------------------------------------------------------------------
def real_lm_eval() -> None:
    for module in ("lm_eval", "torch", "transformers", "tokenizers"):
        pytest.importorskip(
            module, reason=f"{module} is not installed (the real lm-eval test: pip install 'modelkin[lmeval]')"
        )


def family_tasks(root: Path) -> tuple[Path, Path, Path]:
    """The bundled task family as lm-eval sees it: the models, a character-level tokenizer of the
    family's tokens, and generate_until task YAMLs (exact_match) over local JSONL data, one per task
    and split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modelkin.evolve.family import write_task_family
    from modelkin.evolve.family.tasks import TOKENS, examples

    write_task_family(root / "fam")
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>").save_pretrained(
        root / "tokenizer"
    )
    tasks = root / "eval_tasks"
    tasks.mkdir()
    for task in ("reverse", "sort"):
        for split in ("search", "test"):
            prompts, answers = examples(task, split)
            data = tasks / f"{task}_{split}.jsonl"
            rows = [
                {"prompt": "".join(TOKENS[i] for i in p), "answer": "".join(TOKENS[i] for i in a)}
                for p, a in zip(prompts, answers, strict=True)
            ]
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tasks / f"fam_{task}_{split}.yaml").write_text(
                textwrap.dedent(
                    f"""\
                    task: fam_{task}_{split}
                    dataset_path: json
                    dataset_kwargs:
                      data_files:
                        test: {data}
                    test_split: test
                    output_type: generate_until
                    doc_to_text: "{{{{prompt}}}}"
                    doc_to_target: "{{{{answer}}}}"
                    target_delimiter: ""
                    generation_kwargs:
                      until: ["\\n"]
                      max_gen_toks: 4
                      do_sample: false
                    metric_list:
                      - metric: exact_match
                        aggregation: mean
                        higher_is_better: true
                    """
                )
            )
    return root / "fam", root / "tokenizer", tasks


def test_real_lm_eval_scores_custom_tasks_on_both_splits(tmp_path, capfd, monkeypatch):
    """With lm-evaluation-harness (and torch, transformers) installed: custom task YAMLs found
    through include_path, tasks scoring search and test_tasks scoring test, each task's only metric
    (exact_match) as its score, and none of lm-eval's chatter on the terminal."""
    real_lm_eval()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LMEVAL_LOG_LEVEL", raising=False)
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's probe would complain here
    family, tokenizer, tasks = family_tasks(tmp_path)
    settings = {
        "tasks": ["fam_reverse_search", "fam_sort_search"],
        "test_tasks": ["fam_reverse_test"],
        "include_path": str(tasks),
        "model_args": f"tokenizer={tokenizer},dtype=float32",
        "limit": 32,
        "batch_size": 32,
        "device": "cpu",
    }
    evaluate = make_evaluator(load_evolve_config({**LM, "evaluator": {"lm_eval": settings}}).evaluator)
    capfd.readouterr()
    search = evaluate(str(family / "ft-reverse"), "search")
    test = evaluate(str(family / "ft-reverse"), "test")
    assert search is not None and set(search) == {"fam_reverse_search", "fam_sort_search"}
    assert test == {"fam_reverse_test": pytest.approx(1.0, abs=0.1)}  # the reverse fine-tune masters reverse
    assert search["fam_reverse_search"] == pytest.approx(1.0, abs=0.1)
    err = capfd.readouterr().err
    assert "fatal:" not in err and "it/s]" not in err and "WARNING" not in err, err

"""Evaluators score a model on a split and return ``{task: score}``: a shell command printing JSON,
a Python callable, or lm-evaluation-harness. Any failure raises :class:`EvaluationError`, which the
driver records as a failed candidate (the run goes on); a config error met while evaluating raises
:class:`ObjectiveError`, which stops the run. A split an evaluator cannot score is absent, never a
copy of another: it raises :class:`SplitNotScored` (or a Python evaluator returns None), and the run
records why instead of a score."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..io.errors import ModelkinError
from .config import EvaluatorSpec, include_paths

Scores = dict[str, float]
# (model path, split) -> {task: score}; None for a split the evaluator cannot score.
EvaluatorFn = Callable[[str, str], Mapping[str, float] | None]
# How much of an evaluator's stderr a failed candidate keeps.
STDERR_TAIL = 2000
# Why a split is absent, for each evaluator that knows it before running (see unscored_splits).
NO_SPLIT_PLACEHOLDER = "the evaluator command has no {split}, so it cannot tell test from search"
NO_TEST_TASKS = "lm_eval has no test_tasks"


class EvaluationError(ModelkinError):
    """One evaluation failed (the candidate fails, not the run)."""


class ObjectiveError(ModelkinError, ValueError):
    """A config error met while evaluating (the objective names a task the evaluator does not
    report, an lm-eval task's metric cannot be told, lm-eval is not installed): the same for every
    candidate, so the run stops at once with this line and the candidate stays pending."""


class SplitNotScored(ModelkinError):
    """The evaluator cannot score this split: the split is left absent (no score, never a copy of
    another split's), the candidate is not failed, and the report shows this reason. A Python
    evaluator may raise it with its own reason, or return None. Only ``test`` may be absent:
    ``search`` drives selection, so a search split not scored fails the candidate."""


def check_scores(raw: Any, where: str) -> Scores:
    """Validates an evaluator's answer: a non-empty mapping of task names to finite numbers."""
    if not isinstance(raw, Mapping) or not raw:
        raise EvaluationError(f"{where}: expected a JSON object of task scores, got {type(raw).__name__}")
    out: Scores = {}
    for task, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvaluationError(f"{where}: score of task {task!r} is not a number: {value!r}")
        if not math.isfinite(value):
            raise EvaluationError(f"{where}: score of task {task!r} is {value}")
        out[str(task)] = float(value)
    return out


def objective(scores: Mapping[str, float], weights: Mapping[str, float] | None) -> float:
    """Σ wᵢ·scoreᵢ / Σ |wᵢ|: the weighted mean of the task scores for positive weights (the plain
    mean without weights); a negative weight makes a lower-is-better task (perplexity) count against,
    as in mergekit-evolve, whose weighted sum ranks candidates the same way."""
    if weights is None:
        return sum(scores.values()) / len(scores)
    missing = [t for t in weights if t not in scores]
    if missing:
        raise ObjectiveError(
            f"objective names task {missing[0]!r}, which the evaluator does not report"
            f" (it reports: {', '.join(sorted(scores))})"
        )
    return sum(w * scores[t] for t, w in weights.items()) / sum(abs(w) for w in weights.values())


def unscored_splits(spec: EvaluatorSpec, override: EvaluatorFn | None = None) -> dict[str, str]:
    """The splits a configured evaluator cannot score, with the reason, known before anything runs
    (so no model is merged for them): a command without {split} runs the same evaluation for both
    splits, and lm_eval has no test tasks without test_tasks. A Python evaluator tells per call."""
    if override is not None:
        return {}
    if spec.kind == "command" and spec.command is not None and "{split}" not in spec.command:
        return {"test": NO_SPLIT_PLACEHOLDER}
    if spec.kind == "lm_eval" and "test_tasks" not in spec.lm_eval:
        return {"test": NO_TEST_TASKS}
    return {}


def command_evaluator(template: str, timeout: float | None) -> EvaluatorFn:
    """Runs ``template`` with {model} and {split} filled in (shell-quoted); stdout must be JSON
    (the whole output, or its last non-empty line, so progress lines above it are allowed). A
    template without {split} scores only the search split."""

    def run(model: str, split: str) -> Scores:
        if split != "search" and "{split}" not in template:
            raise SplitNotScored(NO_SPLIT_PLACEHOLDER)
        line = template.replace("{model}", shlex.quote(model)).replace("{split}", shlex.quote(split))
        try:
            done = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise EvaluationError(f"timeout: evaluator timed out after {error.timeout:g} s: {line}") from error
        if done.returncode != 0:
            tail = done.stderr.strip()[-STDERR_TAIL:]
            raise EvaluationError(f"evaluator exited with status {done.returncode}: {line}\n{tail}".rstrip())
        return check_scores(_parse_json(done.stdout, line), f"evaluator {line}")

    return run


def _parse_json(stdout: str, line: str) -> Any:
    text = stdout.strip()
    candidates = [text, *[ln for ln in reversed(text.splitlines()) if ln.strip()][:1]]
    for chunk in candidates:
        try:
            # NaN and Infinity parse (Python's json allows them) so check_scores can name them.
            return json.loads(chunk)
        except ValueError:
            continue
    shown = text[-200:] if text else "nothing"
    raise EvaluationError(f"evaluator printed no JSON object on stdout ({line}): {shown}")


def python_evaluator(target: str | EvaluatorFn) -> EvaluatorFn:
    """A callable ``(model_path, split) -> {task: score}``, given directly or as 'module:function';
    it returns None (or raises :class:`SplitNotScored`) for a split it cannot score."""
    if callable(target):
        fn: Any = target
        name = getattr(target, "__qualname__", repr(target))
    else:
        module_name, _, attr = target.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ObjectiveError(f"evaluator.python: cannot import {target!r}: {error}") from error
        name = target

    def run(model: str, split: str) -> Scores:
        try:
            raw = fn(model, split)
        except SplitNotScored:
            raise
        except Exception as error:
            raise EvaluationError(f"evaluator {name} raised {type(error).__name__}: {error}") from error
        if raw is None:
            raise SplitNotScored(f"evaluator {name} has no {split} split")
        return check_scores(raw, f"evaluator {name}")

    return run


def lm_eval_evaluator(settings: Mapping[str, Any]) -> EvaluatorFn:
    """lm-evaluation-harness (``lm_eval.simple_evaluate`` on a ``hf`` model): ``tasks`` score the
    search split, ``test_tasks`` the test split (without them, test is not scored); each task
    reports its entry's ``metric``, else its only metric (see :func:`pick_metric`). Task YAMLs of
    ``include_path`` are found through lm-eval's ``TaskManager``. lm_eval is imported only here:
    ``pip install 'modelkin[lmeval]'``."""
    entries = {"search": _entries(settings["tasks"]), "test": _entries(settings.get("test_tasks") or [])}
    include = include_paths(settings)

    def run(model: str, split: str) -> Scores:
        tasks = entries.get(split)
        if not tasks:
            raise SplitNotScored(NO_TEST_TASKS)
        try:
            import lm_eval
        except ImportError as error:
            raise ObjectiveError(
                "the lm_eval evaluator needs lm-evaluation-harness: pip install 'modelkin[lmeval]'"
            ) from error
        simple_evaluate = lm_eval.simple_evaluate
        _quiet_lm_eval(str(settings.get("model", "hf")))
        args = f"pretrained={model}"
        if settings.get("model_args"):
            args += "," + str(settings["model_args"])
        extra = {k: settings[k] for k in ("apply_chat_template", "fewshot_as_multiturn") if k in settings}
        if "verbosity" in inspect.signature(simple_evaluate).parameters:
            # lm-eval before 0.4.8 resets its logger to INFO on every call unless told otherwise.
            extra["verbosity"] = _log_level()
        try:
            if include:
                extra["task_manager"] = _task_manager(include, args)
            results = simple_evaluate(
                model=settings.get("model", "hf"),
                model_args=args,
                tasks=[t["name"] for t in tasks],
                limit=settings.get("limit"),
                num_fewshot=settings.get("num_fewshot"),
                batch_size=settings.get("batch_size", 1),
                device=settings.get("device"),
                **extra,
            )
        except Exception as error:
            raise EvaluationError(f"lm_eval failed on {model}: {type(error).__name__}: {error}") from error
        reported = (results or {}).get("results") or {}
        scores: Scores = {}
        for task in tasks:
            found = reported.get(task["name"])
            if not isinstance(found, Mapping):
                raise EvaluationError(f"lm_eval reported no results for task {task['name']!r}")
            scores[task["name"]] = _number(found[pick_metric(task["name"], found, task.get("metric"))])
        return check_scores(scores, "lm_eval")

    return run


def _entries(tasks: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": t} if isinstance(t, str) else dict(t) for t in tasks]


def _number(value: Any) -> Any:
    """lm-eval's metric values as numbers (numpy scalars included); check_scores refuses the rest."""
    try:
        return float(value) if not isinstance(value, (bool, str)) else value
    except (TypeError, ValueError):
        return value


def pick_metric(task: str, reported: Mapping[str, Any], metric: str | None) -> str:
    """Which of an lm-eval task's results is its score: the entry's ``metric`` (lm-eval's key,
    "name,filter", or a name that exactly one filter reports), else the task's only metric when it
    reports exactly one. lm-eval's metric keys are "name,filter"; keys without a comma (alias, name,
    sample_len) and the ``_stderr`` entries are not metrics. Anything else is a config error that
    lists what the task does report."""
    metrics = [k for k in reported if "," in k and not k.split(",", 1)[0].endswith("_stderr")]
    shown = ", ".join(metrics) if metrics else "no metric"
    if metric is not None:
        if metric in metrics:
            return metric
        named = [k for k in metrics if "," not in metric and k.split(",", 1)[0] == metric]
        if len(named) == 1:
            return named[0]
        raise ObjectiveError(f"lm_eval reported no {metric!r} for task {task!r} (it reports: {shown})")
    if len(metrics) == 1:
        return metrics[0]
    if not metrics:
        raise ObjectiveError(f"lm_eval reported no metric for task {task!r}")
    raise ObjectiveError(
        f"lm_eval task {task!r} reports {len(metrics)} metrics ({shown}): name one with metric: in its tasks entry"
    )


def _task_manager(include: list[str], model_args: str) -> Any:
    """lm-eval's TaskManager over its own tasks and the include_path directories, with the task
    metadata simple_evaluate would give its own (the model arguments), where lm-eval takes it."""
    from lm_eval.tasks import TaskManager

    kwargs: dict[str, Any] = {"include_path": include}
    if "metadata" in inspect.signature(TaskManager).parameters:
        pairs = (a.split("=", 1) for a in model_args.split(",") if "=" in a)
        kwargs["metadata"] = {k.strip(): v.strip() for k, v in pairs}
    return TaskManager(**kwargs)


def _log_level() -> str:
    asked = os.environ.get("LMEVAL_LOG_LEVEL", "").upper()
    return asked if asked and isinstance(logging.getLevelName(asked), int) else "ERROR"


def _no_git_hash() -> None:
    return None


# lm-eval's Hugging Face model names: their module is imported before the first call so that its
# progress bars are quieted from the first evaluation on.
_HF_MODELS = ("hf", "hf-auto", "huggingface")


def _quiet_lm_eval(model: str) -> None:
    """Keeps lm-eval's own chatter off the user's terminal, where the live table is: its loggers at
    ERROR; no ``git describe`` probe (it prints "fatal: not a git repository" outside one, to label
    results this adapter discards; replaced where lm-eval's evaluator looks it up, which differs
    between 0.4 releases); and no progress bars (datasets', transformers' and lm-eval's own, one set
    per evaluation). LMEVAL_LOG_LEVEL, lm-eval's own variable, brings its logging and bars back."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(_log_level())
    for module in ("lm_eval.evaluator", "lm_eval.utils", "lm_eval.loggers.utils"):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, "get_git_commit_hash"):
            setattr(loaded, "get_git_commit_hash", _no_git_hash)  # noqa: B010 (mypy: not a known attribute)
    if os.environ.get("LMEVAL_LOG_LEVEL"):
        return
    switches = [("datasets", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar")]
    if model in _HF_MODELS:
        switches.append(("lm_eval.models.huggingface", ""))
    for module, switch in switches:
        try:
            loaded = importlib.import_module(module)
        except Exception:  # not installed, or another lm-eval layout: those bars stay
            continue
        if switch and callable(getattr(loaded, switch, None)):
            getattr(loaded, switch)()
    # lm-eval's own bars pass disable=False explicitly, which no environment variable overrides: each
    # of its modules that imported tqdm gets a tqdm that is always disabled.
    for name, loaded in list(sys.modules.items()):
        bar = getattr(loaded, "tqdm", None) if name.startswith("lm_eval.") else None
        if isinstance(bar, type) and not getattr(bar, "_modelkin_silent", False):
            setattr(loaded, "tqdm", _silent(bar))  # noqa: B010 (mypy: not a known attribute)


def _silent(bar: type) -> type:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        bar.__init__(self, *args, **kwargs)  # type: ignore[misc]

    return type(bar.__name__, (bar,), {"__init__": __init__, "_modelkin_silent": True})


def make_evaluator(spec: EvaluatorSpec, override: EvaluatorFn | None = None) -> EvaluatorFn:
    """The evaluator a config asks for (or the callable passed to :func:`modelkin.evolve`)."""
    if override is not None:
        return python_evaluator(override)
    if spec.kind == "command":
        assert spec.command is not None
        return command_evaluator(spec.command, spec.timeout)
    if spec.kind == "python":
        assert spec.python is not None
        return python_evaluator(spec.python)
    return lm_eval_evaluator(spec.lm_eval)

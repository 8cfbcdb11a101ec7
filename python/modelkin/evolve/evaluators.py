"""Evaluators score a model on a split and return ``{task: score}``: a shell command printing JSON
and a Python callable here, lm-evaluation-harness in :mod:`.lmeval` (the registry of the three is
:mod:`.evaluator_registry`). A model reaches an evaluator as its directory's path, or, for a
resident evaluator, in memory (a :class:`~modelkin.io.resident.ResidentModel`: the merged
candidate, or a model on disk mapped from its files). Any failure raises :class:`EvaluationError`, which the
driver records as a failed candidate (the run goes on); a config error met while evaluating raises
:class:`ObjectiveError`, which stops the run. A split an evaluator cannot score is absent, never a
copy of another: it raises :class:`SplitNotScored` (or a Python evaluator returns None), and the run
records why instead of a score."""

from __future__ import annotations

import importlib
import json
import math
import shlex
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

from ..io.errors import ModelkinError
from ..io.resident import ResidentModel

Scores = dict[str, float]
# What an evaluator is given: a model directory's path, or the model in memory (resident).
ModelInput = str | ResidentModel
# (model, split) -> {task: score}; None for a split the evaluator cannot score.
EvaluatorFn = Callable[[ModelInput, str], Mapping[str, float] | None]
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


def command_evaluator(template: str, timeout: float | None) -> EvaluatorFn:
    """Runs ``template`` with {model} and {split} filled in (shell-quoted); stdout must be JSON
    (the whole output, or its last non-empty line, so progress lines above it are allowed). A
    template without {split} scores only the search split."""

    def run(model: ModelInput, split: str) -> Scores:
        if not isinstance(model, str):
            raise TypeError("a command evaluator reads a model directory, not a model in memory")
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
    """A callable ``(model, split) -> {task: score}``, given directly or as 'module:function';
    it returns None (or raises :class:`SplitNotScored`) for a split it cannot score. ``model`` is
    the model directory's path, or with ``resident: true`` the model in memory (a
    :class:`~modelkin.io.resident.ResidentModel`: a mapping of tensor names to numpy arrays, with
    ``config``)."""
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

    def run(model: ModelInput, split: str) -> Scores:
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

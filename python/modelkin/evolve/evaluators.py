"""Evaluators score a model on a split and return ``{task: score}``: a shell command printing JSON,
a Python callable, or lm-evaluation-harness. Any failure raises :class:`EvaluationError`, which the
driver records as a failed candidate (the run goes on)."""

from __future__ import annotations

import importlib
import json
import math
import shlex
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

from ..io.errors import ModelkinError
from .config import EvaluatorSpec

Scores = dict[str, float]
EvaluatorFn = Callable[[str, str], Mapping[str, float]]
# How much of an evaluator's stderr a failed candidate keeps.
STDERR_TAIL = 2000


class EvaluationError(ModelkinError):
    """One evaluation failed (the candidate fails, not the run)."""


class ObjectiveError(ModelkinError, ValueError):
    """The objective names a task the evaluator does not report: a config error, so the run stops."""


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
    (the whole output, or its last non-empty line, so progress lines above it are allowed)."""

    def run(model: str, split: str) -> Scores:
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
    """A callable ``(model_path, split) -> {task: score}``, given directly or as 'module:function'."""
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
        except Exception as error:
            raise EvaluationError(f"evaluator {name} raised {type(error).__name__}: {error}") from error
        return check_scores(raw, f"evaluator {name}")

    return run


def lm_eval_evaluator(settings: Mapping[str, Any]) -> EvaluatorFn:
    """lm-evaluation-harness (``lm_eval.simple_evaluate`` on a ``hf`` model); each task reports its
    ``metric`` (default ``acc,none``). lm_eval is imported only here: ``pip install modelkin[lmeval]``."""
    tasks = [{"name": t} if isinstance(t, str) else dict(t) for t in settings["tasks"]]

    def run(model: str, split: str) -> Scores:
        try:
            import lm_eval
        except ImportError as error:
            raise ObjectiveError(
                "the lm_eval evaluator needs lm-evaluation-harness: pip install 'modelkin[lmeval]'"
            ) from error
        args = f"pretrained={model}"
        if settings.get("model_args"):
            args += "," + str(settings["model_args"])
        try:
            results = lm_eval.simple_evaluate(
                model=settings.get("model", "hf"),
                model_args=args,
                tasks=[t["name"] for t in tasks],
                limit=settings.get("limit"),
                num_fewshot=settings.get("num_fewshot"),
                batch_size=settings.get("batch_size", 1),
                device=settings.get("device"),
                **{k: settings[k] for k in ("apply_chat_template", "fewshot_as_multiturn") if k in settings},
            )
        except Exception as error:
            raise EvaluationError(f"lm_eval failed on {model}: {type(error).__name__}: {error}") from error
        scores: Scores = {}
        for task in tasks:
            metric = task.get("metric", "acc,none")
            value = ((results or {}).get("results", {}).get(task["name"]) or {}).get(metric)
            if value is None:
                raise EvaluationError(f"lm_eval reported no {metric!r} for task {task['name']!r}")
            scores[task["name"]] = float(value)
        return check_scores(scores, "lm_eval")

    return run


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

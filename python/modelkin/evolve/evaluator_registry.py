"""The evaluators a config can ask for, by kind: ``command`` and ``python`` (:mod:`.evaluators`) and
``lm_eval`` (:mod:`.lmeval`)."""

from __future__ import annotations

from .evaluator_config import EvaluatorSpec
from .evaluators import (
    NO_SPLIT_PLACEHOLDER,
    NO_TEST_TASKS,
    EvaluatorFn,
    command_evaluator,
    python_evaluator,
)
from .lmeval import lm_eval_evaluator


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
    return lm_eval_evaluator(spec.lm_eval, resident=spec.resident)


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

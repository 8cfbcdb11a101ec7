"""The lm-evaluation-harness evaluator (``lm_eval.simple_evaluate``): ``tasks`` score the search
split, ``test_tasks`` the test split; each task reports its entry's ``metric``, else its only metric
(see :func:`pick_metric`). Task YAMLs of ``include_path`` are found through lm-eval's
``TaskManager``. lm_eval (and torch) are imported only when an evaluation runs:
``pip install 'modelkin[lmeval]'``.

Two ways to run it, with the same scores:

- **resident** (the default with lm-eval's ``hf`` model): one model and one set of task objects per
  worker process (see :mod:`.lmeval_resident`). Candidates arrive in memory and their tensors are
  copied into the model's parameters in place; the requests of each task (prompts are independent
  of the weights) are built once.
- **not resident** (``resident: false``, and any other lm-eval model): ``simple_evaluate`` builds
  the model from the candidate's directory, and the tasks, on every call, as ``lm_eval --model hf
  --model_args pretrained=DIR`` does.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .evaluator_config import HF_MODELS, include_paths
from .evaluators import (
    NO_TEST_TASKS,
    EvaluationError,
    EvaluatorFn,
    ModelInput,
    ObjectiveError,
    Scores,
    SplitNotScored,
    check_scores,
)
from .lmeval_resident import ResidentLM


def lm_eval_evaluator(settings: Mapping[str, Any], *, resident: bool = False) -> EvaluatorFn:
    """lm-evaluation-harness as an evaluator; ``resident`` keeps its model and tasks between
    calls (a model given as a path is then mapped from its files and copied in)."""
    entries = {"search": _entries(settings["tasks"]), "test": _entries(settings.get("test_tasks") or [])}
    include = include_paths(settings)
    kept = None
    if resident:
        kept = ResidentLM(settings, lambda path: model_args(settings, path), lambda args: task_manager(include, args))

    def run(model: ModelInput, split: str) -> Scores:
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
        quiet_lm_eval(str(settings.get("model", "hf")))
        extra = {k: settings[k] for k in ("apply_chat_template", "fewshot_as_multiturn") if k in settings}
        if "verbosity" in inspect.signature(simple_evaluate).parameters:
            # lm-eval before 0.4.8 resets its logger to INFO on every call unless told otherwise.
            extra["verbosity"] = log_level()
        names = [t["name"] for t in tasks]
        label = model if isinstance(model, str) else model.label
        try:
            if kept is not None:
                call: dict[str, Any] = {"model": kept.load(model), "tasks": kept.tasks(split, names)}
                extra["task_manager"] = kept.task_manager
            else:
                if not isinstance(model, str):
                    raise TypeError("lm_eval with resident: false reads a model directory, not a model in memory")
                args = model_args(settings, model)
                call = {"model": settings.get("model", "hf"), "model_args": args, "tasks": names}
                if include:
                    extra["task_manager"] = task_manager(include, args)
            results = simple_evaluate(
                **call,
                limit=settings.get("limit"),
                num_fewshot=settings.get("num_fewshot"),
                batch_size=settings.get("batch_size", 1),
                device=settings.get("device"),
                **extra,
            )
        except (ObjectiveError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise EvaluationError(f"lm_eval failed on {label}: {type(error).__name__}: {error}") from error
        reported = (results or {}).get("results") or {}
        scores: Scores = {}
        for task in tasks:
            found = reported.get(task["name"])
            if not isinstance(found, Mapping):
                raise EvaluationError(f"lm_eval reported no results for task {task['name']!r}")
            scores[task["name"]] = _number(found[pick_metric(task["name"], found, task.get("metric"))])
        return check_scores(scores, "lm_eval")

    return run


def model_args(settings: Mapping[str, Any], path: str) -> str:
    """lm-eval's model argument string for the model directory ``path``."""
    args = f"pretrained={path}"
    if settings.get("model_args"):
        args += "," + str(settings["model_args"])
    return args


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


def task_manager(include: list[str], model_args: str) -> Any:
    """lm-eval's TaskManager over its own tasks and the include_path directories, with the task
    metadata simple_evaluate would give its own (the model arguments), where lm-eval takes it."""
    from lm_eval.tasks import TaskManager

    kwargs: dict[str, Any] = {"include_path": include or None}
    if "metadata" in inspect.signature(TaskManager).parameters:
        pairs = (a.split("=", 1) for a in model_args.split(",") if "=" in a)
        kwargs["metadata"] = {k.strip(): v.strip() for k, v in pairs}
    return TaskManager(**kwargs)


def log_level() -> str:
    asked = os.environ.get("LMEVAL_LOG_LEVEL", "").upper()
    return asked if asked and isinstance(logging.getLevelName(asked), int) else "ERROR"


def _nothing(*_: Any, **__: Any) -> None:
    return None


def quiet_lm_eval(model: str) -> None:
    """Keeps lm-eval's own chatter off the user's terminal, where the live table is: its loggers at
    ERROR; no ``git describe`` probe (it prints "fatal: not a git repository" outside one) and no
    environment survey (``pip list`` and more in subprocesses, 0.35 s a call), both only labelling
    results this adapter discards (replaced where lm-eval's evaluator looks them up, which differs
    between 0.4 releases); and no progress bars (datasets', transformers' and lm-eval's own, one set
    per evaluation). LMEVAL_LOG_LEVEL, lm-eval's own variable, brings its logging and bars back."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(log_level())
    for module in ("lm_eval.evaluator", "lm_eval.utils", "lm_eval.loggers.utils"):
        loaded = sys.modules.get(module)
        for probe in ("get_git_commit_hash", "add_env_info"):
            if loaded is not None and hasattr(loaded, probe):
                setattr(loaded, probe, _nothing)
    if os.environ.get("LMEVAL_LOG_LEVEL"):
        return
    switches = [("datasets", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar")]
    if model in HF_MODELS:
        # Its module is imported before the first call so its bars are quiet from the first on.
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

"""The ``evaluator:`` section of an evolution config (and mergekit-evolve's top-level lm-eval keys):
which evaluator scores candidates, with which lm-eval tasks and splits, and whether candidates reach
it in memory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checker import Checker

# mergekit-evolve's top-level keys besides genome: its lm-eval tasks and how they are run.
MERGEKIT_EVOLVE_KEYS = (
    "tasks",
    "limit",
    "num_fewshot",
    "shuffle",
    "random_init",
    "apply_chat_template",
    "fewshot_as_multiturn",
)
# modelkin's own lm-eval settings, allowed at the top level beside mergekit-evolve's tasks: too.
LM_EVAL_TOP_KEYS = ("test_tasks", "include_path")
# Every key of the lm_eval evaluator's settings (evaluator.lm_eval).
LM_EVAL_KEYS = (
    "tasks",
    "test_tasks",
    "include_path",
    "model",
    "model_args",
    "limit",
    "num_fewshot",
    "batch_size",
    "device",
    "apply_chat_template",
    "fewshot_as_multiturn",
)
# lm-eval's Hugging Face model names (the models whose weights a resident evaluator replaces).
HF_MODELS = ("hf", "hf-auto", "huggingface")


@dataclass(frozen=True)
class EvaluatorSpec:
    """How candidates are scored: exactly one of ``command``, ``python`` or ``lm_eval``."""

    kind: Literal["command", "python", "lm_eval"]
    command: str | None = None
    python: str | None = None
    lm_eval: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    # Candidates handed over in memory (see evaluators.py): lm_eval with its hf model by default,
    # a python callable when asked. How, not what, is scored: not part of the fingerprint.
    resident: bool = False


def include_paths(settings: Mapping[str, Any]) -> list[str]:
    """The lm_eval evaluator's task directories, as a list (its include_path is one or a list)."""
    value = settings.get("include_path")
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def resident_refusal(kind: str, lm_eval: Mapping[str, Any]) -> str | None:
    """Why an evaluator cannot take candidates in memory (None: it can)."""
    if kind == "command":
        return "a command evaluator reads a model directory (python, lm_eval)"
    if kind == "lm_eval" and lm_eval.get("model", "hf") not in HF_MODELS:
        return (
            f"needs lm-eval's hf model, whose weights modelkin can replace in place (model: {lm_eval['model']}"
            " loads its own); set resident: false"
        )
    return None


def parse_evaluator(check: Checker, value: Any, raw: Mapping[str, Any], root: Path) -> EvaluatorSpec:
    # Where the lm-eval settings were written: at the top level (mergekit-evolve) or nested.
    at: list[str | int] = ["evaluator", "lm_eval"]
    if "tasks" in raw:
        if value is not None:
            raise check.fail(["tasks"], "tasks: configure the lm_eval evaluator; give either tasks: or evaluator:")
        if raw.get("shuffle"):
            raise check.fail(["shuffle"], "shuffle: true is not supported (lm-eval's own sample order is used)")
        settings = {
            k: raw[k]
            for k in ("tasks", "limit", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn", *LM_EVAL_TOP_KEYS)
            if k in raw
        }
        value = {"lm_eval": settings}
        at = []
    else:
        for key in (*MERGEKIT_EVOLVE_KEYS, *LM_EVAL_TOP_KEYS):
            if key in raw and key != "random_init":
                raise check.fail([key], f"{key}: configures lm-eval tasks; it needs tasks:")
    section = check.keys(["evaluator"], value, ("command", "python", "lm_eval", "timeout", "resident"))
    kinds = [k for k in ("command", "python", "lm_eval") if k in section]
    if len(kinds) != 1:
        raise check.fail(["evaluator"], "exactly one of command, python or lm_eval is required")
    kind = kinds[0]
    timeout = section.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise check.fail(["evaluator", "timeout"], "must be a positive number of seconds")
    resident = section.get("resident")
    if resident is not None and not isinstance(resident, bool):
        raise check.fail(["evaluator", "resident"], "must be true or false")
    if kind == "command":
        if not isinstance(section["command"], str) or "{model}" not in section["command"]:
            raise check.fail(["evaluator", "command"], "must be a command line containing {model}")
        if resident:
            raise check.fail(["evaluator", "resident"], resident_refusal("command", {}) or "")
        return EvaluatorSpec("command", command=section["command"], timeout=timeout)
    if kind == "python":
        if not isinstance(section["python"], str) or ":" not in section["python"]:
            raise check.fail(["evaluator", "python"], "must name a callable as 'module:function'")
        return EvaluatorSpec("python", python=section["python"], timeout=timeout, resident=bool(resident))
    lm = dict(check.keys(["evaluator", "lm_eval"], section["lm_eval"], LM_EVAL_KEYS))
    hf = resident_refusal("lm_eval", lm) is None
    if resident and not hf:
        raise check.fail(["evaluator", "resident"], resident_refusal("lm_eval", lm) or "")
    tasks = lm.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise check.fail([*at, "tasks"], "a non-empty list of tasks is required")
    _task_entries(check, [*at, "tasks"], tasks)
    if "test_tasks" in lm:
        test_tasks = lm["test_tasks"]
        if not isinstance(test_tasks, list) or not test_tasks:
            raise check.fail([*at, "test_tasks"], "a non-empty list of tasks is required (or no test_tasks:)")
        _task_entries(check, [*at, "test_tasks"], test_tasks)
    if "include_path" in lm:
        lm["include_path"] = _include_path(check, [*at, "include_path"], lm["include_path"], root)
    # Resident by default where it can be: the same scores (tests/test_evolve_lm_eval.py), without
    # rebuilding lm-eval's model and tasks, or writing a scratch candidate, for every evaluation.
    return EvaluatorSpec("lm_eval", lm_eval=lm, timeout=timeout, resident=hf if resident is None else resident)


def _task_entries(check: Checker, at: list[str | int], tasks: list[Any]) -> None:
    """Each entry is a task name or {name, weight, metric} (mergekit-evolve's format)."""
    names = set()
    for i, task in enumerate(tasks):
        entry = {"name": task} if isinstance(task, str) else task
        check.keys([*at, i], entry, ("name", "weight", "metric"))
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise check.fail([*at, i], "each task needs a name")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise check.fail([*at, i, "weight"], "must be a number")
        metric = entry.get("metric")
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise check.fail([*at, i, "metric"], "must be a metric name as lm-eval reports it (e.g. 'acc,none')")
        if entry["name"] in names:
            raise check.fail([*at, i], f"task {entry['name']!r} is listed twice")
        names.add(entry["name"])
    weights = lm_eval_weights({"tasks": tasks})
    if weights is not None and all(w == 0 for w in weights.values()):
        raise check.fail(at, "every task's weight is zero")


def _include_path(check: Checker, at: list[str | int], value: Any, root: Path) -> list[str]:
    """lm-eval's TaskManager include_path: a directory or a list of them, relative ones resolved
    from the config file's directory (where the task YAMLs are usually kept), checked to exist."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise check.fail(at, "must be a directory of lm-eval task YAMLs, or a list of them")
    out = []
    for path in paths:
        found = (root / Path(path).expanduser()).resolve()
        if not found.is_dir():
            raise check.fail(at, f"{path} is not a directory (resolved: {found})")
        out.append(str(found))
    return out


def lm_eval_test_weights(
    check: Checker, evaluator: EvaluatorSpec, weights: Mapping[str, float] | None
) -> tuple[Mapping[str, float] | None, bool]:
    """The test split's objective weights: test_tasks name their own tasks, so their entries carry
    the test objective's weights; an explicit objective.weights applies to both splits and must
    then name tasks that test_tasks lists too."""
    settings = evaluator.lm_eval
    if "test_tasks" not in settings:
        return weights, False
    if weights is None:
        return lm_eval_weights(settings, "test_tasks"), True
    listed = {t if isinstance(t, str) else t["name"] for t in settings["test_tasks"]}
    missing = [t for t in weights if t not in listed]
    if missing:
        raise check.fail(
            ["objective", "weights", missing[0]],
            f"weighs task {missing[0]!r}, which test_tasks does not list (objective.weights applies to both"
            " splits; give each test task its weight in its test_tasks entry instead)",
        )
    return weights, True


def lm_eval_weights(settings: Mapping[str, Any], key: str = "tasks") -> dict[str, float] | None:
    """The objective weights lm-eval task entries carry (mergekit-evolve's ``weight``, default 1),
    or None when no task sets one (then the objective is the plain mean). ``key`` is ``tasks``
    (the search split) or ``test_tasks``."""
    tasks = [{"name": t} if isinstance(t, str) else t for t in settings.get(key, [])]
    if not any("weight" in t for t in tasks):
        return None
    return {str(t["name"]): float(t.get("weight", 1.0)) for t in tasks}

"""Running an evolution (:func:`evolve`) and reading a run back (:class:`Run`): the Python API behind
``modelkin evolve`` and ``modelkin runs``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import shutil
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EvolveConfig, load_evolve_config, with_task_search_path
from .dfs import run_dfs, run_ps_dfs
from .driver import Driver, Outcome, Reporter
from .errors import RunError
from .evaluator_config import resident_refusal
from .evaluator_registry import make_evaluator, unscored_splits
from .evaluators import EvaluatorFn
from .executors import Executor, LocalPoolExecutor, RayExecutor, SerialExecutor
from .experiment import Experiment, prepare_experiment
from .faults import MachineFault, machine_fault
from .lock import LOCK_NAME, RunLock
from .search import run_cmaes
from .soup import run_soup
from .store import STORE_NAME, Candidate, Store
from .topk import run_topk

CONFIG_COPY = "evolve.yml"


@dataclass(frozen=True)
class Run:
    """A run directory read back: its candidates, best model and lineage."""

    path: Path
    strategy: str
    candidates: tuple[Candidate, ...]
    kinship_pairs: Mapping[tuple[int, int], Mapping[str, float]]
    generations: tuple[tuple[int, tuple[int, ...]], ...]
    state: str
    stop_reason: str | None
    best_id: int | None
    kinship_seconds: float
    seed: int = 0
    # Faults of the machine met (time, candidate, split, message): never candidate failures.
    faults: tuple[tuple[float, int | None, str | None, str], ...] = ()
    # Worker processes replaced (lost, or killed on an evaluator timeout) in the last session.
    worker_restarts: int = 0
    # ps+dfs: the PS phase's best candidate (the DFS phase's A), once that phase has ended.
    ps_best_id: int | None = None

    def not_scored(self) -> dict[str, list[str]]:
        """Why a split has no scores, per split (each distinct reason once): the evaluator cannot
        score it, so it is absent rather than a copy of another split."""
        out: dict[str, list[str]] = {}
        for c in self.candidates:
            for split, reason in sorted(c.unscored.items()):
                if reason not in out.setdefault(split, []):
                    out[split].append(reason)
        return out

    @property
    def best(self) -> Candidate | None:
        """The run's answer: the top model of topk, the final greedy soup (None while running)."""
        return None if self.best_id is None else self.candidate(self.best_id)

    @property
    def base(self) -> Candidate | None:
        """The base model's row (None for a run without a base: a genome without one, or DFS)."""
        return next((c for c in self.candidates if c.role == "base"), None)

    def candidate(self, id: int) -> Candidate:
        for c in self.candidates:
            if c.id == id:
                return c
        raise KeyError(f"no candidate #{id} in {self.path}")

    def parents_kinship(self, c: Candidate) -> Mapping[str, float] | None:
        """The kinship of a merge's two parents (None for pool members and soups of more)."""
        return self.kinship_pairs.get((min(c.parents), max(c.parents))) if len(c.parents) == 2 else None

    def kinship_of(self, id: int) -> dict[str, dict[str, float | None]]:
        """Every measured kinship of one candidate, keyed by the other candidate's id."""
        out: dict[str, dict[str, float | None]] = {}
        for (a, b), metrics in self.kinship_pairs.items():
            if id in (a, b):
                other = b if a == id else a
                out[str(other)] = {m: (None if math.isnan(v) else v) for m, v in sorted(metrics.items())}
        return out

    def lineage(self, id: int) -> list[Candidate]:
        """The candidate and all its ancestors, parents before children."""
        seen: dict[int, Candidate] = {}

        def visit(cid: int) -> None:
            if cid in seen:
                return
            c = self.candidate(cid)
            for p in c.parents:
                visit(p)
            seen[cid] = c

        visit(id)
        return list(seen.values())

    def tree(self) -> dict[str, Any]:
        """The lineage graph: models as nodes (with scores), merges as edges (with kinship)."""
        nodes = [
            {
                "id": c.id,
                "label": c.label,
                "role": c.role,
                "generation": c.generation,
                "score": c.objective_search,
                "status": c.status,
            }
            for c in self.candidates
            if c.role != "base"
        ]
        edges = []
        for c in self.candidates:
            pair = self.parents_kinship(c)
            for p in c.parents:
                edges.append({"parent": p, "child": c.id, "kinship": None if pair is None else pair.get("pcc")})
        return {"nodes": nodes, "edges": edges}

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable run (``modelkin runs show --json``)."""
        return {
            "run": str(self.path),
            "strategy": self.strategy,
            "state": self.state,
            "stop_reason": self.stop_reason,
            "faults": [{"at": at, "candidate": c, "split": sp, "message": m} for at, c, sp, m in self.faults],
            "worker_restarts": self.worker_restarts,
            "best": self.best_id,
            "candidates": [self.candidate_dict(c) for c in self.candidates],
        }

    def candidate_dict(self, c: Candidate) -> dict[str, Any]:
        """One candidate as ``runs show --json`` prints it."""
        return {
            "id": c.id,
            "generation": c.generation,
            "role": c.role,
            "parents": list(c.parents),
            "model": c.reference if c.reference is not None else c.path,
            "recipe": c.recipe,
            "status": c.status,
            "scores": {split: dict(s) for split, s in c.scores.items()},
            "objective": {"search": c.objective_search, "test": c.objective_test},
            "not_scored": dict(c.unscored),
            "kinship": self.kinship_of(c.id),
            "error": c.error,
            "seconds": {"merge": c.merge_s, "evaluate": c.eval_s},
            **({"path": [dict(h) for h in c.hops]} if c.hops is not None else {}),
        }


def open_run(run_dir: str | os.PathLike[str]) -> Run:
    """Reads a run directory (read-only use; the store is opened, never changed)."""
    path = Path(run_dir)
    if not (path / STORE_NAME).is_file():
        raise RunError(f"{path}: not a modelkin run directory (no {STORE_NAME})")
    try:
        store = Store(path)
    except sqlite3.OperationalError:
        # A full disk or a read-only file system: read without writing (a read-only connection
        # leaves the WAL's side files behind, so it is not the default).
        store = Store(path, readonly=True)
    try:
        best = store.get_meta("best")
        return Run(
            path=path,
            strategy=store.get_meta("strategy") or "?",
            candidates=tuple(store.candidates()),
            kinship_pairs=store.all_kinship(),
            generations=tuple((g, tuple(top)) for g, top, _ in store.generations()),
            state=store.get_meta("state") or "running",
            stop_reason=store.get_meta("stop_reason"),
            best_id=None if best is None else int(best),
            kinship_seconds=float(store.get_meta("kinship_s") or 0.0),
            faults=tuple(store.faults()),
            worker_restarts=int(store.get_meta("worker_restarts") or 0),
            seed=int(store.get_meta("seed") or 0),
            ps_best_id=None if (ps_best := store.get_meta("ps_best")) is None else int(ps_best),
        )
    finally:
        store.close()


def evolve(
    config: str | os.PathLike[str] | Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    *,
    evaluator: EvaluatorFn | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    offline: bool = False,
    threads: int = 0,
    workers: int | None = None,
    ray: str | None = None,
    task_search_path: Sequence[str | os.PathLike[str]] = (),
    resident: bool | None = None,
) -> Run:
    """Runs (or resumes) an evolution: ``config`` is an ``evolve.yml`` path or a dict of its keys,
    ``run_dir`` holds the store and the merged models. A run directory holding another config is
    refused unless ``force`` (which starts it over). ``evaluator`` overrides the config's with a
    callable ``(model_path, split) -> {task: score}``. ``workers`` evaluates that many candidates at
    once in local worker processes; ``ray`` (an address, ``auto``, or ``local`` for a private
    cluster on this machine) runs them as Ray tasks instead. Neither changes the run's decisions.
    ``task_search_path`` (mergekit-evolve's ``--task-search-path``) adds directories of lm-eval task
    YAMLs to the lm_eval evaluator's ``include_path``; it is refused for other evaluators.
    ``resident`` (default: the config's ``evaluator.resident``; False for an ``evaluator`` callable)
    hands the evaluator each model in memory (a :class:`~modelkin.io.resident.ResidentModel`)
    instead of its path."""
    parsed = load_evolve_config(config if isinstance(config, Mapping) else Path(config))
    if evaluator is not None or resident is not None:
        parsed = _with_resident(parsed, bool(resident), evaluator is not None)
    if task_search_path and evaluator is not None:
        raise RunError("task_search_path is for the lm_eval evaluator; the evaluator callable given replaces it")
    parsed = with_task_search_path(parsed, [os.fspath(p) for p in task_search_path])
    # Absolute, so the recipes stored with the candidates re-make them from any directory.
    path = Path(run_dir).resolve()
    # Resolved once, and a bad pool refused, before the run directory is touched.
    experiment = prepare_experiment(parsed, offline)
    executor = make_executor(experiment, path, evaluator, workers or parsed.workers, ray or parsed.ray)
    lock: RunLock | None = None
    driver: Driver | None = None
    try:
        lock = _lock(path, force)
        _claim(path, parsed, force)
        lock.announce()
        unscored = unscored_splits(parsed.evaluator, evaluator)
        driver = Driver(
            experiment, path, executor, reporter=reporter, offline=offline, threads=threads, unscored=unscored
        )
        drive(driver)
    except MachineFault:
        raise
    except Exception as error:
        # A fault of the machine met in the driver's own process (a parent re-made for kinship on
        # a full disk, the store's own writes) stops the run the same way a worker's does.
        fault = machine_fault(error)
        if fault is None:
            raise
        if driver is not None:
            with contextlib.suppress(Exception):  # the store may be what cannot be written
                driver.store.record_fault(None, None, fault)
        raise MachineFault(fault) from error
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.store.set_meta(worker_restarts=str(executor.restarts))
            driver.store.close()
        executor.close()
        if lock is not None:
            lock.release()
    return open_run(path)


def _with_resident(config: EvolveConfig, resident: bool, override: bool) -> EvolveConfig:
    """The config with ``resident`` as given to :func:`evolve` (a callable given takes the place of
    the config's evaluator, whatever its kind)."""
    spec = config.evaluator
    refusal = resident_refusal(spec.kind, spec.lm_eval) if resident and not override else None
    if refusal is not None:
        raise RunError(f"resident: {refusal}")
    return dataclasses.replace(config, evaluator=dataclasses.replace(spec, resident=resident))


def drive(driver: Driver) -> Outcome:
    """Runs the driver's experiment with its strategy, from wherever its store stands."""
    driver.prepare()
    driver.score_references()
    strategy = driver.config.strategy
    if strategy == "cmaes":
        outcome = run_cmaes(driver)
    elif strategy == "dfs":
        outcome = run_dfs(driver)
    elif strategy == "ps+dfs":
        outcome = run_ps_dfs(driver)
    elif strategy == "topk":
        outcome = run_topk(driver)
    else:
        outcome = run_soup(driver)
    driver.store.set_meta(state="done", stop_reason=outcome.stop_reason, best=str(outcome.best.id))
    return outcome


def make_executor(
    experiment: Experiment, run_dir: Path, override: EvaluatorFn | None, workers: int, ray: str | None
) -> Executor:
    """The serial executor (one worker), a local pool, or Ray, as asked."""
    config = experiment.config
    if workers < 1:
        raise RunError(f"workers must be at least 1, not {workers}")
    evaluate = make_evaluator(config.evaluator, override)  # imports a 'module:function' now, in the driver
    if ray is not None:
        executor = RayExecutor(ray, config.evaluator, override, workers if workers > 1 else 0)
        # The run directory may not exist yet: its nearest existing ancestor must be visible.
        where = next(p for p in (run_dir, *run_dir.parents) if p.exists())
        paths = [p for p in (experiment.base, *experiment.pool, str(where)) if p is not None]
        executor.check_paths([p for p in paths if Path(p).is_absolute()])
        return executor
    # An in-process evaluator with a timeout runs in a worker process, where it can be stopped.
    timed = config.evaluator.timeout is not None and config.evaluator.kind != "command"
    if workers == 1 and not timed:
        return SerialExecutor(evaluate, config.evaluator.resident)
    if override is not None:
        try:
            pickle.dumps(override)
        except Exception as error:
            raise RunError(
                "workers > 1 (or an evaluator timeout) needs an evaluator that can be sent to worker processes"
                f" (a module-level function), not {override!r}: {error}"
            ) from error
    return LocalPoolExecutor(workers, config.evaluator, override)


def _lock(path: Path, force: bool) -> RunLock:
    """Takes the run directory for this driver, refusing a directory that is neither empty nor a
    run before anything is written into it, and a run another driver is running."""
    if (
        path.exists()
        and not (path / STORE_NAME).exists()
        and any(p.name != LOCK_NAME for p in path.iterdir())
        and not force
    ):
        raise RunError(f"{path}: exists, is not empty and is not a run directory (pass --force to use it)")
    path.mkdir(parents=True, exist_ok=True)
    return RunLock(path)


def _claim(path: Path, config: EvolveConfig, force: bool) -> None:
    """Makes ``path`` this config's run directory, refusing one that holds another experiment."""
    store_file = path / STORE_NAME
    if store_file.exists():
        store = Store(path)
        try:
            held = store.get_meta("fingerprint")
        finally:
            store.close()
        if held != config.fingerprint:
            if not force:
                raise RunError(f"{path}: holds a run of a different config (pass --force to start it over)")
            for name in (STORE_NAME, f"{STORE_NAME}-wal", f"{STORE_NAME}-shm", "models", CONFIG_COPY):
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    store = Store(path)
    try:
        if store.get_meta("fingerprint") is None:
            store.set_meta(
                fingerprint=config.fingerprint,
                strategy=config.strategy,
                config=config.text,
                config_source=config.source,
                state="running",
                seed=str(config.seed),
            )
            tmp = path / f".{CONFIG_COPY}.tmp"
            tmp.write_text(config.text)
            tmp.replace(path / CONFIG_COPY)
        else:
            store.set_meta(state="running")
    finally:
        store.close()

"""The evolution loop's machinery: propose candidates, merge, evaluate, record. The strategies
(``topk``, ``soup``, ``search``) decide what to propose and select with it; ``run`` picks one.

Every step reads the store and writes one transaction, so a run killed at any moment resumes where it
stopped: candidates are re-proposed by the same pure rules from the same stored scores (and so get the
same ids), inserting an existing candidate is a no-op, and only a candidate left pending is worked on
again. Nothing here holds state that the store does not."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ..kinship.measure import kinship_matrix
from ..merge.merging import merge
from . import strategies
from .config import SEARCHES, SPLITS
from .errors import RunError
from .evaluators import EvaluationError, check_scores, objective
from .executors import Executor, Job
from .experiment import Experiment
from .faults import MachineFault
from .store import Candidate, Store

MODELS_DIR = "models"
SCRATCH_DIR = "scratch"
Reporter = Callable[[str, Candidate, Store], object]


def split_optional(split: str) -> bool:
    """Whether a split may be left unscored: test only (held out and reported, never selected on)."""
    return split != "search"


@dataclass
class Outcome:
    """How a run ended."""

    best: Candidate
    stop_reason: str


class Driver:
    """Runs one evolution config in one run directory."""

    def __init__(
        self,
        experiment: Experiment,
        run_dir: Path,
        executor: Executor,
        *,
        reporter: Reporter | None = None,
        offline: bool = False,
        threads: int = 0,
        unscored: Mapping[str, str] | None = None,
    ) -> None:
        self.experiment = experiment
        # Splits the evaluator is known not to score (evaluators.unscored_splits), with the reason.
        self.unscored = dict(unscored or {})
        self.config = experiment.config
        self.run_dir = run_dir
        self.executor = executor
        self.report = reporter or (lambda event, candidate, store: None)
        self.offline = offline
        self.threads = threads
        self.store = Store(run_dir)
        self.failures_in_a_row = 0
        self.base_path = experiment.base
        self.genome = experiment.genome

    # --- setup -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Records the base and the pool (generation 0); clears what a killed run left half-made."""
        models_dir = self.run_dir / MODELS_DIR
        models_dir.mkdir(exist_ok=True)
        # A merge killed mid-write leaves its staging directory; the candidate is redone.
        for stale in models_dir.glob(".*.modelkin-*"):
            shutil.rmtree(stale, ignore_errors=True)
        (self.run_dir / SCRATCH_DIR).mkdir(exist_ok=True)
        for stale in (self.run_dir / SCRATCH_DIR).iterdir():
            shutil.rmtree(stale, ignore_errors=True)
        if self.base_path is not None:
            self.store.add("base", 0, "base", reference=self.config.base_model, path=self.base_path)
        for ref, path in zip(self.config.pool, self.experiment.pool, strict=True):
            self.store.add(f"pool:{ref}", 0, "pool", reference=ref, path=path)

    # --- one candidate -----------------------------------------------------------------------
    def model_path(self, candidate: Candidate) -> str:
        """Where a candidate's model lives (or will live once made): recipes name parents by it
        without re-making pruned ones."""
        return candidate.path or str(self.run_dir / MODELS_DIR / f"c{candidate.id}")

    def materialize(self, candidate: Candidate) -> str:
        """The candidate's model directory, re-made from its recipe when it was deleted."""
        if candidate.path and Path(candidate.path).exists():
            return candidate.path
        if candidate.recipe is None:
            raise RunError(f"model of {candidate.label} is gone: {candidate.path}")
        for parent in candidate.parents:
            self.materialize(self.store.get(parent))
        out = Path(self.model_path(candidate))
        start = time.perf_counter()
        merge(candidate.recipe, out, overwrite=True, seed=self.config.seed, threads=self.threads, offline=self.offline)
        self.store.record_merge(candidate.id, str(out), time.perf_counter() - start)
        return str(out)

    def score(self, candidate: Candidate, split: str, *, scratch: bool = False) -> Candidate:
        """Scores one split of one candidate (see :meth:`score_many`)."""
        self.score_many([(candidate, split)], scratch=scratch)
        return self.store.get(candidate.id)

    def score_many(
        self, items: Sequence[tuple[Candidate, str]], *, scratch: bool = False, count_failures: bool = True
    ) -> None:
        """Scores candidates (merging each first where needed) on the executor's workers, all at
        once; results are recorded as they arrive, failures as failed candidates. ``scratch``
        models live in a scratch directory and are deleted once evaluated."""
        jobs = []
        for item, split in items:
            candidate = self.store.get(item.id)
            if split in candidate.scores or split in candidate.unscored or candidate.status == "failed":
                continue
            if split in self.unscored:
                # Absent, never a copy of another split: nothing is merged or evaluated for it.
                self.store.record_unscored(candidate.id, split, self.unscored[split])
                continue
            model = self.model_path(candidate) if not scratch else str(self.run_dir / SCRATCH_DIR / f"c{candidate.id}")
            recipe = None
            if candidate.recipe is not None and not Path(model).exists():
                # Parents pruned by `keep: top` are re-made here, before a worker needs them.
                for parent in candidate.parents:
                    self.materialize(self.store.get(parent))
                recipe = dict(candidate.recipe)
            elif not Path(model).exists():
                self._fail(candidate, f"model of {candidate.label} is gone: {model}")
                continue
            self.report("start", candidate, self.store)
            jobs.append(
                Job(candidate.id, split, model, recipe, scratch, self.config.seed, self.threads, self.experiment.base)
            )
        for result in self.executor.run(jobs):
            candidate = self.store.get(result.candidate)
            if result.fault is not None:
                # Not the candidate's failure: it stays pending and the run stops (see faults.py).
                self.store.record_fault(candidate.id, result.split, result.fault)
                raise MachineFault(f"{result.fault} (while working on {candidate.label})")
            if result.fatal:
                # The config's error, not the candidate's: it stays pending, the run stops.
                raise RunError(result.error or "the evaluator's configuration is wrong")
            if result.merge_s is not None and not scratch:
                self.store.record_merge(candidate.id, self.model_path(candidate), result.merge_s)
            if result.unscored is not None and split_optional(result.split):
                self.store.record_unscored(candidate.id, result.split, result.unscored)
                self.report("done", self.store.get(candidate.id), self.store)
                continue
            if result.unscored is not None:
                # Selection reads the search split: a candidate without it cannot take part.
                self._fail(candidate, f"the {result.split} split was not scored: {result.unscored}", count_failures)
                continue
            if result.scores is None:
                self._fail(candidate, result.error or "unknown error", count_failures)
                continue
            try:
                value = objective(check_scores(result.scores, "evaluator"), self.config.split_weights(result.split))
            except EvaluationError as error:
                self._fail(candidate, str(error), count_failures)
                continue
            self.store.record_scores(candidate.id, result.split, result.scores, value, result.eval_s)
            self.failures_in_a_row = 0
            self.report("done", self.store.get(candidate.id), self.store)

    def _fail(self, candidate: Candidate, error: str, count: bool = True) -> None:
        self.store.record_failure(candidate.id, error)
        if not count:
            self.report("failed", self.store.get(candidate.id), self.store)
            return
        self.failures_in_a_row += 1
        self.report("failed", self.store.get(candidate.id), self.store)
        if self.failures_in_a_row >= self.config.max_failures:
            raise RunError(
                f"{self.failures_in_a_row} candidates failed in a row (max_failures); last: {error.splitlines()[0]}"
            )

    def propose(self, generation: int, role: str, parents: Sequence[Candidate], recipe: dict[str, object]) -> Candidate:
        key = f"{role}:{','.join(str(p.id) for p in parents)}"
        return self.store.add(key, generation, role, parents=[p.id for p in parents], recipe=recipe)

    # --- kinship -----------------------------------------------------------------------------
    def kinship(self, a: int, b: int) -> float:
        value = self.store.kinship(a, b, self.config.topk.metric)
        return math.nan if value is None else value

    def measure_kinship(self, candidates: Sequence[Candidate]) -> None:
        """Kinship of every not-yet-measured pair among ``candidates``, from one pass over their files
        (all three metrics are stored: they come from the same sums)."""
        ids = [c.id for c in candidates]
        missing = [(a, b) for a, b in combinations(ids, 2) if self.store.kinship(a, b, "pcc") is None]
        if not missing:
            return
        involved = [c for c in candidates if any(c.id in pair for pair in missing)]
        paths = [self.materialize(c) for c in involved]
        start = time.perf_counter()
        result = kinship_matrix(paths, base=self.base_path_required(), threads=self.threads, offline=self.offline)
        values: dict[tuple[int, int, str], float] = {}
        for i, a in enumerate(involved):
            for j, b in enumerate(involved):
                if i < j:
                    for metric, matrix in result.metrics.items():
                        values[(a.id, b.id, metric)] = float(matrix[i][j])
        self.store.record_kinship(values)
        self.store.add_kinship_time(time.perf_counter() - start)

    # --- the population ----------------------------------------------------------------------
    def score_references(self) -> None:
        """Scores the base (a reference row, a parent only if in the pool) and the pool on both
        splits at once; their failures do not count towards max_failures, but the run stops when the
        base, or every pool model of a strategy that starts from the pool, cannot be evaluated."""
        base = self.store.by_key("base")
        references = [*([base] if base is not None else []), *self.pool()]
        self.score_many([(c, split) for c in references for split in SPLITS], count_failures=False)
        if base is not None:
            base = self.store.get(base.id)
            if base.status == "failed":
                first_line = (base.error or "").splitlines()[0] if base.error else "unknown error"
                raise RunError(f"the base model could not be evaluated: {first_line}")
        if not strategies.rank(self.pool()) and self.config.strategy not in SEARCHES:
            raise RunError("no pool model could be evaluated")

    def pool(self) -> list[Candidate]:
        return [c for c in self.store.candidates() if c.role == "pool"]

    def population(self) -> list[Candidate]:
        return [c for c in self.store.candidates() if c.role != "base"]

    def base_path_required(self) -> str:
        return self.experiment.base_required

    def prune(self, top: Sequence[int]) -> None:
        """``keep: top``: deletes merged models outside the top k (re-made from their recipe if needed)."""
        if self.config.keep != "top":
            return
        for candidate in self.population():
            removable = candidate.recipe is not None and candidate.id not in top and candidate.path
            if removable and candidate.path and Path(candidate.path).exists():
                shutil.rmtree(candidate.path, ignore_errors=True)


__all__ = ["Driver", "Outcome", "Reporter"]

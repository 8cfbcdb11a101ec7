"""The evolution loop: propose candidates, merge, evaluate, record, select, repeat.

Every step reads the store and writes one transaction, so a run killed at any moment resumes where it
stopped: candidates are re-proposed by the same pure rules from the same stored scores (and so get the
same ids), inserting an existing candidate is a no-op, and only a candidate left pending is worked on
again. Nothing here holds state that the store does not."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from .._core import open_model
from ..errors import ModelkinError
from ..kinship import kinship_matrix
from ..merging import merge
from ..parameters import layer_of
from ..recipe import RecipeError, load_config
from ..resolve import resolve
from . import strategies
from .config import EvolveConfig
from .evaluators import EvaluationError, check_scores, objective
from .executors import Executor, Job
from .genome import Genome, GenomeSpec
from .recipes import pair_recipe, soup_recipe
from .store import Candidate, Store

MODELS_DIR = "models"
SCRATCH_DIR = "scratch"
SPLITS = ("search", "test")
Reporter = Callable[[str, Candidate, Store], object]


class RunError(ModelkinError, ValueError):
    """The run cannot go on (bad pool, another config in the run directory, too many failures)."""


@dataclass
class Outcome:
    """How a run ended."""

    best: Candidate
    stop_reason: str


class Driver:
    """Runs one evolution config in one run directory."""

    def __init__(
        self,
        config: EvolveConfig,
        run_dir: Path,
        executor: Executor,
        *,
        reporter: Reporter | None = None,
        offline: bool = False,
        threads: int = 0,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.executor = executor
        self.report = reporter or (lambda event, candidate, store: None)
        self.offline = offline
        self.threads = threads
        self.store = Store(run_dir)
        self.failures_in_a_row = 0
        self.base_path: str | None = None
        self.genome: Genome | None = None

    # --- setup -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Checks the models, then records the base and the pool (generation 0)."""
        models = check_models(self.config, self.offline)
        self.base_path = models.base
        self.genome = models.genome
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
        for ref, path in zip(self.config.pool, models.pool, strict=True):
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
            if split in candidate.scores or candidate.status == "failed":
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
            jobs.append(Job(candidate.id, split, model, recipe, scratch, self.config.seed, self.threads))
        for result in self.executor.run(jobs):
            candidate = self.store.get(result.candidate)
            if result.merge_s is not None and not scratch:
                self.store.record_merge(candidate.id, self.model_path(candidate), result.merge_s)
            if result.scores is None:
                self._fail(candidate, result.error or "unknown error", count_failures)
                continue
            try:
                value = objective(check_scores(result.scores, "evaluator"), self.config.weights)
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

    # --- strategies --------------------------------------------------------------------------
    def run(self) -> Outcome:
        self.prepare()
        base = self.store.by_key("base")
        # The base (a reference row, a parent only if in the pool) and the pool are scored on both
        # splits at once; their failures do not count towards max_failures (the run stops below if
        # the base or every pool model fails).
        references = [*([base] if base is not None else []), *self.pool()]
        self.score_many([(c, split) for c in references for split in SPLITS], count_failures=False)
        if base is not None:
            base = self.store.get(base.id)
            if base.status == "failed":
                first_line = (base.error or "").splitlines()[0] if base.error else "unknown error"
                raise RunError(f"the base model could not be evaluated: {first_line}")
        if not strategies.rank(self.pool()) and self.config.strategy != "cmaes":
            raise RunError("no pool model could be evaluated")
        if self.config.strategy == "cmaes":
            from .search import run_cmaes

            outcome = run_cmaes(self)
        elif self.config.strategy == "topk":
            outcome = self.run_topk()
        else:
            outcome = self.run_soup()
        self.store.set_meta(state="done", stop_reason=outcome.stop_reason, best=str(outcome.best.id))
        return outcome

    def pool(self) -> list[Candidate]:
        return [c for c in self.store.candidates() if c.role == "pool"]

    def population(self) -> list[Candidate]:
        return [c for c in self.store.candidates() if c.role != "base"]

    def base_path_required(self) -> str:
        assert self.base_path is not None, "topk and greedy_soup always have a base"
        return self.base_path

    def run_topk(self) -> Outcome:
        settings = self.config.topk
        history = {g: top for g, top, _ in self.store.generations()}
        if 0 not in history:
            history[0] = [c.id for c in strategies.rank(self.pool())[: settings.k]]
            self.store.record_generation(0, history[0], None)
        stop = f"{settings.generations} generations done"
        for generation in range(1, settings.generations + 1):
            # Decisions of generation g see only what generations before g made: on resume, the
            # children of g already in the store must not change g's own choice of parents.
            population = [c for c in self.population() if c.generation < generation]
            top = strategies.rank(population)[: settings.k]
            merged = strategies.merged_pairs(population)
            tops = [history[g] for g in sorted(history) if g < generation]
            if generation == 1:
                pool = strategies.rank(self.pool())
                pairs = [(a.id, b.id) for a, b in combinations(pool, 2)]
            else:
                if strategies.unchanged_for(tops, settings.patience):
                    stop = f"top {settings.k} unchanged for {settings.patience} generation(s)"
                    break
                pairs = strategies.topk_pairs(top, merged)
            explore = settings.explore == "kinship" and generation > 1 and bool(top)
            taken = merged | {strategies.pair_key(a, b) for a, b in pairs}
            options = [
                c
                for c in population
                if explore
                and c.status == "done"
                and c.id != top[0].id
                and strategies.pair_key(top[0].id, c.id) not in taken
            ]
            # One kinship pass per generation covers the stop rule (top k), the exploration
            # choice (best against every option) and the parents of every proposed merge.
            parents = [self.store.get(i) for pair in pairs for i in pair]
            self.measure_kinship(list({c.id: c for c in [*top, *options, *parents]}.values()))
            if (
                generation > 1
                and settings.stop_kinship is not None
                and (strategies.kinship_saturated(top, self.kinship, settings.metric, settings.stop_kinship))
            ):
                stop = f"kinship ({settings.metric}) of every top-{settings.k} pair past {settings.stop_kinship}"
                break
            roles = ["merge"] * len(pairs)
            if explore:
                partner = strategies.explore_partner(top[0], options, taken, self.kinship, settings.metric)
                if partner is not None:
                    pairs.append((top[0].id, partner.id))
                    roles.append("explore")
            if not pairs:
                stop = "every pair of the top k is merged already"
                break
            children = []
            for (a, b), role in zip(pairs, roles, strict=True):
                first, second = self.store.get(a), self.store.get(b)
                path_a, path_b = self.model_path(first), self.model_path(second)
                recipe = pair_recipe(self.config.merge, path_a, path_b, self.base_path_required())
                children.append(self.propose(generation, role, [first, second], recipe))
            self.score_many([(child, "search") for child in children])
            if generation not in history:
                history[generation] = [c.id for c in strategies.rank(self.population())[: settings.k]]
                self.store.record_generation(generation, history[generation], None)
            self.prune(history[generation])
        final = strategies.rank(self.population())[: settings.k]
        self.score_many([(candidate, "test") for candidate in final])
        return Outcome(self.store.get(final[0].id), stop)

    def run_soup(self) -> Outcome:
        ranked = strategies.rank(self.pool())
        merge_section = self.config.merge
        everything = [self.model_path(c) for c in self.pool()]
        uniform = self.store.add(
            "uniform_soup",
            1,
            "uniform_soup",
            parents=[c.id for c in self.pool()],
            recipe=soup_recipe(merge_section, everything),
        )

        def trial(ingredients: list[Candidate], step: int) -> Candidate:
            recipe = soup_recipe(merge_section, [self.model_path(c) for c in ingredients])
            key = "soup:" + ",".join(str(c.id) for c in ingredients)
            return self.store.add(key, step, "soup", parents=[c.id for c in ingredients], recipe=recipe)

        soup = [ranked[0]]
        current = ranked[0]
        # The uniform soup does not depend on the greedy steps: it runs beside the first one.
        first = [(trial([ranked[0], ranked[1]], 2), "search")] if len(ranked) > 1 else []
        self.score_many([(uniform, "search"), *first])
        for step, ingredient in enumerate(ranked[1:], start=2):
            candidate = self.score(trial([*soup, ingredient], step), "search")
            if candidate.status != "done" or current.objective_search is None:
                continue
            assert candidate.objective_search is not None
            compare = self.config.greedy_soup.compare
            if strategies.soup_accepts(candidate.objective_search, current.objective_search, compare):
                soup, current = [*soup, ingredient], candidate
        self.score_many([(candidate, "test") for candidate in (uniform, current)])
        kept = ", ".join(c.label for c in soup)
        return Outcome(self.store.get(current.id), f"greedy soup of {len(soup)} ingredient(s): {kept}")

    def prune(self, top: Sequence[int]) -> None:
        """``keep: top``: deletes merged models outside the top k (re-made from their recipe if needed)."""
        if self.config.keep != "top":
            return
        for candidate in self.population():
            removable = candidate.recipe is not None and candidate.id not in top and candidate.path
            if removable and candidate.path and Path(candidate.path).exists():
                shutil.rmtree(candidate.path, ignore_errors=True)


@dataclass(frozen=True)
class Models:
    """The resolved paths of a config's base (None: a cmaes genome without one) and pool, and the
    genome over them (cmaes)."""

    base: str | None
    pool: tuple[str, ...]
    genome: Genome | None = None


def check_models(config: EvolveConfig, offline: bool = False) -> Models:
    """Resolves the base and the pool and refuses, before anything runs, a pool model that is not a
    fine-tune of the base (another tensor set or shape), a merge section that makes no valid recipe,
    or a genome that does not fit the models."""
    base = None if config.base_model is None else str(resolve(config.model_path(config.base_model), offline=offline))
    pool = [str(resolve(config.model_path(ref), offline=offline)) for ref in config.pool]
    reference, reference_name = (base, config.base_model) if base is not None else (pool[0], config.pool[0])
    assert reference is not None and reference_name is not None
    expected = {name: shape for name, shape, _ in open_model(reference).tensors()}
    for ref, path in zip(config.pool, pool, strict=True):
        found = {name: shape for name, shape, _ in open_model(path).tensors()}
        _check_fine_tune(ref, found, expected, reference_name)
    if config.genome is not None:
        genome = build_genome(config, config.genome, base, pool, list(expected))
        try:
            load_config(genome.recipe(genome.initial()))
        except RecipeError as error:
            raise RecipeError(f"{config.source}: genome: {str(error).split(': ', 1)[-1]}") from error
        from .search import plan

        plan(config, genome)
        return Models(base, tuple(pool), genome)
    assert base is not None
    try:
        if config.strategy == "topk":
            load_config(pair_recipe(config.merge, pool[0], pool[1], base))
        else:
            load_config(soup_recipe(config.merge, pool))
    except RecipeError as error:
        raise RecipeError(f"{config.source}: merge: {str(error).split(': ', 1)[-1]}") from error
    return Models(base, tuple(pool))


def build_genome(
    config: EvolveConfig, spec: GenomeSpec, base: str | None, pool: Sequence[str], tensors: Sequence[str]
) -> Genome:
    """The genome over resolved models, its layer count read as mergekit-evolve reads it (the first
    model's config.json ``num_hidden_layers``, else the layer numbers in the tensor names)."""
    first = Path(pool[0])
    layers = 0
    with contextlib.suppress(OSError, ValueError):
        layers = int(
            json.loads(((first if first.is_dir() else first.parent) / "config.json").read_text()).get(
                "num_hidden_layers"
            )
            or 0
        )
    if not layers:
        found = [layer_of(n) for n in tensors]
        layers = max((x for x in found if x is not None), default=-1) + 1
    where = f"{config.source}: genome"
    if layers < 1:
        raise RecipeError(f"{where}: cannot tell the layer count of {config.pool[0]} (no num_hidden_layers)")
    if spec.layer_granularity > 0 and layers % spec.layer_granularity:
        raise RecipeError(f"{where}.layer_granularity: {layers} layers are not divisible by {spec.layer_granularity}")
    for pattern in spec.filters:
        if not any(pattern in name for name in tensors):
            raise RecipeError(f"{where}.filters: {pattern!r} matches no tensor of {config.pool[0]}")
    genome = Genome(spec, layers, pool, base)
    if spec.merge_method == "slerp" and genome.groups > 1:
        raise RecipeError(
            f"{where}.layer_granularity: a slerp genome with {genome.groups} layer groups needs a base model per"
            " slice, which modelkin's slices do not support yet (use layer_granularity: 0)"
        )
    return genome


def _check_fine_tune(ref: str, found: dict[str, list[int]], expected: dict[str, list[int]], base: str) -> None:
    missing = [n for n in expected if n not in found]
    if missing:
        raise RunError(f"pool model {ref} is not a fine-tune of {base}: it lacks tensor {missing[0]}")
    extra = [n for n in found if n not in expected]
    if extra:
        raise RunError(f"pool model {ref} is not a fine-tune of {base}: it has tensor {extra[0]}, the base does not")
    for name, shape in expected.items():
        if found[name] != shape:
            raise RunError(
                f"pool model {ref} is not a fine-tune of {base}: tensor {name} has shape {found[name]},"
                f" the base {shape}"
            )


__all__ = ["Driver", "Models", "Outcome", "RunError", "check_models"]

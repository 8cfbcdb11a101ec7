"""CMA-ES recipe search (Akiba et al. 2024; mergekit-evolve's genome) with the ``cmaes`` package.

Each generation asks a whole population, evaluates it concurrently, and tells the optimizer the
scores in candidate order. The optimizer is never pickled: a resumed run builds a fresh one with the
same seed and replays the stored generations (asking gives back the stored genotypes bit for bit,
which is checked, and telling gives the stored scores), so its state is the uninterrupted state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from .config import EvolveConfig
from .driver import Driver, Outcome
from .errors import RunError
from .experiment import SearchPlan
from .store import Candidate

BEST_CONFIG = "best_config.yml"
IMPROVEMENTS_DIR = "improvements"


# Above this many genes the search is separable CMA-ES (a diagonal covariance, the cmaes package's
# SepCMA): a full covariance's learning rate falls as 2/n^2, so with n in the thousands (a DFS scale
# matrix of a 7B model pair: 64^2 genes) it would learn nothing within a feasible budget, and its
# O(n^3) eigendecomposition every generation would outweigh the evaluations.
SEPARABLE_ABOVE = 400


@dataclass(frozen=True)
class Phase:
    """One CMA-ES search over a genome: ``prefix`` keys its candidates in the store (``prefix:g:i``),
    ``role`` names them, ``offset`` shifts its generation numbers (a second phase follows the first)."""

    prefix: str
    role: str
    recipe: Callable[[npt.NDArray[np.float64]], dict[str, Any]]
    x0: npt.NDArray[np.float64]
    plan: SearchPlan
    offset: int = 0
    hops: Callable[[npt.NDArray[np.float64]], list[dict[str, Any]]] | None = None


def run_cmaes(driver: Driver) -> Outcome:
    """Runs the search to its budget; the answer is the best candidate, made again and scored on
    the test split."""
    phase = ps_phase(driver)
    best, _ = search_phase(driver, phase)
    plan = phase.plan
    evaluations = plan.generations * plan.popsize
    budget = driver.config.cmaes.max_evals
    what = f"{plan.generations} generations of {plan.popsize} ({evaluations} evaluations, budget {budget})"
    return finish(driver, best, what)


def ps_phase(driver: Driver) -> Phase:
    """The parameter-space search (mergekit-evolve's genome)."""
    config, genome, plan = driver.config, driver.experiment.genome, driver.experiment.search
    assert genome is not None and plan is not None
    x0 = genome.initial(random=config.cmaes.random_init, seed=search_seed(config))
    return Phase("cmaes", "search", genome.recipe, x0, plan)


def search_seed(config: EvolveConfig) -> int:
    return config.cmaes.seed if config.cmaes.seed is not None else config.seed


def search_phase(
    driver: Driver, phase: Phase, start: Candidate | None = None, improvements: int = 0
) -> tuple[Candidate, int]:
    """Asks, evaluates and tells whole generations to the phase's budget; returns the best
    candidate (``start``, already scored, competes too) and the improvements kept so far (files
    of ``improvements/`` are numbered on from ``improvements``)."""
    from cmaes import CMA, SepCMA  # imported when a search runs

    config, store = driver.config, driver.store
    settings = config.cmaes
    popsize, generations = phase.plan.popsize, phase.plan.generations
    seed = search_seed(config)
    kind = SepCMA if phase.x0.size > SEPARABLE_ABOVE else CMA
    optimizer = kind(mean=phase.x0, sigma=settings.sigma0, seed=seed, population_size=popsize)
    best = start if start is not None and start.status == "done" else None
    if best is not None:
        improvements += 1
        _keep_improvement(driver.run_dir, best, improvements)
    for step in range(1, generations + 1):
        generation = phase.offset + step
        asked = [optimizer.ask() for _ in range(popsize)]
        candidates = []
        for i, x in enumerate(asked):
            key = f"{phase.prefix}:{step}:{i}"
            stored = store.by_key(key)
            if stored is not None and not np.array_equal(np.asarray(stored.genes), x):
                raise RunError(
                    f"resume diverged at generation {generation}: the optimizer asked another genotype than"
                    " the one stored (was the cmaes package upgraded?)"
                )
            hops = phase.hops(x) if phase.hops is not None else None
            candidates.append(
                store.add(key, generation, phase.role, genes=x.tolist(), recipe=phase.recipe(x), hops=hops)
            )
        driver.score_many([(c, "search") for c in candidates], scratch=True)
        candidates = [store.get(c.id) for c in candidates]
        values = _values(driver, candidates, generation, settings.penalty, phase.role)
        optimizer.tell([(x, -v) for x, v in zip(asked, values, strict=True)])  # cmaes minimises
        for c in candidates:
            if c.status == "done" and (best is None or (c.objective_search or 0.0) > (best.objective_search or 0.0)):
                best = c
                improvements += 1
                _keep_improvement(driver.run_dir, c, improvements)
        store.record_generation(generation, [best.id] if best is not None else [], None)
    if best is None:
        raise RunError("no candidate of the search could be evaluated")
    return best, improvements


def finish(driver: Driver, best: Candidate, what: str) -> Outcome:
    """The best candidate made again outside the scratch area (kept for ``runs best``) and scored
    on the test split."""
    best = driver.score(best, "test")
    if best.path is None:
        # The evaluator has no test split, so scoring made nothing: the model is kept all the same.
        driver.materialize(best)
        best = driver.store.get(best.id)
    return Outcome(best, what)


def _values(
    driver: Driver, candidates: list[Candidate], generation: int, penalty: float | None, role: str
) -> list[float]:
    """Scores told to the optimizer; a failed candidate gets ``penalty`` or the worst score seen up to
    this generation in this phase (computed from the store, so a replay tells the same numbers)."""
    if penalty is None:
        seen = [
            c.objective_search
            for c in driver.store.candidates()
            if c.role == role and c.generation <= generation and c.status == "done" and c.objective_search is not None
        ]
        penalty = min(seen) if seen else 0.0
    return [
        c.objective_search if c.status == "done" and c.objective_search is not None else penalty for c in candidates
    ]


def _keep_improvement(run_dir: Path, candidate: Candidate, number: int) -> None:
    """``best_config.yml`` is the best recipe so far; ``improvements/`` keeps every one (written
    atomically; rewriting them on a replay gives the same files)."""
    assert candidate.recipe is not None
    text = f"# candidate #{candidate.id}, search objective {candidate.objective_search}\n" + yaml.safe_dump(
        dict(candidate.recipe), sort_keys=False
    )
    folder = run_dir / IMPROVEMENTS_DIR
    folder.mkdir(exist_ok=True)
    for target in (folder / f"{number:04d}-c{candidate.id}.yml", run_dir / BEST_CONFIG):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)

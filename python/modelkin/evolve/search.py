"""CMA-ES recipe search (Akiba et al. 2024; mergekit-evolve's genome) with the ``cmaes`` package.

Each generation asks a whole population, evaluates it concurrently, and tells the optimizer the
scores in candidate order. The optimizer is never pickled: a resumed run builds a fresh one with the
same seed and replays the stored generations (asking gives back the stored genotypes bit for bit,
which is checked, and telling gives the stored scores), so its state is the uninterrupted state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from .driver import Driver, Outcome
from .errors import RunError
from .store import Candidate

BEST_CONFIG = "best_config.yml"
IMPROVEMENTS_DIR = "improvements"


def run_cmaes(driver: Driver) -> Outcome:
    """Runs the search to its budget; the answer is the best candidate, made again and scored on
    the test split."""
    from cmaes import CMA  # imported when a search runs

    config, store, genome, shape = driver.config, driver.store, driver.experiment.genome, driver.experiment.search
    assert genome is not None and shape is not None
    settings = config.cmaes
    popsize, generations = shape.popsize, shape.generations
    seed = settings.seed if settings.seed is not None else config.seed
    x0 = genome.initial(random=settings.random_init, seed=seed)
    optimizer = CMA(mean=x0, sigma=settings.sigma0, seed=seed, population_size=popsize)
    best: Candidate | None = None
    improvements = 0
    for generation in range(1, generations + 1):
        asked = [optimizer.ask() for _ in range(popsize)]
        candidates = []
        for i, x in enumerate(asked):
            key = f"cmaes:{generation}:{i}"
            stored = store.by_key(key)
            if stored is not None and not np.array_equal(np.asarray(stored.genes), x):
                raise RunError(
                    f"resume diverged at generation {generation}: the optimizer asked another genotype than"
                    " the one stored (was the cmaes package upgraded?)"
                )
            candidates.append(store.add(key, generation, "search", genes=x.tolist(), recipe=genome.recipe(x)))
        driver.score_many([(c, "search") for c in candidates], scratch=True)
        candidates = [store.get(c.id) for c in candidates]
        values = _values(driver, candidates, generation, settings.penalty)
        optimizer.tell([(x, -v) for x, v in zip(asked, values, strict=True)])  # cmaes minimises
        for c in candidates:
            if c.status == "done" and (best is None or (c.objective_search or 0.0) > (best.objective_search or 0.0)):
                best = c
                improvements += 1
                _keep_improvement(driver.run_dir, c, improvements)
        store.record_generation(generation, [best.id] if best is not None else [], None)
    if best is None:
        raise RunError("no candidate of the search could be evaluated")
    best = driver.score(best, "test")  # made again outside the scratch area: kept for `runs best`
    if best.path is None:
        # The evaluator has no test split, so scoring made nothing: the model is kept all the same.
        driver.materialize(best)
        best = store.get(best.id)
    evaluations = generations * popsize
    return Outcome(
        best, f"{generations} generations of {popsize} ({evaluations} evaluations, budget {settings.max_evals})"
    )


def _values(driver: Driver, candidates: list[Candidate], generation: int, penalty: float | None) -> list[float]:
    """Scores told to the optimizer; a failed candidate gets ``penalty`` or the worst score seen up to
    this generation (computed from the store, so a replay tells the same numbers)."""
    if penalty is None:
        seen = [
            c.objective_search
            for c in driver.store.candidates()
            if c.role == "search"
            and c.generation <= generation
            and c.status == "done"
            and c.objective_search is not None
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

"""Data-flow-space search (``strategy: dfs``) and parameter space then data flow space in one run
(``strategy: ps+dfs``), Akiba et al. 2024: CMA-ES over the layer-path genome of
:mod:`.dfs_genome`, every candidate a passthrough recipe of one-layer slices (an ordinary checkpoint).

The first DFS candidate is the start of the genome, the A-only path: A's layers once, in order,
scales 1 — exactly model A. It competes with the search's candidates, so a DFS phase never reports
worse than A, and PS+DFS never worse than its PS phase. Both phases use :func:`.search.search_phase`
(replayed on resume like ``strategy: cmaes``); the DFS phase's generations follow the PS phase's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .dfs_genome import DfsGenome, describe
from .driver import Driver, Outcome
from .experiment import SearchPlan
from .search import Phase, finish, ps_phase, search_phase

DFS_ROLE = "dfs"
START_KEY = "dfs:start"


def run_dfs(driver: Driver) -> Outcome:
    genome, plan = driver.experiment.dfs, driver.experiment.dfs_search
    assert genome is not None and plan is not None
    best, _ = dfs_phase(driver, genome, plan, 0, 0)
    return finish(driver, best, _what(plan, "DFS"))


def run_ps_dfs(driver: Driver) -> Outcome:
    """The PS phase (exactly ``strategy: cmaes``), its best scored on both splits and kept, then
    DFS with that model as A."""
    ps = ps_phase(driver)
    ps_best, improvements = search_phase(driver, ps)
    ps_best = driver.score(ps_best, "test")
    first = driver.materialize(ps_best)  # the DFS phase's A: a model of the run directory
    driver.store.set_meta(ps_best=str(ps_best.id))  # read back as Run.ps_best_id
    genome, plan = driver.experiment.dfs, driver.experiment.dfs_search
    assert genome is not None and plan is not None
    best, _ = dfs_phase(driver, genome.with_first(first), plan, ps.plan.generations, improvements)
    return finish(driver, best, f"{_what(ps.plan, 'PS')}, then {_what(plan, 'DFS')}")


def dfs_phase(driver: Driver, genome: DfsGenome, plan: SearchPlan, offset: int, improvements: int) -> tuple[Any, int]:
    """The A-only start, scored, then the search; the best of them and the improvements kept."""
    store = driver.store
    x0 = genome.initial(driver.config.cmaes.sigma0)

    def hops(x: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
        return describe(genome.path(x), genome.models)

    start = store.add(START_KEY, offset, DFS_ROLE, genes=x0.tolist(), recipe=genome.recipe(x0), hops=hops(x0))
    driver.score_many([(start, "search")], scratch=True)
    phase = Phase("dfs", DFS_ROLE, genome.recipe, x0, plan, offset, hops)
    return search_phase(driver, phase, store.get(start.id), improvements)


def _what(plan: SearchPlan, name: str) -> str:
    return f"{name}: {plan.generations} generations of {plan.popsize} ({plan.generations * plan.popsize} evaluations)"

"""Evolution: merge, evaluate, select, repeat, on a crash-safe run store.

Strategies: ``topk`` (Hu et al. 2024, Top-k greedy merging with the kinship-guided exploration
merge) and ``greedy_soup`` (Wortsman et al. 2022). Nothing here is imported by ``modelkin`` itself
until it is used, and optional heavy dependencies (lm_eval) are imported only when asked for.

The evolve layer. May import: ``modelkin.io``, ``modelkin.kinship``, ``modelkin.merge`` and the
compiled core; never the CLI. Within it: ``config`` resolves a run's YAML once into a typed, immutable
``EvolveConfig``; ``driver`` runs the loop on it through an executor (``executors``, ``worker``) and
the strategies (``strategies``, ``search``), recording into ``store``; ``run`` and ``report`` are
the front ends the CLI (``cli``) calls. This package re-exports the public names (it is itself
callable: ``modelkin.evolve(config, run_dir)``)."""

import sys
import types
from typing import Any

from .config import EvolveConfig, load_evolve_config
from .errors import RunError
from .evaluators import EvaluationError, ObjectiveError, SplitNotScored
from .faults import MachineFault
from .run import Run, evolve, open_run
from .store import Candidate

__all__ = [
    "Candidate",
    "EvaluationError",
    "EvolveConfig",
    "MachineFault",
    "ObjectiveError",
    "Run",
    "RunError",
    "SplitNotScored",
    "evolve",
    "load_evolve_config",
    "open_run",
]


class _CallableModule(types.ModuleType):
    """Lets ``modelkin.evolve(config, run_dir)`` run an evolution, as the package's own name reads;
    ``modelkin.evolve.evolve`` is the same function, for type checkers."""

    def __call__(self, *args: Any, **kwargs: Any) -> Run:
        return evolve(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

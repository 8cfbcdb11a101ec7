"""The evolve layer's run-level error, below every module that raises it (the driver, the
executors, the search), so that none of them imports another for it."""

from __future__ import annotations

from ..io.errors import ModelkinError


class RunError(ModelkinError, ValueError):
    """The run cannot go on (bad pool, another config in the run directory, too many failures)."""

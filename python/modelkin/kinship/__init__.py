"""The kinship layer: the pass over a base and its fine-tunes (``measure``), the metrics and results
built from its statistics, per-layer plots, the torch path (``--device``) and the ``merge_cal`` shim
of the original kinship tool.

May import: ``modelkin.io`` and the compiled core; never merge, evolve or the CLI. This package
imports none of its modules, so ``modelkin.kinship.measure`` loads only what it needs."""

"""The merge layer: mergekit recipes (``recipe``, ``parameters``, ``methods``), the architecture's
layer naming, the plan (``planner``) and the typed job handed to the Rust engine (``job``), the
output vocabulary and chat template, and running a merge to a directory or into memory
(``merging``, ``output``).

May import: ``modelkin.io``, ``modelkin.kinship`` (a merge measures its parents' kinship) and the
compiled core; never evolve or the CLI. This package imports none of its modules."""

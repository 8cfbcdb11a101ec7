"""modelkin: exact, streaming model kinship for fine-tuned LLMs."""

import importlib
from typing import TYPE_CHECKING

from ._core import __version__
from .io.errors import (
    DtypeError,
    InvalidModelError,
    MissingTensorError,
    ModelkinError,
    ModelReferenceError,
    NonFiniteError,
    RecipeError,
    ShapeMismatchError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from . import evolve
    from .io.resident import ResidentModel, StoredModel
    from .io.resolve import resolve
    from .kinship.measure import METRICS, KinshipMatrix, KinshipResult, TensorKinship, kinship, kinship_matrix
    from .merge.merging import MergedModel, MergeResult, merge
    from .merge.methods import methods
    from .merge.planner import MergePlan, PlannedTensor, plan

__all__ = [
    "METRICS",
    "DtypeError",
    "InvalidModelError",
    "KinshipMatrix",
    "KinshipResult",
    "MergePlan",
    "MergeResult",
    "MergedModel",
    "MissingTensorError",
    "ModelReferenceError",
    "ModelkinError",
    "NonFiniteError",
    "PlannedTensor",
    "RecipeError",
    "ResidentModel",
    "ShapeMismatchError",
    "StoredModel",
    "TensorKinship",
    "UnsupportedFormatError",
    "__version__",
    "evolve",
    "kinship",
    "kinship_matrix",
    "merge",
    "methods",
    "plan",
    "resolve",
]

# The rest of the public names, each imported from its module on first use (PEP 562), so that
# `import modelkin` (and the command line) pays for numpy, the merge planner, YAML and evolution
# only when something asks for them.
_LAZY = {
    "ResidentModel": ".io.resident",
    "StoredModel": ".io.resident",
    "resolve": ".io.resolve",
    "METRICS": ".kinship.measure",
    "KinshipMatrix": ".kinship.measure",
    "KinshipResult": ".kinship.measure",
    "TensorKinship": ".kinship.measure",
    "kinship": ".kinship.measure",
    "kinship_matrix": ".kinship.measure",
    "MergedModel": ".merge.merging",
    "MergeResult": ".merge.merging",
    "merge": ".merge.merging",
    "methods": ".merge.methods",
    "MergePlan": ".merge.planner",
    "PlannedTensor": ".merge.planner",
    "plan": ".merge.planner",
}

# `modelkin.kinship` and `modelkin.merge` are the public functions, and also the names of layer
# packages. The first import of a package binds it on its parent, over the function, so both
# packages (whose __init__ modules import nothing) are imported now and their names dropped again:
# the functions then come from __getattr__ even after `modelkin.kinship.measure` is imported.
for _package in ("kinship", "merge"):
    importlib.import_module(f".{_package}", __name__)
    del globals()[_package]
del _package


def __getattr__(name: str) -> object:
    """A lazily imported public name (bound on the module once imported). ``modelkin.evolve``
    (callable: ``modelkin.evolve(config, run_dir)`` runs an evolution) is the evolve package."""
    if name == "evolve":
        # import_module, not `from . import`: that would ask this hook again for the attribute.
        return importlib.import_module(".evolve", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'modelkin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

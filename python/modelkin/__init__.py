"""modelkin: exact, streaming model kinship for fine-tuned LLMs."""

import importlib

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


def __getattr__(name: str) -> object:
    """``modelkin.evolve`` (callable: ``modelkin.evolve(config, run_dir)`` runs an evolution) is
    imported on first use, so that merging and kinship do not pay for loading it."""
    if name == "evolve":
        # import_module, not `from . import`: that would ask this hook again for the attribute.
        return importlib.import_module(".evolve", __name__)
    raise AttributeError(f"module 'modelkin' has no attribute {name!r}")

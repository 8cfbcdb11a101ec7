"""modelkin: exact, streaming model kinship for fine-tuned LLMs."""

from ._core import __version__
from .errors import (
    DtypeError,
    InvalidModelError,
    MissingTensorError,
    ModelkinError,
    ModelReferenceError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from .kinship import METRICS, KinshipMatrix, KinshipResult, TensorKinship, kinship, kinship_matrix
from .merge_config import RecipeError
from .merging import MergeResult, merge
from .resolve import resolve

__all__ = [
    "METRICS",
    "DtypeError",
    "InvalidModelError",
    "KinshipMatrix",
    "KinshipResult",
    "MergeResult",
    "MissingTensorError",
    "ModelReferenceError",
    "ModelkinError",
    "NonFiniteError",
    "RecipeError",
    "ShapeMismatchError",
    "TensorKinship",
    "UnsupportedFormatError",
    "__version__",
    "evolve",
    "kinship",
    "kinship_matrix",
    "merge",
    "resolve",
]

# Last: the evolution package imports the merge engine, which reads __version__ from here.
# modelkin.evolve is callable: modelkin.evolve(config, run_dir) runs an evolution.
from . import evolve

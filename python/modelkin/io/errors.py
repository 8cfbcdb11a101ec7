"""The exception hierarchy. Every class is defined by the Rust extension, so errors raised deep in
the core and errors raised in Python share one hierarchy."""

from .._core import (
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

__all__ = [
    "DtypeError",
    "InvalidModelError",
    "MissingTensorError",
    "ModelReferenceError",
    "ModelkinError",
    "NonFiniteError",
    "RecipeError",
    "ShapeMismatchError",
    "UnsupportedFormatError",
]

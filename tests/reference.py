"""An independent float64 reference for the kinship metrics, straight from DESIGN.md section 2:
numpy on whole concatenated vectors, no streaming, no moments."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]


def quantize_8bit(x: Vector) -> Vector:
    return np.clip(np.round(127 * (x / np.max(np.abs(x)))), -127, 127)


def pcc(a: Vector, b: Vector) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def cs(a: Vector, b: Vector) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ed(a: Vector, b: Vector) -> float:
    return float(np.linalg.norm(a - b))


METRIC_FUNCTIONS = {"pcc": pcc, "cs": cs, "ed": ed}


def deltas(model: dict[str, Vector], base: dict[str, Vector], rows: int | None) -> dict[str, Vector]:
    out = {}
    for name, z in base.items():
        x = model[name]
        if rows is not None and x.ndim:
            x, z = x[:rows], z[:rows]
        out[name] = (x - z).ravel()
    return out


def full(da: dict[str, Vector], db: dict[str, Vector], metric: str, low_precision: bool = False) -> float:
    a = np.concatenate(list(da.values()))
    b = np.concatenate([db[n] for n in da])
    if low_precision:
        a, b = quantize_8bit(a), quantize_8bit(b)
    return METRIC_FUNCTIONS[metric](a, b)


def split(da: dict[str, Vector], db: dict[str, Vector], metric: str, low_precision: bool = False) -> float:
    total, weight = 0.0, 0
    for name, a in da.items():
        b = db[name]
        if low_precision:
            with np.errstate(invalid="ignore", divide="ignore"):
                a, b = quantize_8bit(a), quantize_8bit(b)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = METRIC_FUNCTIONS[metric](a, b)
        if not np.isnan(value):
            total += value * a.size
            weight += a.size
    return total / weight

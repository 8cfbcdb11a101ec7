"""Pictures of kinship: a heatmap for a matrix and a per-layer profile for a per-tensor breakdown."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..io.errors import ModelkinError
from .measure import KinshipMatrix, TensorKinship

_LAYER = re.compile(r"layers\.(\d+)\.")
_LABELS = {"pcc": "Pearson correlation", "cs": "cosine similarity", "ed": "Euclidean distance"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ModelkinError("--plot needs matplotlib, which is not installed: pip install 'modelkin[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(result: KinshipMatrix, path: str | Path) -> Path:
    """One annotated heatmap per metric, side by side."""
    plt = _pyplot()
    labels = [Path(n).name or n for n in result.names]
    fig, axes = plt.subplots(1, len(result.metrics), figsize=(4.8 * len(result.metrics), 4.4), squeeze=False)
    for ax, (metric, values) in zip(axes[0], result.metrics.items(), strict=True):
        bounded = metric != "ed"
        image = ax.imshow(
            values, cmap="viridis" if bounded else "magma_r", vmin=-1 if bounded else None, vmax=1 if bounded else None
        )
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(f"{_LABELS[metric]} ({result.mode})")
        for i in range(len(labels)):
            for j in range(len(labels)):
                text = "n/a" if np.isnan(values[i, j]) else f"{values[i, j]:.3g}"
                # Dark text on the bright end of the colour map, light text elsewhere.
                bright = image.norm(values[i, j]) > 0.6
                ax.text(j, i, text, ha="center", va="center", color="black" if bright else "white", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"Model kinship against {Path(result.base).name or result.base}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def layer_profile(per_tensor: Sequence[TensorKinship], metric: str) -> tuple[list[int], npt.NDArray[np.float64]]:
    """Per decoder layer, the element-weighted mean of a metric over that layer's tensors."""
    sums: dict[int, list[float]] = {}
    for t in per_tensor:
        match = _LAYER.search(t.name)
        value = getattr(t, metric)
        if match is None or np.isnan(value):
            continue
        acc = sums.setdefault(int(match[1]), [0.0, 0.0])
        acc[0] += value * t.n
        acc[1] += t.n
    layers = sorted(sums)
    return layers, np.array([sums[layer][0] / sums[layer][1] for layer in layers])


def plot_layers(per_tensor: Sequence[TensorKinship], title: str, path: str | Path) -> Path:
    """Kinship per decoder layer: correlations on the left axis, distance on the right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for metric, style in (("pcc", "o-"), ("cs", "s--")):
        layers, values = layer_profile(per_tensor, metric)
        ax.plot(layers, values, style, label=_LABELS[metric])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("similarity of deltas")
    right = ax.twinx()
    layers, values = layer_profile(per_tensor, "ed")
    right.plot(layers, values, "^:", color="tab:red", label=_LABELS["ed"])
    right.set_ylabel("Euclidean distance (mean per tensor)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

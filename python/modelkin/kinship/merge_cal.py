"""`merge_cal`: a drop-in for the original kinship tool's command, with exact arithmetic.

It keeps the original's interface and its quirks: tensors a fine-tune lacks are skipped (logged on
stderr), tied embeddings count twice, cosine similarity is printed as its absolute value."""

from __future__ import annotations

import math
import re
import sys
from typing import Annotated

import typer

from ..io.console import run_cli
from ..io.errors import ModelReferenceError
from .measure import METRICS, measure

NAMES = {"pcc": "Pearson Correlation Coefficient", "ed": "Euclidean Distance", "cs": "Cosine Similarity"}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def merge_cal(
    model_1: Annotated[str, typer.Argument(help="First fine-tune.")],
    model_2: Annotated[str, typer.Argument(help="Second fine-tune.")],
    model_base: Annotated[str, typer.Argument(help="Their common base.")],
    metrics: Annotated[str, typer.Argument(help='Metrics: "pcc ed cs" (spaces or commas).')],
    low_precision: Annotated[bool, typer.Option("--low-precision", help="Quantise deltas to int8.")] = False,
    split_calculation: Annotated[
        bool, typer.Option("--split-calculation", help="Average per-tensor metrics, weighted by size.")
    ] = False,
) -> None:
    """Calculate model kinship (pcc, ed, cs) of two fine-tunes of one base."""
    if len({model_1, model_2, model_base}) < 3:
        raise ModelReferenceError("All model names must be different")
    requested = [m for m in re.split(r"[\s,]+", metrics.strip()) if m]
    mode = "split" if split_calculation else "full"
    stats = measure(
        [model_1, model_2],
        model_base,
        low_precision=mode if low_precision else None,
        skip_missing=True,
        count_tied_embeddings_twice=True,
    )
    for name, reason in stats.skipped:
        print(f"WARNING: Key {name} not found in one of the models ({reason}); skipped", file=sys.stderr)
    for metric in requested:
        if metric not in METRICS:
            print(f"Error: Metric '{metric}' does not exist.")
            continue
        value = float(stats.matrix(metric, mode)[0, 1])
        if metric == "cs":
            value = abs(value)
        if split_calculation:
            print(f"{metric}: Model Kinship based on {NAMES[metric]} (weighted average): {value:.4f}")
        else:
            print(f"{metric}: Model Kinship based on {NAMES[metric]}: {_repr(value)}")


def _repr(value: float) -> str:
    return "nan" if math.isnan(value) else repr(value)


def main() -> None:
    sys.exit(run_cli(typer.main.get_command(app)))

"""The `modelkin` command line.

Every command is declared here; what a command needs (numpy and the kinship pass, the merge
planner, YAML, the evolve layer, rich for tables) is imported when it runs, so that `modelkin
--help` and each command pay only for their own imports (benches/bench_startup.py measures it)."""

from __future__ import annotations

import functools
import json
import math
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .io.console import run_cli
from .io.progress import PassProgress

if TYPE_CHECKING:
    from rich.console import Console

    from ._core import ParameterInfo
    from .kinship.measure import KinshipMatrix, KinshipResult

app = typer.Typer(
    name="modelkin",
    help="Measure how related fine-tuned models are (model kinship), merge them, and evolve merges.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)


@functools.cache
def _out() -> Console:
    """The console of the tables on stdout, made on first use (rich is imported only then)."""
    from rich.console import Console

    return Console()


class Metric(str, Enum):
    pcc = "pcc"
    cs = "cs"
    ed = "ed"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


BaseOpt = Annotated[str, typer.Option("--base", "-b", help="The common base model (dir, file or org/name).")]
MetricOpt = Annotated[
    list[Metric] | None, typer.Option("--metric", "-m", help="Metric to report; repeat for several. Default: all.")
]
SplitOpt = Annotated[bool, typer.Option("--split", help="Average per-tensor metrics, weighted by size.")]
LowOpt = Annotated[bool, typer.Option("--low-precision", help="Quantise deltas to int8 first, as the original tool.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DeviceOpt = Annotated[Device | None, typer.Option("--device", help="Compute with torch on this device.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-j", min=0, help="Worker threads (0: all cores).")]
SkipOpt = Annotated[bool, typer.Option("--skip-nonfinite", help="Leave out tensors holding NaN/Inf.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Resolve Hub ids from the local cache only.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG picture of the result.")]


def _nothing_to_finalize() -> None:
    """For a command that only reads and prints: the interpreter's last garbage collection at exit
    finds nothing such a command needs finalized (no store, no output file), yet costs about a
    tenth of a second over typer's, pydantic's and numpy's objects (benches/bench_startup.py).
    Freezing every object at exit (atexit runs before that collection) skips it."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def _metrics(metric: list[Metric] | None) -> list[str]:
    from .kinship.measure import METRICS

    return [m.value for m in metric] if metric else list(METRICS)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.6g}"


@app.command("kinship")
def kinship_command(
    model_a: Annotated[str, typer.Argument(help="First fine-tune.")],
    model_b: Annotated[str, typer.Argument(help="Second fine-tune.")],
    base: BaseOpt,
    metric: MetricOpt = None,
    split: SplitOpt = False,
    low_precision: LowOpt = False,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Break the result down by tensor.")] = False,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = 0,
    skip_nonfinite: SkipOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Kinship of two fine-tunes of one base: pcc, cs and ed of their deltas."""
    from .kinship.measure import kinship

    _nothing_to_finalize()

    with PassProgress("kinship") as progress:
        result = kinship(
            model_a,
            model_b,
            base=base,
            metrics=_metrics(metric),
            split=split,
            low_precision=low_precision,
            per_tensor=per_tensor or plot is not None,
            device=device.value if device else None,
            threads=threads,
            skip_nonfinite=skip_nonfinite,
            offline=offline,
            progress=progress,
        )
    _warn_skipped(result.skipped)
    if plot is not None:
        from .kinship.plot import plot_layers

        assert result.per_tensor is not None
        plot_layers(result.per_tensor, f"{Path(model_a).name} vs {Path(model_b).name}", plot)
        print(f"wrote {plot}", file=sys.stderr)
    if as_json:
        data = result.to_dict()
        if not per_tensor:
            data.pop("per_tensor", None)
        print(json.dumps(data, indent=2))
        return
    _print_kinship(result, per_tensor)


def _short(reference: str) -> str:
    """A model's short name for titles and headers: its last path component (or repo name)."""
    return Path(reference).name or reference


def _print_kinship(result: KinshipResult, per_tensor: bool) -> None:
    from rich.table import Table

    out = _out()
    # Short names in the title (long paths wrapped it word by word); the full references below.
    a, b = result.models
    title = f"kinship of {_short(a)} and {_short(b)} (base {_short(result.base)})"
    table = Table(title=title, min_width=len(title))
    table.add_column("metric")
    table.add_column(f"value ({result.mode})", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, _fmt(value))
    out.print(table)
    out.print(f"{result.n:,} elements in {result.tensors} tensors", soft_wrap=True)
    for label, reference in ((_short(a), a), (_short(b), b), ("base", result.base)):
        if label != reference:
            out.print(f"{label}: {reference}", soft_wrap=True, highlight=False)
    if per_tensor and result.per_tensor:
        detail = Table(title="per tensor (lowest pcc first)")
        for column in ("tensor", "n", "pcc", "cs", "ed"):
            detail.add_column(column, justify="left" if column == "tensor" else "right")
        ranked = sorted(result.per_tensor, key=lambda t: (math.isnan(t.pcc), t.pcc))
        for t in ranked:
            detail.add_row(t.name, f"{t.n:,}", _fmt(t.pcc), _fmt(t.cs), _fmt(t.ed))
        out.print(detail)


@app.command("matrix")
def matrix_command(
    models: Annotated[list[str], typer.Argument(help="Two or more fine-tunes.")],
    base: BaseOpt,
    metric: MetricOpt = None,
    split: SplitOpt = False,
    low_precision: LowOpt = False,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = 0,
    skip_nonfinite: SkipOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """N x N kinship of several fine-tunes of one base, from one pass over the files."""
    from .kinship.measure import kinship_matrix

    _nothing_to_finalize()

    with PassProgress("matrix") as progress:
        result = kinship_matrix(
            models,
            base=base,
            metric=_metrics(metric),
            split=split,
            low_precision=low_precision,
            device=device.value if device else None,
            threads=threads,
            skip_nonfinite=skip_nonfinite,
            offline=offline,
            progress=progress,
        )
    _warn_skipped(result.skipped)
    if plot is not None:
        from .kinship.plot import plot_matrix

        plot_matrix(result, plot)
        print(f"wrote {plot}", file=sys.stderr)
    if as_json:
        data = result.to_dict()
        print(json.dumps({k: data[k] for k in ("models", "base", "metrics")}, indent=2))
        return
    _print_matrix(result)


def _print_matrix(result: KinshipMatrix) -> None:
    from rich.table import Table

    out = _out()
    labels = [Path(n).name or n for n in result.names]
    for name, values in result.metrics.items():
        table = Table(title=f"{name} ({result.mode}), base {_short(result.base)}")
        table.add_column("")
        for label in labels:
            table.add_column(label, justify="right")
        for label, row in zip(labels, values, strict=True):
            table.add_row(label, *(_fmt(v) for v in row))
        out.print(table)
    # The full references, once, below the tables (in the titles they wrapped word by word).
    out.print(f"base: {result.base}", soft_wrap=True)
    for label, name in zip(labels, result.names, strict=True):
        if label != name:
            out.print(f"{label}: {name}", soft_wrap=True)


@app.command("merge")
def merge_command(
    recipe: Annotated[Path, typer.Argument(help="A mergekit YAML recipe.")],
    out: Annotated[Path, typer.Argument(help="Output directory (written atomically).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random methods (dare_*).")] = 0,
    precise: Annotated[
        bool, typer.Option("--precise", help="Compute exactly in float64 and round once (not mergekit's bits).")
    ] = False,
    threads: ThreadsOpt = 0,
    out_shard_size: Annotated[str, typer.Option("--out-shard-size", help="Largest output shard, e.g. 2GB.")] = "5GB",
    offline: OfflineOpt = False,
) -> None:
    """Merge models with a mergekit YAML recipe; the parents' kinship is recorded in modelkin.json."""
    from .merge.merging import merge

    with PassProgress("merge") as progress:
        result = merge(
            recipe,
            out,
            overwrite=overwrite,
            seed=seed,
            precise=precise,
            threads=threads,
            out_shard_size=out_shard_size,
            offline=offline,
            progress=progress,
        )
    print(f"wrote {result.path} ({result.method}, {result.bytes_written / 1e6:.1f} MB of tensors)")
    if result.kinship is not None and len(result.parents) > 1:
        from rich.table import Table

        from .kinship.measure import METRICS

        table = Table(title=f"kinship of the parents (base {_short(result.base or '')})")
        for column in ("model A", "model B", "pcc", "cs", "ed"):
            table.add_column(column, justify="right" if column in METRICS else "left")
        for i, a in enumerate(result.parents):
            for j in range(i + 1, len(result.parents)):
                values = [float(result.kinship[m][i, j]) for m in METRICS]
                table.add_row(_short(a), _short(result.parents[j]), *(_fmt(v) for v in values))
        _out().print(table)


@app.command("methods")
def methods_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """List the merge methods: what each does with base_model, how many models, its parameters."""
    from .merge.methods import method_dict, methods

    table_rows = methods()
    if as_json:
        print(json.dumps([method_dict(info) for info in table_rows.values()], indent=2))
        return
    from rich.table import Table

    table = Table(title="merge methods (mergekit 0.1.5 definitions)")
    for column in ("method", "what it does", "base_model", "models", "global parameters", "per-model parameters"):
        table.add_column(column)

    def described(p: ParameterInfo) -> str:
        text = p.name if p.required else f"{p.name}={p.default}"
        return text + (f" {p.range_text}" if p.range_text else "")

    for info in table_rows.values():
        count = f"{info.min_models}" if info.min_models == info.max_models else f"{info.min_models}+"
        if info.max_models is not None and info.max_models != info.min_models:
            count = f"{info.min_models}-{info.max_models}"
        table.add_row(
            info.name,
            info.summary,
            info.base,
            count,
            ", ".join(described(p) for p in info.parameters if p.scope == "global"),
            ", ".join(described(p) for p in info.parameters if p.scope == "per_model"),
        )
    _out().print(table)


@app.command("example")
def example_command(
    directory: Annotated[Path | None, typer.Argument(help="Where to write the example family.")] = None,
    tasks: Annotated[
        Path | None,
        typer.Option(
            "--tasks",
            help="Write the trained task family here instead (Hugging Face models with tokenizers; evolve.yml,"
            " soup.yml, and evolve-lmeval.yml with its lm-eval tasks in lm_eval_tasks/).",
        ),
    ] = None,
) -> None:
    """Write a bundled family: the synthetic kinship family (DIRECTORY), or the trained task family
    (--tasks DIR: a tiny Llama base and four fine-tunes, each mastering one task, ready to evolve
    with the numpy evaluator or through lm-eval)."""
    if (directory is None) == (tasks is None):
        raise typer.BadParameter("give either DIRECTORY or --tasks DIR")
    if tasks is not None:
        from .evolve.family import write_task_family

        for name, path in write_task_family(tasks).items():
            print(f"{name}: {path}")
        return
    from .example import write_example_family

    assert directory is not None
    for name, path in write_example_family(directory).items():
        print(f"{name}: {path}")


# The evolution commands: declared here (so that listing and parsing them loads nothing of the
# evolve layer), done by modelkin.evolve.cli, imported when one of them runs.


@app.command("evolve")
def evolve_command(
    config: Annotated[Path, typer.Argument(help="The evolution config (evolve.yml).")],
    run_dir: Annotated[Path, typer.Argument(help="The run directory (created, or resumed).")],
    force: Annotated[bool, typer.Option("--force", help="Start over a run directory holding another config.")] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", min=0, help="Merge threads (0: all cores).")] = 0,
    offline: Annotated[bool, typer.Option("--offline", help="Resolve Hub ids from the local cache only.")] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=1, help="Evaluate this many candidates at once, locally.")
    ] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run evaluations as Ray tasks: ADDRESS, auto, or local.")
    ] = None,
    task_search_path: Annotated[
        list[Path] | None,
        typer.Option(
            "--task-search-path",
            metavar="DIR",
            help="A directory of lm-eval task YAMLs, added to the lm_eval evaluator's include_path (repeatable).",
        ),
    ] = None,
) -> None:
    """Run an evolution (topk with kinship, greedy soup, CMA-ES recipe search); re-run to resume."""
    from .evolve import cli

    cli.evolve_command(
        config,
        run_dir,
        force=force,
        threads=threads,
        offline=offline,
        workers=workers,
        ray=ray,
        task_search_path=task_search_path or (),
    )


runs_app = typer.Typer(name="runs", help="Inspect evolution runs.", no_args_is_help=True, add_completion=False)
RunArg = Annotated[Path, typer.Argument(help="A run directory (made by modelkin evolve).")]


@runs_app.command("show")
def show_command(
    run_dir: RunArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a score-by-generation PNG.")] = None,
) -> None:
    """Every candidate of a run: parents, recipe, kinship, scores, status, time."""
    from .evolve import cli

    cli.show_command(run_dir, as_json=as_json, plot=plot)


@runs_app.command("tree")
def tree_command(
    run_dir: RunArg,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the lineage as a PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print nodes and edges as JSON.")] = False,
) -> None:
    """The lineage: models as nodes (score), merges as edges (kinship)."""
    from .evolve import cli

    cli.tree_command(run_dir, plot=plot, as_json=as_json)


@runs_app.command("best")
def best_command(
    run_dir: RunArg,
    out_dir: Annotated[Path, typer.Argument(help="Where to write the best model.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT_DIR.")] = False,
) -> None:
    """Write the run's best model with a card listing its whole lineage."""
    from .evolve import cli

    cli.best_command(run_dir, out_dir, overwrite=overwrite)


app.add_typer(runs_app, name="runs")


def _warn_skipped(skipped: tuple[tuple[str, str], ...]) -> None:
    for name, reason in skipped:
        print(f"skipped tensor '{name}': {reason}", file=sys.stderr)


def main() -> None:
    sys.exit(run_cli(typer.main.get_command(app)))


if __name__ == "__main__":
    main()

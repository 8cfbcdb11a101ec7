"""What a run shows: the candidates table, the lineage and score plots, and the best model written
out with a card that lists its whole lineage."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..io.staging import copy_tree, remove_stale, staging_dir
from ..merge.merging import merge
from ..merge.output import publish
from .errors import RunError
from .run import Run
from .store import Candidate


def _num(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _parents(run: Run, c: Candidate) -> str:
    return " + ".join(run.candidate(p).label for p in c.parents)


def not_scored_note(run: Run) -> str | None:
    """Why a split has no scores ("test: not scored: lm_eval has no test_tasks"), one line per
    split, or None when every split the run asked for was scored."""
    lines = [f"{split}: not scored: {'; '.join(reasons)}" for split, reasons in run.not_scored().items()]
    return "\n".join(lines) or None


def not_scored_caption(run: Run) -> Text | None:
    """:func:`not_scored_note` as a table caption (plain text: a reason may hold brackets)."""
    note = not_scored_note(run)
    return None if note is None else Text(note)


def candidates_table(run: Run, title: str | None = None) -> Table:
    """Every candidate: parents, role, kinship of its parents, scores on both splits, status, time.
    A split the evaluator cannot score is left empty and the caption says why."""
    table = Table(
        title=title or f"{run.path} ({run.strategy}, {run.state})",
        caption=not_scored_caption(run),
        caption_justify="left",
    )
    numeric = ("id", "gen", "parents' pcc", "search", "test", "s")
    for column in ("id", "gen", "role", "model / parents", "parents' pcc", "search", "test", "status", "s"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for c in run.candidates:
        pair = run.parents_kinship(c)
        seconds = (c.merge_s or 0.0) + (c.eval_s or 0.0)
        status = c.status if c.error is None else f"{c.status}: {c.error.splitlines()[0][:60]}"
        marker = " *" if c.id == run.best_id else ""
        table.add_row(
            f"{c.id}{marker}",
            str(c.generation),
            c.role,
            Text(c.label, no_wrap=True, overflow="ellipsis") if not c.parents else _ParentsCell(run, c),
            _num(pair.get("pcc")) if pair else "",
            _num(c.objective_search),
            _num(c.objective_test),
            status,
            f"{seconds:.2f}" if seconds else "",
        )
    return table


class _ParentsCell:
    """A merge's parents (a soup's ingredients) on one line: their names where the column is wide
    enough, else their ids ("#2 + #3 + #4"), never wrapped one per row (which made a soup's row as
    tall as its soup). Rich measures it from the ids (its narrowest) to the names (its widest)."""

    def __init__(self, run: Run, c: Candidate) -> None:
        self.names = _parents(run, c)
        self.ids = " + ".join(f"#{p}" for p in c.parents)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(cell_len(self.ids), cell_len(self.names)), cell_len(self.names))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = self.names if cell_len(self.names) <= options.max_width else self.ids
        yield Text(text, no_wrap=True, overflow="ellipsis")


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or one line saying how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise RunError("--plot needs matplotlib, which is not installed: pip install 'modelkin[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tree(run: Run, path: Path) -> None:
    """The lineage: models as nodes coloured by search score, merges as edges labelled with kinship."""
    plt = _pyplot()
    fig = tree_figure(run)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tree_figure(run: Run) -> Any:
    """The figure :func:`plot_tree` writes: the lineage by generation, a colour bar for the
    search score, and a title wrapped to the figure's width rather than cut at its edges."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    nodes = [c for c in run.candidates if c.role != "base"]
    by_gen: dict[int, list[Candidate]] = {}
    for c in nodes:
        by_gen.setdefault(c.generation, []).append(c)
    where = {c.id: (i - (len(row) - 1) / 2, -g) for g, row in by_gen.items() for i, c in enumerate(row)}
    scores = [c.objective_search for c in nodes if c.objective_search is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    if high == low:  # one score (or none): a colour bar needs a range
        low, high = low - 0.5, high + 0.5
    width = max(7.0, 1.6 * max(len(r) for r in by_gen.values()) + 1.5)
    fig, ax = plt.subplots(figsize=(width, 1.8 * len(by_gen) + 1.5))
    for c in nodes:
        pair = run.parents_kinship(c)
        for p in c.parents:
            if p not in where:
                continue
            (x0, y0), (x1, y1) = where[p], where[c.id]
            ax.plot([x0, x1], [y0, y1], color="0.6", lw=1, zorder=1)
        if pair is not None and c.id in where:
            x, y = where[c.id]
            text = f"pcc {pair.get('pcc', math.nan):.3f}"
            ax.annotate(text, (x, y + 0.2), ha="center", va="bottom", fontsize=7, color="C3")
    cmap = plt.get_cmap("viridis")
    norm = Normalize(low, high)
    for c in nodes:
        x, y = where[c.id]
        value = c.objective_search
        colour = "lightgrey" if value is None else cmap(norm(value))
        edge = "red" if c.id == run.best_id else "black"
        ax.scatter([x], [y], s=600, color=colour, edgecolors=edge, linewidths=2 if c.id == run.best_id else 1, zorder=2)
        text = f"{c.label}\n{value:.3f}" if value is not None else f"{c.label}\n{c.status}"
        ax.annotate(text, (x, y - 0.2), ha="center", va="top", fontsize=7)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="objective (search split)", shrink=0.8)
    ax.set_yticks([-g for g in by_gen], [f"gen {g}" for g in by_gen])
    ax.set_xticks([])
    # About 11 characters per inch at 10 pt: long run names wrap instead of running off the figure.
    chars = max(30, int(width * 11))
    title = [
        *textwrap.wrap(f"lineage of {run.path.name} ({run.strategy})", chars),
        *textwrap.wrap("colour: search score; red: parents' kinship (pcc); red ring: the best model", chars),
    ]
    ax.set_title("\n".join(title), fontsize=10)
    ax.margins(0.15, 0.25)
    fig.tight_layout()
    return fig


def plot_progress(run: Run, path: Path) -> None:
    """Best and population scores per generation (search split), with the base as a reference line;
    for a DFS run, the best model's layer path (see :func:`plot_path`)."""
    chosen = run.best
    if chosen is not None and chosen.hops:
        plot_path(run, chosen, path)
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [c for c in run.candidates if c.role != "base" and c.objective_search is not None]
    ys = [c.objective_search or 0.0 for c in done]
    ax.scatter([c.generation for c in done], ys, color="0.6", s=18, label="candidates")
    gens = sorted({c.generation for c in done})
    best = []
    for g in gens:
        values = [c.objective_search for c in done if c.generation <= g and c.objective_search is not None]
        best.append(max(values))
    ax.plot(gens, best, marker="o", color="C0", label="best so far")
    if run.base is not None and run.base.objective_search is not None:
        ax.axhline(run.base.objective_search, color="C3", ls="--", lw=1, label="base")
    ax.set_xticks(gens)
    ax.set_xlabel("generation")
    ax.set_ylabel("objective (search split)")
    ax.set_title(f"{run.path.name} ({run.strategy}): scores by generation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_path(run: Run, best: Candidate, path: Path) -> None:
    """The paper's figure of a DFS model: hop by hop (x), which source layer it runs (y: the models'
    layers stacked in order), its scale as colour."""
    plt = _pyplot()
    hops = list(best.hops or ())
    models = list(dict.fromkeys(str(h["model"]) for h in hops))
    depth = {m: 1 + max(int(h["layer"]) for h in hops if h["model"] == m) for m in models}
    offsets = {m: sum(depth[n] for n in models[: models.index(m)]) for m in models}
    ys = [offsets[str(h["model"])] + int(h["layer"]) for h in hops]
    scales = [float(h["scale"]) for h in hops]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(hops)), 4))
    ax.plot(range(len(hops)), ys, color="0.7", lw=1, zorder=1)
    dots = ax.scatter(range(len(hops)), ys, c=scales, cmap="viridis", s=40, zorder=2)
    fig.colorbar(dots, ax=ax, label="scale at the hop")
    for m in models[1:]:
        ax.axhline(offsets[m] - 0.5, color="0.85", lw=1)
    ax.set_yticks([offsets[m] for m in models], [Path(m).name or m for m in models])
    ax.set_xlabel("hop")
    ax.set_ylabel("source layer (models stacked)")
    ax.set_title(f"{run.path.name} ({run.strategy}): layer path of #{best.id}, search {_num(best.objective_search)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lineage_card(run: Run, best: Candidate) -> str:
    """A README section listing the best model's lineage: each merge's recipe, kinship and scores."""
    lines = [
        "## Lineage (modelkin evolve)",
        "",
        f"Found by `modelkin evolve` ({run.strategy}) in `{run.path}`; candidate #{best.id}.",
        "",
        "| model | role | parents | parents' pcc | search | test |",
        "|---|---|---|---|---|---|",
    ]
    base = run.base
    if base is not None:
        base_scores = f"{_num(base.objective_search)} | {_num(base.objective_test)}"
        lines.append(f"| `{base.label}` (base) | reference | | | {base_scores} |")
    for c in run.lineage(best.id):
        pair = run.parents_kinship(c)
        lines.append(
            f"| `{c.label}` | {c.role} | {_parents(run, c)} | {_num(pair.get('pcc')) if pair else ''} |"
            f" {_num(c.objective_search)} | {_num(c.objective_test)} |"
        )
    lines.append("")
    if best.hops:
        lines += [
            "### Layer path (data-flow-space search)",
            "",
            "Each hop is one layer of a source model; its scale is the factor applied at that hop in the run's"
            " meaning, already folded into this checkpoint's weights.",
            "",
            "| hop | model | layer | scale |",
            "|---|---|---|---|",
        ]
        lines += [f"| {i} | `{h['model']}` | {h['layer']} | {h['scale']:.4f} |" for i, h in enumerate(best.hops)]
        lines.append("")
    note = not_scored_note(run)
    if note is not None:
        lines += [f"{line}." for line in note.splitlines()] + [""]
    for c in run.lineage(best.id):
        if c.recipe is None:
            continue
        lines += [f"### #{c.id} = {_parents(run, c)}", "", "```json", json.dumps(c.recipe, indent=2), "```", ""]
        for split in ("search", "test"):
            if split in c.scores:
                scores = ", ".join(f"{t} {v:.4f}" for t, v in c.scores[split].items())
                lines.append(f"- {split}: {scores}")
            elif split in c.unscored:
                lines.append(f"- {split}: not scored: {c.unscored[split]}")
        lines.append("")
    return "\n".join(lines)


def write_best(run: Run, out: Path, overwrite: bool = False) -> Candidate:
    """Writes the run's best model to ``out`` (re-made from its recipe if it was pruned), with its
    lineage appended to the model card and ``modelkin_lineage.json`` beside it."""
    best = run.best
    if best is None:
        raise ValueError(f"{run.path}: the run has no best model yet (it has not finished)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named after this process, with the umask's mode (io/staging.py); a dead writer's goes first.
    remove_stale(out)
    staging = staging_dir(out)
    try:
        target = staging / "model"
        source = Path(best.path) if best.path else None
        if source is not None and source.exists():
            # Fresh copies: the output's modes follow this command's umask, not the run's files'.
            copy_tree(source, target) if source.is_dir() else _copy_file(source, target)
        else:
            _remake(run, best, target, staging)
        card = target / "README.md"
        previous = card.read_text() if card.exists() else f"# {best.label}\n"
        card.write_text(previous.rstrip() + "\n\n" + lineage_card(run, best))
        lineage: list[dict[str, Any]] = [run.candidate_dict(c) for c in run.lineage(best.id)]
        (target / "modelkin_lineage.json").write_text(json.dumps(lineage, indent=2))
        publish(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return best


def _copy_file(source: Path, target: Path) -> None:
    target.mkdir()
    shutil.copyfile(source, target / source.name)


def _remake(run: Run, c: Candidate, target: Path, scratch: Path) -> None:
    """Re-makes a pruned model (and any pruned ancestors) from the stored recipes."""
    assert c.recipe is not None
    recipe = json.loads(json.dumps(c.recipe))
    for parent_id in c.parents:
        parent = run.candidate(parent_id)
        if parent.path and Path(parent.path).exists():
            continue
        rebuilt = scratch / f"c{parent.id}"
        _remake(run, parent, rebuilt, scratch)
        _replace_path(recipe, str(parent.path), str(rebuilt))
    merge(recipe, target, overwrite=True, seed=run.seed)


def _replace_path(recipe: dict[str, Any], old: str, new: str) -> None:
    if recipe.get("base_model") == old:
        recipe["base_model"] = new
    for entry in recipe.get("models", []):
        if entry.get("model") == old:
            entry["model"] = new

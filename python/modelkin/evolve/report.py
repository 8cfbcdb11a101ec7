"""What a run shows: the candidates table, the lineage and score plots, and the best model written
out with a card that lists its whole lineage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from rich.table import Table

from ..io.staging import copy_tree, remove_stale, staging_dir
from ..merge.merging import merge
from ..merge.output import publish
from .run import Run
from .store import Candidate


def _num(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _parents(run: Run, c: Candidate) -> str:
    return " + ".join(run.candidate(p).label for p in c.parents)


def candidates_table(run: Run, title: str | None = None) -> Table:
    """Every candidate: parents, role, kinship of its parents, scores on both splits, status, time."""
    table = Table(title=title or f"{run.path} ({run.strategy}, {run.state})")
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
            c.label if not c.parents else _parents(run, c),
            _num(pair.get("pcc")) if pair else "",
            _num(c.objective_search),
            _num(c.objective_test),
            status,
            f"{seconds:.2f}" if seconds else "",
        )
    return table


def plot_tree(run: Run, path: Path) -> None:
    """The lineage: models as nodes coloured by search score, merges as edges labelled with kinship."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [c for c in run.candidates if c.role != "base"]
    by_gen: dict[int, list[Candidate]] = {}
    for c in nodes:
        by_gen.setdefault(c.generation, []).append(c)
    where = {c.id: (i - (len(row) - 1) / 2, -g) for g, row in by_gen.items() for i, c in enumerate(row)}
    scores = [c.objective_search for c in nodes if c.objective_search is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * max(len(r) for r in by_gen.values())), 1.8 * len(by_gen) + 1))
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
    for c in nodes:
        x, y = where[c.id]
        value = c.objective_search
        colour = "lightgrey" if value is None else cmap((value - low) / (high - low or 1.0))
        edge = "red" if c.id == run.best_id else "black"
        ax.scatter([x], [y], s=600, color=colour, edgecolors=edge, linewidths=2 if c.id == run.best_id else 1, zorder=2)
        text = f"{c.label}\n{value:.3f}" if value is not None else f"{c.label}\n{c.status}"
        ax.annotate(text, (x, y - 0.2), ha="center", va="top", fontsize=7)
    ax.set_yticks([-g for g in by_gen], [f"gen {g}" for g in by_gen])
    ax.set_xticks([])
    ax.set_title(f"lineage of {run.path.name} ({run.strategy}); colour: search score; red: parents' kinship")
    ax.margins(0.15, 0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_progress(run: Run, path: Path) -> None:
    """Best and population scores per generation (search split), with the base as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    if run.base.objective_search is not None:
        ax.axhline(run.base.objective_search, color="C3", ls="--", lw=1, label="base")
    ax.set_xticks(gens)
    ax.set_xlabel("generation")
    ax.set_ylabel("objective (search split)")
    ax.set_title(f"{run.path.name} ({run.strategy}): scores by generation")
    ax.legend()
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
    base_scores = f"{_num(base.objective_search)} | {_num(base.objective_test)}"
    lines.append(f"| `{base.label}` (base) | reference | | | {base_scores} |")
    for c in run.lineage(best.id):
        pair = run.parents_kinship(c)
        lines.append(
            f"| `{c.label}` | {c.role} | {_parents(run, c)} | {_num(pair.get('pcc')) if pair else ''} |"
            f" {_num(c.objective_search)} | {_num(c.objective_test)} |"
        )
    lines.append("")
    for c in run.lineage(best.id):
        if c.recipe is None:
            continue
        lines += [f"### #{c.id} = {_parents(run, c)}", "", "```json", json.dumps(c.recipe, indent=2), "```", ""]
        for split in ("search", "test"):
            if split in c.scores:
                scores = ", ".join(f"{t} {v:.4f}" for t, v in c.scores[split].items())
                lines.append(f"- {split}: {scores}")
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

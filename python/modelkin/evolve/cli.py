"""The evolution commands' work: ``modelkin evolve`` and the ``modelkin runs`` group.

The commands themselves (their arguments, options and help) are declared with the others in
``modelkin.cli``, which imports this module only when one of them runs: the other commands and
``modelkin --help`` never load the evolve layer."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .faults import MachineFault
from .run import Run
from .store import Candidate, Store

err = Console(stderr=True)
out = Console()
RECENT = 12


class LiveTable:
    """The live view of a running evolution: the latest candidates, counts, best score and ETA."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(console=console, refresh_per_second=4, transient=False)
        self.started = time.perf_counter()
        self.finished = 0
        self.printed: dict[int, set[str]] = {}

    def __enter__(self) -> LiveTable:
        if self.console.is_terminal:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.live.__exit__(None, None, None)

    def __call__(self, event: str, candidate: Candidate, store: Store) -> None:
        if event in ("done", "failed"):
            self.finished += 1
        if not self.console.is_terminal:
            if event in ("done", "failed"):
                self.print_line(candidate)
            return
        self.live.update(self.render(store))

    def print_line(self, candidate: Candidate) -> None:
        """One line per new fact about a candidate (a split scored, a failure): a candidate scored
        on both splits, or failing on both, is not printed twice."""
        facts = []
        for split, value in (("search", candidate.objective_search), ("test", candidate.objective_test)):
            if value is not None:
                facts.append(f"{split} {value:.4f}")
        if candidate.status == "failed":
            facts.append("failed: " + (candidate.error or "").split("\n")[0])
        new = [f for f in facts if f not in self.printed.setdefault(candidate.id, set())]
        if new:
            self.printed[candidate.id].update(new)
            self.console.print(f"#{candidate.id} {candidate.role} " + ", ".join(new), soft_wrap=True)

    def render(self, store: Store) -> Group:
        candidates = store.candidates()
        labels = {c.id: c.label for c in candidates}
        table = Table(title="modelkin evolve", expand=False)
        for column in ("id", "gen", "role", "parents", "search", "test", "status"):
            table.add_column(column)
        for c in candidates[-RECENT:]:
            table.add_row(
                str(c.id),
                str(c.generation),
                c.role,
                " + ".join(labels.get(p, str(p)) for p in c.parents) or c.label,
                "" if c.objective_search is None else f"{c.objective_search:.4f}",
                "" if c.objective_test is None else f"{c.objective_test:.4f}",
                c.status,
            )
        done = [c for c in candidates if c.status == "done" and c.role != "base"]
        pending = sum(1 for c in candidates if c.status == "pending")
        best = max((c.objective_search or 0.0 for c in done), default=float("nan"))
        elapsed = time.perf_counter() - self.started
        rate = elapsed / self.finished if self.finished else 0.0
        line = (
            f"{len(candidates) - pending} done / {len(candidates)} planned · best {best:.4f} · "
            f"{elapsed:.0f} s elapsed · ETA of planned {rate * pending:.0f} s"
        )
        return Group(table, Text(line))


def evolve_command(
    config: Path,
    run_dir: Path,
    *,
    force: bool,
    threads: int,
    offline: bool,
    workers: int | None,
    ray: str | None,
    task_search_path: Sequence[Path],
) -> None:
    """Run an evolution (topk with kinship, greedy soup, CMA-ES recipe search); re-run to resume."""
    from .report import candidates_table
    from .run import evolve

    try:
        with LiveTable(err) as live:
            run = evolve(
                config,
                run_dir,
                force=force,
                reporter=live,
                offline=offline,
                threads=threads,
                workers=workers,
                ray=ray,
                task_search_path=task_search_path,
            )
    except MachineFault as fault:
        # Exit 1, not 2: nothing is wrong with the input; the run resumes once the machine is mended.
        print(f"error: {fault}; the run stopped with its candidates pending: mend it and run again", file=sys.stderr)
        raise typer.Exit(1) from fault
    out.print(candidates_table(run))
    best = run.best
    if best is not None:
        out.print(best_table(run, best))
    print(f"stopped: {run.stop_reason}")


def best_table(run: Run, best: Candidate) -> Table:
    """The best model against its parents and the base, on both splits (a split the evaluator
    cannot score is left empty, and the caption says why)."""
    from .report import not_scored_caption

    table = Table(title=f"best: {best.label} ({best.role})", caption=not_scored_caption(run), caption_justify="left")
    for column in ("model", "role", "search", "test"):
        table.add_column(column, justify="right" if column in ("search", "test") else "left")
    pool = [c for c in run.candidates if c.role == "pool" and c.objective_search is not None]
    top_pool = max(pool, key=lambda c: c.objective_search or 0.0, default=None)
    rows = [best, *(run.candidate(p) for p in best.parents)]
    rows += [c for c in (top_pool,) if c is not None and c not in rows]
    rows += [c for c in (run.base,) if c is not None]
    for c in rows:
        role = "best" if c.id == best.id else "parent" if c.id in best.parents else c.role
        role = "best of pool" if c is top_pool and c.id not in best.parents else role
        search = "" if c.objective_search is None else f"{c.objective_search:.4f}"
        test = "" if c.objective_test is None else f"{c.objective_test:.4f}"
        table.add_row(c.label, role, search, test)
    return table


def show_command(run_dir: Path, *, as_json: bool, plot: Path | None) -> None:
    """Every candidate of a run: parents, recipe, kinship, scores, status, time."""
    from .report import candidates_table, plot_progress
    from .run import open_run

    run = open_run(run_dir)
    if plot is not None:
        plot_progress(run, plot)
        print(f"wrote {plot}", file=sys.stderr)
    if as_json:
        print(json.dumps(run.to_dict(), indent=2))
        return
    out.print(candidates_table(run))
    print_faults(run)
    phase_best = run.ps_best_id
    if phase_best is not None:
        ps = run.candidate(phase_best)
        print(f"PS phase best: #{ps.id} search {_score(ps.objective_search)} test {_score(ps.objective_test)}")
        dfs = run.best
        if dfs is not None:
            print(f"DFS phase best: #{dfs.id} search {_score(dfs.objective_search)} test {_score(dfs.objective_test)}")
    if run.stop_reason:
        print(f"stopped: {run.stop_reason}")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_faults(run: Run) -> None:
    """The machine's faults the run met and the workers it replaced: never candidate failures."""
    for at, candidate, split, message in run.faults:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        where = f" (candidate #{candidate}, {split})" if candidate is not None else ""
        print(f"fault {when}: {message}{where}")
    if run.worker_restarts:
        print(f"worker processes restarted: {run.worker_restarts}")


def tree_command(run_dir: Path, *, plot: Path | None, as_json: bool) -> None:
    """The lineage: models as nodes (score), merges as edges (kinship)."""
    from rich.tree import Tree

    from .report import plot_tree
    from .run import open_run

    run = open_run(run_dir)
    if plot is not None:
        plot_tree(run, plot)
        print(f"wrote {plot}", file=sys.stderr)
    if as_json:
        print(json.dumps(run.tree(), indent=2))
        return
    children: dict[int, list[Candidate]] = {}
    for c in run.candidates:
        for p in c.parents:
            children.setdefault(p, []).append(c)

    def label(c: Candidate) -> str:
        score = "" if c.objective_search is None else f" {c.objective_search:.4f}"
        best = " [bold]best[/bold]" if c.id == run.best_id else ""
        name = c.label if c.reference is not None else f"#{c.id}"
        return f"{name} ({c.role}){score}{best}"

    root = Tree(f"{run.path} ({run.strategy})")
    shown: set[int] = set()

    def add(node: Tree, c: Candidate) -> None:
        branch = node.add(label(c))
        if c.id in shown:
            return
        shown.add(c.id)
        for child in children.get(c.id, []):
            add(branch, child)

    for c in run.candidates:
        if c.role == "pool":
            add(root, c)
    out.print(root)


def best_command(run_dir: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Write the run's best model with a card listing its whole lineage."""
    from .report import write_best
    from .run import open_run

    best = write_best(open_run(run_dir), out_dir, overwrite)
    print(f"wrote {out_dir} (candidate #{best.id}, search {best.objective_search:.4f})")

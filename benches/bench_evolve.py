"""Evolution on the bundled task family: what each strategy finds, with how many evaluations, and
what the engine costs beside the evaluator.

    python benches/bench_evolve.py [--out bench-data/evolve]

Runs, in one session on the shipped family (the shipped evaluator: numpy forward pass, exact match):
  - topk with kinship exploration and the kinship stop (the shipped evolve.yml),
  - the same without the kinship stop (what early stopping saved),
  - plain topk (no exploration, no kinship stop),
  - greedy soup (the shipped soup.yml), whose run also scores the uniform soup.
It prints every result on both splits beside the base and the fine-tunes, then the engine overhead
(wall time of a run minus the evaluator's own time: planning, merging, kinship, store) per candidate
and as a share of the evaluation time.

Then resident evaluation against evaluation by path, each run twice in the same session (add
``--resident-only`` to run just this part; lm-eval needs its extra, so run it with a Python that has
lm-eval, torch and transformers: ``PYTHONPATH=python PEER/bin/python benches/bench_evolve.py
--resident-only``):
  - the numpy evaluator on a CMA-ES search (bench_search's genome, 32 candidates),
  - lm-eval on the topk search of evolve-lmeval.yml (skipped, saying so, without lm-eval).
Then the data flow space (``--dfs-only`` for just this part): the parameter-space search (PS, CMA-ES
over per-layer task_arithmetic weights), the layer-path search (DFS) over the four fine-tunes (A: the
best fine-tune, ft-reverse) and PS+DFS (DFS over the PS phase's best and ft-reverse), each with its
evaluations, beside the base, the best fine-tune and the uniform soup.
For the resident rows: evaluations, the run's wall time, seconds per evaluation, the evaluation's own compute per
evaluation (lm-eval's ``evaluator.evaluate`` with the model and tasks ready; the numpy forward pass)
and the rest as a share of it, the overhead. Both modes must give the same best scores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import modelkin.evolve as evo  # noqa: E402
from modelkin.evolve.family import write_task_family  # noqa: E402


def run(config: dict[str, Any], run_dir: Path) -> tuple[evo.Run, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = evo.evolve(config, run_dir)
    return result, time.perf_counter() - start


def fmt(value: float | None) -> str:
    return "" if value is None else f"{100 * value:6.2f}"


@contextlib.contextmanager
def timing(module: str, owner: str, attr: str) -> Iterator[list[float]]:
    """Adds up the seconds spent in ``module.owner.attr`` (``owner`` "" for a module function)."""
    target: Any = importlib.import_module(module)
    if owner:
        target = getattr(target, owner)
    original = getattr(target, attr)
    spent = [0.0]

    def timed_call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(target, attr, timed_call)
    try:
        yield spent
    finally:
        setattr(target, attr, original)


def resident_section(out: Path, family: Path, written: dict[str, Path]) -> None:
    from bench_search import search_config  # this script's folder is on the path when it runs

    search = search_config(family, 32)
    variants: list[tuple[str, dict[str, Any], tuple[str, str, str]]] = [
        (
            "numpy evaluator, CMA-ES (32 candidates)",
            search,
            ("modelkin.evolve.family.forward", "LlamaModel", "generate"),
        ),
    ]
    try:
        import lm_eval  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        print(f"\nlm-eval rows skipped: {error} (run with a Python that has lm-eval, torch and transformers)")
    else:
        lmeval = yaml.safe_load(written["evolve-lmeval.yml"].read_text())
        lmeval["pool"] = [str(family / Path(p).name) for p in lmeval["pool"]]
        lmeval["base_model"] = str(family / "base")
        lmeval["evaluator"]["lm_eval"]["include_path"] = str(family / "lm_eval_tasks")
        variants.append(("lm-eval, topk (evolve-lmeval.yml)", lmeval, ("lm_eval.evaluator", "", "evaluate")))
    print("\nresident evaluation vs evaluation by path (one session; s = seconds; an evaluation = one split of one")
    print("candidate: its merge, hand-over and evaluation; the first one also starts the evaluator: shown apart)")
    print(
        f"{'run':40s} {'mode':9s} {'evals':>5s} {'wall s':>7s} {'first s':>7s} {'s/eval':>7s} {'compute':>7s}"
        f" {'overhead':>8s}  best search/test"
    )
    for name, config, inner in variants:
        for resident in (False, True):
            evaluator = {**config["evaluator"], "resident": resident}
            with timing(*inner) as compute, jobs_timed(compute) as jobs:
                result, wall = run({**config, "evaluator": evaluator}, out / f"resident-{resident}-{len(name)}")
            best = result.best
            assert best is not None
            (first, _), rest = jobs[0], jobs[1:]
            job_s = sum(j for j, _ in rest) / len(rest)
            compute_s = sum(c for _, c in rest) / len(rest)
            mode = "resident" if resident else "by path"
            scores = f"{fmt(best.objective_search)}/{fmt(best.objective_test)}"
            print(
                f"{name:40s} {mode:9s} {len(jobs):>5d} {wall:7.2f} {first:7.2f} {job_s:7.3f} {compute_s:7.3f}"
                f" {100 * (job_s - compute_s) / compute_s:7.1f}%  {scores}"
            )


@contextlib.contextmanager
def jobs_timed(compute: list[float]) -> Iterator[list[tuple[float, float]]]:
    """(seconds, of which evaluation compute) of every job the run's in-process executor runs."""
    from modelkin.evolve import executors

    original = executors.run_job
    jobs: list[tuple[float, float]] = []

    def timed_job(*args: Any, **kwargs: Any) -> Any:
        start, before = time.perf_counter(), compute[0]
        try:
            return original(*args, **kwargs)
        finally:
            jobs.append((time.perf_counter() - start, compute[0] - before))

    executors.run_job = timed_job  # type: ignore[assignment]
    try:
        yield jobs
    finally:
        executors.run_job = original


def dfs_section(out: Path, family: Path, soup: evo.Run | None) -> None:
    fine_tunes = [str(family / m) for m in ("ft-reverse", "ft-sort", "ft-shift", "ft-swap")]
    evaluator = {"python": "modelkin.evolve.family:evaluate", "resident": True}
    from bench_search import search_config

    genome = search_config(family, 100)["genome"]
    dfs = {"repeats": 3, "scaling": "matrix", "scale": "residual"}
    variants = {
        "PS (CMA-ES, task_arithmetic per layer)": {
            "strategy": "cmaes",
            "genome": genome,
            "cmaes": {"sigma0": 1 / 6, "max_evals": 100, "seed": 0},
            "evaluator": evaluator,
        },
        "DFS (4 fine-tunes, A = ft-reverse)": {
            "strategy": "dfs",
            "base_model": str(family / "base"),
            "dfs": {**dfs, "models": fine_tunes},
            "cmaes": {"sigma0": 1 / 6, "max_evals": 100, "seed": 0},
            "evaluator": evaluator,
        },
        "PS+DFS (DFS over PS's best and ft-reverse)": {
            "strategy": "ps+dfs",
            "genome": genome,
            "dfs": {**dfs, "models": ["ps", fine_tunes[0]]},
            "cmaes": {"sigma0": 1 / 6, "max_evals": 100, "dfs_max_evals": 100, "seed": 0},
            "evaluator": evaluator,
        },
    }
    results = {name: run(config, out / f"dfs{i}") for i, (name, config) in enumerate(variants.items())}
    first = next(iter(results.values()))[0]
    print("\nparameter space and data flow space, % exact match, bundled task family")
    print(f"{'model':44s} {'evals':>5s} {'search':>7s} {'test':>7s}  {'layers':>6s}  wall s")
    base = first.base
    assert base is not None
    print(f"{'base':44s} {'':>5s} {fmt(base.objective_search):>7s} {fmt(base.objective_test):>7s}")
    pool = [c for c in first.candidates if c.role == "pool"]
    for split in ("search", "test"):
        top = max(pool, key=lambda c: (c.objective_search if split == "search" else c.objective_test) or 0.0)
        value = top.objective_search if split == "search" else top.objective_test
        print(f"{'best fine-tune on ' + split + ' (' + top.label + ')':44s} {'':>5s}", end="")
        print(f" {fmt(value) if split == 'search' else '':>7s} {fmt(value) if split == 'test' else '':>7s}")
    if soup is not None:
        uniform = next(c for c in soup.candidates if c.role == "uniform_soup")
        print(f"{'uniform soup':44s} {1:>5d} {fmt(uniform.objective_search):>7s} {fmt(uniform.objective_test):>7s}")
    for name, (result, wall) in results.items():
        best = result.best
        assert best is not None
        evals = sum(1 for c in result.candidates if c.role in ("search", "dfs"))
        layers = len(best.hops) if best.hops else 2
        print(
            f"{name:44s} {evals:>5d} {fmt(best.objective_search):>7s} {fmt(best.objective_test):>7s}"
            f"  {layers:>6d}  {wall:6.1f}"
        )
        if result.strategy == "ps+dfs":
            ps = result.candidate(result.ps_best_id or best.id)
            print(f"{'  its PS phase best':44s} {'':>5s} {fmt(ps.objective_search):>7s} {fmt(ps.objective_test):>7s}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "bench-data" / "evolve")
    parser.add_argument("--resident-only", action="store_true", help="only resident evaluation vs by path")
    parser.add_argument("--dfs-only", action="store_true", help="only PS, DFS and PS+DFS")
    args = parser.parse_args()
    family = args.out / "family"
    shutil.rmtree(family, ignore_errors=True)
    written = write_task_family(family)
    if args.resident_only:
        resident_section(args.out, family, written)
        return
    if args.dfs_only:
        soup_config = yaml.safe_load(written["soup.yml"].read_text())
        soup_config["pool"] = [str(family / Path(p).name) for p in soup_config["pool"]]
        soup_config["base_model"] = str(family / "base")
        dfs_section(args.out, family, run(soup_config, args.out / "dfs-soup")[0])
        return
    topk = yaml.safe_load(written["evolve.yml"].read_text())
    soup = yaml.safe_load(written["soup.yml"].read_text())
    for config in (topk, soup):
        config["pool"] = [str(family / Path(p).name) for p in config["pool"]]
        config["base_model"] = str(family / "base")
    variants = {
        "topk + kinship explore, stop 0.9": topk,
        "topk + kinship explore, no stop": {**topk, "topk": {**topk["topk"], "stop_kinship": None}},
        "plain topk (no explore, no stop)": {
            **topk,
            "topk": {**topk["topk"], "explore": "none", "stop_kinship": None},
        },
        "greedy soup": soup,
    }
    results = {name: run(config, args.out / f"run{i}") for i, (name, config) in enumerate(variants.items())}

    first = next(iter(results.values()))[0]
    print("\nheld-out (test) and search task means, % exact match, bundled task family")
    print(f"{'model':42s} {'evals':>5s} {'search':>7s} {'test':>7s}  stop")
    base = first.base
    print(f"{'base':42s} {'':>5s} {fmt(base.objective_search):>7s} {fmt(base.objective_test):>7s}")
    for c in first.candidates:
        if c.role == "pool":
            print(f"{c.label:42s} {'':>5s} {fmt(c.objective_search):>7s} {fmt(c.objective_test):>7s}")
    soup_run = results["greedy soup"][0]
    uniform = next(c for c in soup_run.candidates if c.role == "uniform_soup")
    print(f"{'uniform soup':42s} {1:>5d} {fmt(uniform.objective_search):>7s} {fmt(uniform.objective_test):>7s}")
    for name, (result, _) in results.items():
        best = result.best
        assert best is not None
        evals = sum(1 for c in result.candidates if c.role not in ("base", "pool"))
        print(
            f"{name:42s} {evals:>5d} {fmt(best.objective_search):>7s} {fmt(best.objective_test):>7s}"
            f"  {result.stop_reason}"
        )
    stop, no_stop = results["topk + kinship explore, stop 0.9"][0], results["topk + kinship explore, no stop"][0]
    n_stop = sum(1 for c in stop.candidates if c.recipe is not None)
    n_all = sum(1 for c in no_stop.candidates if c.recipe is not None)
    print(
        f"\nkinship stop saved {n_all - n_stop} of {n_all} merges+evaluations ({100 * (n_all - n_stop) / n_all:.0f}%);"
        f" best test {fmt(stop.best.objective_test if stop.best else None)} vs"
        f" {fmt(no_stop.best.objective_test if no_stop.best else None)} without it"
    )

    print("\nengine overhead (run wall time minus the evaluator's time) per candidate")
    print(f"{'run':42s} {'cands':>5s} {'eval s':>7s} {'engine s':>8s} {'per cand':>8s} {'share':>6s}")
    for name, (result, wall) in results.items():
        evaluation = sum(c.eval_s or 0.0 for c in result.candidates)
        engine = wall - evaluation
        n = len(result.candidates)
        print(f"{name:42s} {n:>5d} {evaluation:7.2f} {engine:8.3f} {engine / n:8.4f} {100 * engine / evaluation:5.1f}%")
    dfs_section(args.out, family, soup_run)
    resident_section(args.out, family, written)


if __name__ == "__main__":
    main()

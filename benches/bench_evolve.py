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
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "bench-data" / "evolve")
    args = parser.parse_args()
    family = args.out / "family"
    shutil.rmtree(family, ignore_errors=True)
    written = write_task_family(family)
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


if __name__ == "__main__":
    main()

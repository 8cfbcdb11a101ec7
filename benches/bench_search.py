"""CMA-ES recipe search on the bundled task family, and parallel evaluation throughput.

    python benches/bench_search.py [--out bench-data/search] [--budget 200] [--rounds 3]

1. Search: CMA-ES over per-layer task_arithmetic weights (layer_granularity 1: 2 layers x 4 models =
   8 genes, popsize 10) with a budget of evaluations; prints the best recipe's score (search split
   and held-out test split) against evaluations used, beside the base, the best fine-tune, the
   uniform soup, the greedy soup and topk with kinship (run here too, on the same family).
2. Throughput: the same search as whole `modelkin evolve` processes with one worker (BLAS on both
   cores, and on one core: an evaluator that is single-threaded, the case parallel workers are for),
   two local worker processes (one core each) and Ray (a running local head with two CPUs), in rounds
   that alternate the modes so the VM's drift hits all alike; prints evaluations per minute, the
   medians of the per-round ratios, and the engine's share of the worker time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import modelkin.evolve as evo  # noqa: E402
from modelkin.evolve.family import write_task_family  # noqa: E402


def search_config(family: Path, budget: int) -> dict[str, Any]:
    return {
        "strategy": "cmaes",
        "genome": {
            "models": [str(family / m) for m in ("ft-reverse", "ft-sort", "ft-shift", "ft-swap")],
            "base_model": str(family / "base"),
            "merge_method": "task_arithmetic",
            "layer_granularity": 1,
            "dtype": "float32",
        },
        "cmaes": {"sigma0": 1 / 6, "max_evals": budget, "seed": 0},
        "evaluator": {"python": "modelkin.evolve.family:evaluate"},
    }


def timed(config: dict[str, Any], run_dir: Path, **kw: Any) -> tuple[evo.Run, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    run = evo.evolve(config, run_dir, **kw)
    return run, time.perf_counter() - start


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "bench-data" / "search")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--throughput-budget", type=int, default=100)
    parser.add_argument("--throughput-only", action="store_true")
    args = parser.parse_args()
    family = args.out / "family"
    shutil.rmtree(family, ignore_errors=True)
    written = write_task_family(family)
    if args.throughput_only:
        throughput(args, family)
        return

    # 1. What the search finds, against the other strategies on the same family.
    search, _ = timed(search_config(family, args.budget), args.out / "cmaes", workers=2)
    others = {}
    for name in ("evolve.yml", "soup.yml"):
        config = yaml.safe_load(written[name].read_text())
        config["pool"] = [str(family / Path(p).name) for p in config["pool"]]
        config["base_model"] = str(family / "base")
        others[name], _ = timed(config, args.out / name.removesuffix(".yml"))
    soup = others["soup.yml"]
    uniform = next(c for c in soup.candidates if c.role == "uniform_soup")
    pool = [c for c in search.candidates if c.role == "pool"]
    best_single = max(pool, key=lambda c: c.objective_search or 0.0)
    print("\nbundled task family, % exact match (search split drives selection, test is held out)")
    print(f"{'model':40s} {'evals':>6s} {'search':>7s} {'test':>7s}")
    rows = [
        ("base", search.base, None),
        (f"best fine-tune ({best_single.label})", best_single, None),
        ("uniform soup", uniform, 1),
        ("greedy soup", soup.best, sum(1 for c in soup.candidates if c.recipe is not None)),
        (
            "topk + kinship exploration",
            others["evolve.yml"].best,
            sum(1 for c in others["evolve.yml"].candidates if c.recipe is not None),
        ),
        ("CMA-ES task_arithmetic per layer", search.best, sum(1 for c in search.candidates if c.role == "search")),
    ]
    for name, c, evals in rows:
        assert c is not None
        print(
            f"{name:40s} {'' if evals is None else evals:>6} {pct(c.objective_search):>7s} {pct(c.objective_test):>7s}"
        )
    print("\nCMA-ES best-so-far (search split) against evaluations used")
    best = -1.0
    marks = []
    for i, c in enumerate((c for c in search.candidates if c.role == "search"), start=1):
        if c.objective_search is not None and c.objective_search > best:
            best = c.objective_search
            marks.append((i, best))
    print("  " + ", ".join(f"{n}: {pct(v).strip()}" for n, v in marks))

    # 2. Throughput: each mode a real `modelkin evolve` process, the modes alternating in rounds.
    if args.rounds > 0:  # --rounds 0: the search's scores only
        throughput(args, family)


def throughput(args: argparse.Namespace, family: Path) -> None:
    config_path = args.out / "throughput.yml"
    config_path.write_text(yaml.safe_dump(search_config(family, args.throughput_budget)))
    one_thread = dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # A running cluster, as `--ray ADDRESS` expects: its start-up is not part of any search.
    subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            "--port=6390",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    modes: dict[str, tuple[list[str], dict[str, str]]] = {
        "1 worker, BLAS on 2 cores": ([], {}),
        "1 worker, BLAS on 1 core": ([], one_thread),
        "2 local workers": (["--workers", "2"], {}),
        "Ray, 2 CPUs": (["--ray", "127.0.0.1:6390"], {}),
    }
    rates: dict[str, list[float]] = {m: [] for m in modes}
    shares: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for r in range(args.rounds):
            for i, (mode, (flags, extra)) in enumerate(modes.items()):
                run_dir = args.out / f"tp-{r}-{i}"
                shutil.rmtree(run_dir, ignore_errors=True)
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "modelkin", "evolve", str(config_path), str(run_dir), *flags],
                    check=True,
                    capture_output=True,
                    env={**env, **extra},
                )
                wall = time.perf_counter() - start
                run = evo.open_run(run_dir)
                evaluations = sum(len(c.scores) for c in run.candidates)
                evaluation_s = sum(c.eval_s or 0.0 for c in run.candidates)
                rates[mode].append(60 * evaluations / wall)
                workers = 1 if mode.startswith("1 worker") else 2
                # Engine overhead: the worker time not spent evaluating (start-up, merges, store).
                shares[mode].append((wall * workers - evaluation_s) / evaluation_s)
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env)
    budget = args.throughput_budget
    print(f"\nthroughput: {budget}-evaluation searches (+ base and pool), whole `modelkin evolve` processes,")
    print(f"{args.rounds} rounds alternating the modes; ratios are medians of per-round ratios")
    reference = "1 worker, BLAS on 1 core"
    print(
        f"{'mode':26s} {'evals/min per round':24s} {'median':>7s} {'vs 1 core':>9s} {'vs 2 cores':>10s} {'engine':>7s}"
    )
    for mode in modes:
        per_round = ", ".join(f"{v:.0f}" for v in rates[mode])
        print(
            f"{mode:26s} {per_round:24s} {statistics.median(rates[mode]):7.1f} {ratio(rates, mode, reference):8.2f}x "
            f"{ratio(rates, mode, '1 worker, BLAS on 2 cores'):9.2f}x {100 * statistics.median(shares[mode]):6.1f}%"
        )


def ratio(rates: dict[str, list[float]], mode: str, base: str) -> float:
    """The median of the per-round ratios of ``mode`` against ``base``."""
    return statistics.median(a / b for a, b in zip(rates[mode], rates[base], strict=True))


if __name__ == "__main__":
    main()

"""Many candidates from one process: in-memory merges as an evolution makes them.

    python benches/bench_library.py [--calls 50] [--rounds 3]

Writes the bundled example family (`modelkin example`), then makes ``--calls`` in-memory linear
merges of its four fine-tunes from one process, the weights varied per call, each planned from a
dict (`modelkin.plan`) and merged (`modelkin.merge(plan)`). It prints the whole time and its two
parts: the engine's tensor work (statistics, merging, writing into memory; reported by the engine)
and everything else (planning, validation, opening files, building results). The target is at most
50% outside the engine. It also counts the engine's worker threads before and after with a fixed
``threads`` value: one pool per process, none built per call.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import modelkin  # noqa: E402
from modelkin import example  # noqa: E402
from modelkin.merge import merging  # noqa: E402

# math-b adds tokens (another vocabulary size), which a linear merge refuses.
MODELS = ("math-a", "code", "math-code")


def engine_threads() -> int:
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return sum(name.startswith("modelkin-") for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-library-") as tmp:
        family = Path(tmp) / "family"
        example.write_example_family(family)
        tensor_seconds: list[float] = []
        original = merging.run_merge

        def timed(job, **kwargs):  # type: ignore[no-untyped-def]
            outcome = original(job, **kwargs)
            tensor_seconds.append(outcome.tensor_seconds)
            return outcome

        merging.run_merge = timed  # type: ignore[assignment]
        recipe = {
            "models": [{"model": str(family / m), "parameters": {"weight": 1.0}} for m in MODELS],
            "merge_method": "linear",
            "dtype": "float32",
        }
        size = 0
        totals, engines = [], []
        before = engine_threads()
        for _ in range(args.rounds):
            tensor_seconds.clear()
            start = time.perf_counter()
            for call in range(args.calls):
                for i, model in enumerate(recipe["models"]):
                    model["parameters"]["weight"] = 0.5 + ((call * 7 + i * 3) % 11) / 10
                merged = modelkin.merge(modelkin.plan(recipe), threads=args.threads)
                size = merged.nbytes
            totals.append(time.perf_counter() - start)
            engines.append(sum(tensor_seconds))
        after = engine_threads()
    total, engine = statistics.median(totals), statistics.median(engines)
    print(f"# {args.calls} in-memory linear merges of 3 models ({size / 1e6:.2f} MB each), one process")
    print(f"whole            {total:8.3f} s   {total / args.calls * 1e3:7.2f} ms per call  (median of {args.rounds})")
    print(f"engine tensors   {engine:8.3f} s   {engine / args.calls * 1e3:7.2f} ms per call")
    outside = total - engine
    per_call = outside / args.calls * 1e3
    print(f"outside engine   {outside:8.3f} s   {per_call:7.2f} ms per call   share {outside / total:6.1%}")
    print(f"engine threads   {before} before, {after} after {args.rounds * args.calls} calls (threads={args.threads})")


if __name__ == "__main__":
    main()

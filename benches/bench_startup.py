"""Start-up cost of the package and the command line: medians over fresh interpreters.

    python benches/bench_startup.py [--repeats 7] [--pair DIR] [--modelkin DIR] [--compile]

Prints, in one run:
  imports    `import numpy`, `import modelkin`, `import modelkin.cli`, each timed inside a fresh
             interpreter (the import statement alone: wall and CPU time), with the modules it
             leaves loaded, and the difference to `import numpy`
  processes  the wall and CPU time of `python -c pass`, of a process that only imports
             `modelkin.cli`, and of `modelkin --help`
  kinship    `modelkin kinship A B --base C --json` as a subprocess against `modelkin.kinship(...)`
             called in this process (bench_kinship's "CLI minus Python API"), and against a fresh
             process that imports modelkin and calls the API, on the bundled example family
             (written to a temporary directory)
  breakdown  where the CLI kinship process's time goes: the interpreter's start, each import, the
             command itself (typer's parsing, the pass, the JSON) and the interpreter's exit
With `--pair DIR` (a bench_kinship family: base.safetensors, ft0.safetensors, ft1.safetensors) the
kinship rows are repeated on it. The subprocesses run with their bytecode cached (under a
temporary PYTHONPYCACHEPREFIX), as an installed package's; `--compile` makes them compile the
sources at every start instead (PYTHONDONTWRITEBYTECODE). CPU times are the subprocesses' user +
system time, steadier than wall time on a shared machine. Rounds alternate the measurements, so a
drift in the machine's speed moves every column alike. `--modelkin DIR` imports modelkin from DIR
instead of this checkout's python/, for A/B runs against another tree.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from package_dir import PACKAGE_DIR  # puts PACKAGE_DIR first on sys.path

# The subprocesses read and write their bytecode under a temporary prefix (out of the tree), as an
# installed package has its .pyc files: with PYTHONDONTWRITEBYTECODE set, every start would compile
# the package's sources again. `--compile` measures that instead.
PYCACHE = tempfile.TemporaryDirectory(prefix="bench-startup-pycache-")
ENV = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR), "PYTHONPYCACHEPREFIX": PYCACHE.name}
ENV.pop("PYTHONDONTWRITEBYTECODE", None)

IMPORT_TIMER = (
    "import sys, time; t = time.perf_counter(); c = time.process_time(); import {module}; "
    "print(time.perf_counter() - t, time.process_time() - c, len(sys.modules))"
)

# The CLI kinship process, phase by phase (argv: A B BASE). Clocks: time.time() against the parent's
# for the interpreter's start and exit, perf_counter within.
BREAKDOWN = textwrap.dedent("""
    import time
    started = time.time()
    import sys
    phases = {}
    def phase(name, stmt):
        t = time.perf_counter()
        exec(stmt, globals())
        phases[name] = time.perf_counter() - t
    a, b, base = sys.argv[1:4]
    phase("import modelkin.cli (typer)", "import modelkin.cli as cli")
    phase("typer builds the command tree", "import typer.main; typer.main.get_command(cli.app)")
    phase("pydantic (typer's value coercion)", "import typer._adapters")
    phase("modelkin.kinship.measure (no numpy)", "import modelkin.kinship.measure")
    import contextlib, io
    sys.argv = ["modelkin", "kinship", a, b, "--base", base, "--json"]
    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main()
            except SystemExit:
                pass
    phase("the command (all imported)", "run()")
    from modelkin.kinship.measure import kinship
    phase("  of which the API call", "kinship(a, b, base=base)")
    print(repr((started, phases, time.time())))
""")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def import_seconds(module: str) -> tuple[float, float, int]:
    """The `import module` statement's wall and CPU time in a fresh interpreter, and the modules
    then loaded."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_TIMER.format(module=module)], env=ENV, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def process_seconds(args: list[str]) -> tuple[float, float]:
    """The wall and CPU time of a subprocess of this interpreter (`python ARGS`), output discarded."""
    cpu = children_cpu()
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, children_cpu() - cpu


Sample = tuple[float, float]  # wall, CPU


def rounds(measure: dict[str, Callable[[], Sample]], repeats: int) -> dict[str, list[Sample]]:
    """Every measurement once untimed, then `repeats` rounds alternating them."""
    for fn in measure.values():
        fn()
    columns: dict[str, list[Sample]] = {name: [] for name in measure}
    for _ in range(repeats):
        for name, fn in measure.items():
            columns[name].append(fn())
    return columns


def median(samples: list[Sample], which: int) -> float:
    return statistics.median(s[which] for s in samples)


def median_difference(a: list[Sample], b: list[Sample], which: int) -> float:
    return statistics.median(x[which] - y[which] for x, y in zip(a, b, strict=True))


def both(samples: list[Sample]) -> str:
    return f"{median(samples, 0):7.3f} s {median(samples, 1):7.3f} s"


def both_differences(a: list[Sample], b: list[Sample]) -> str:
    return f"{median_difference(a, b, 0):+7.3f} s {median_difference(a, b, 1):+7.3f} s"


def kinship_rows(label: str, a: Path, b: Path, base: Path, repeats: int, numpy_import: float) -> None:
    import modelkin

    cli = ["-m", "modelkin", "kinship", str(a), str(b), "--base", str(base), "--json"]
    api_process = f"import modelkin; modelkin.kinship({str(a)!r}, {str(b)!r}, base={str(base)!r})"

    def api() -> Sample:
        start, cpu = time.perf_counter(), time.process_time()
        modelkin.kinship(a, b, base=base)
        return time.perf_counter() - start, time.process_time() - cpu

    columns = rounds(
        {
            "api": api,
            "cli": lambda: process_seconds(cli),
            "api_process": lambda: process_seconds(["-c", api_process]),
        },
        repeats,
    )
    print(f"# kinship on {label} (wall, CPU)")
    print(f"{'modelkin.kinship (in process)':38s} {both(columns['api'])}")
    print(f"{'python -c import modelkin; kinship':38s} {both(columns['api_process'])}")
    print(f"{'modelkin kinship --json (CLI)':38s} {both(columns['cli'])}")
    over = median_difference(columns["cli"], columns["api"], 0)
    print(
        f"{'CLI minus Python API':38s} {both_differences(columns['cli'], columns['api'])}   "
        f"= {over / numpy_import:4.1f} x `import numpy`"
    )
    print(f"{'CLI minus the API in its own process':38s} {both_differences(columns['cli'], columns['api_process'])}")


def breakdown_rows(a: Path, b: Path, base: Path, repeats: int) -> None:
    runs = []
    for _ in range(repeats + 1):  # the first untimed
        start = time.time()
        out = subprocess.run(
            [sys.executable, "-c", BREAKDOWN, str(a), str(b), str(base)],
            env=ENV,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        end = time.time()
        started, phases, finished = ast.literal_eval(out.strip().splitlines()[-1])
        runs.append({"interpreter start": started - start, **phases, "interpreter exit": end - finished})
    runs = runs[1:]
    print("# where the CLI kinship process's time goes (wall, medians; phases in the order they run)")
    for name in runs[0]:
        print(f"{name:42s} {statistics.median(r[name] for r in runs):7.3f} s")
    total = statistics.median(sum(v for k, v in r.items() if not k.startswith(" ")) for r in runs)
    print(f"{'sum':42s} {total:7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pair", type=Path, help="also time kinship on this bench_kinship pair family")
    parser.add_argument("--modelkin", type=Path, help="import modelkin from this directory (A/B runs)")
    parser.add_argument("--compile", action="store_true", help="no bytecode cache: compile the sources every start")
    args = parser.parse_args()
    if args.compile:
        ENV.pop("PYTHONPYCACHEPREFIX")
        ENV["PYTHONDONTWRITEBYTECODE"] = "1"
    cache = "sources compiled every start" if args.compile else "bytecode cached"
    print(f"modelkin from {PACKAGE_DIR}; {os.cpu_count()} cores; {cache}; {args.repeats} rounds, medians")

    modules = ("numpy", "modelkin", "modelkin.cli")
    loaded: dict[str, int] = {}

    def timed_import(module: str) -> Sample:
        wall, cpu, loaded[module] = import_seconds(module)
        return wall, cpu

    processes = {
        "python -c pass": ["-c", "pass"],
        "python -c 'import modelkin.cli'": ["-c", "import modelkin.cli"],
        "modelkin --help": ["-m", "modelkin", "--help"],
    }
    columns = rounds(
        {
            **{module: functools.partial(timed_import, module) for module in modules},
            **{name: functools.partial(process_seconds, command) for name, command in processes.items()},
        },
        args.repeats,
    )
    print("# imports, in process (fresh interpreters; wall, CPU)")
    for module in modules:
        print(
            f"import {module:13s} {both(columns[module])}  {loaded[module]:4d} modules   "
            f"minus numpy {both_differences(columns[module], columns['numpy'])}"
        )
    print("# processes (wall, CPU)")
    for name in processes:
        print(f"{name:32s} {both(columns[name])}")

    from modelkin.example import write_example_family

    numpy_import = median(columns["numpy"], 0)
    with tempfile.TemporaryDirectory() as tmp:
        family = write_example_family(Path(tmp) / "family")
        a, b, base = family["math-a"], family["math-b"], family["base"]
        kinship_rows("the example family", a, b, base, args.repeats, numpy_import)
        breakdown_rows(a, b, base, args.repeats)
    if args.pair is not None:
        pair = args.pair
        kinship_rows(
            str(pair),
            pair / "ft0.safetensors",
            pair / "ft1.safetensors",
            pair / "base.safetensors",
            args.repeats,
            numpy_import,
        )


if __name__ == "__main__":
    main()

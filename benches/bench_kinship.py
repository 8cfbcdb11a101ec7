"""Kinship pass benchmarks: medians and ratios against baselines measured in the same run.

    python benches/bench_kinship.py [--params 1e9] [--dtype bf16] [--matrix-params 2.5e8] [--repeats 3]

Generates a Llama-shaped family (base + fine-tunes, bf16 unless --dtype says otherwise) under
bench-data/, then measures, for one pair of fine-tunes against their base:
  floor      reading every input byte once from the page cache on all cores (rust example read_floor)
  reference  the pair kernel alone swept over the three mappings on all cores, no pass around it
             (rust example reference_loop): the plain float64 loop that shows the floor is reachable
  python     `modelkin.kinship(...)` (the Rust pass), and its peak anonymous RSS
  cli        `modelkin kinship A B --base C --json`, timed as a subprocess (interpreter start-up,
             imports and the pass)
  torch      a float64 torch streaming loop (safetensors safe_open + .double()), when torch is installed
and `kinship_matrix` over 8 fine-tunes against a single pair's pass, on a smaller family, and over 4 of
them against the floor of reading their five models.
Rounds alternate the measurements, so a drift in the machine's speed shows in every column alike.
`--modelkin DIR` imports modelkin (and runs the CLI) from DIR instead of this checkout's python/,
for A/B runs against another build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

# Where modelkin is imported from (and the CLI run from): this checkout, or --modelkin DIR.
from package_dir import PACKAGE_DIR, ROOT  # puts PACKAGE_DIR first on sys.path

from modelkin.example import llama_shapes as llama_layout
from modelkin.io.safetensors import bf16_bits


def llama_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """A Llama-like layout (hidden h, 3.5h MLP, 32k vocab) with about ``params`` parameters."""
    vocab = 32000
    for hidden in range(256, 8192, 128):
        layers = max(2, round((params - 2 * vocab * hidden) / (12.5 * hidden * hidden)))
        if 12.5 * hidden * hidden * layers + 2 * vocab * hidden >= params * 0.97 and layers <= 4 * hidden // 128:
            break
    return llama_layout(hidden, int(hidden * 3.5), layers, vocab, kv=hidden)


DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4), "f8_e4m3": ("F8_E4M3", 1)}


def stored(values: np.ndarray, dtype: str) -> bytes:
    """``values`` (float32) as the little-endian bytes of ``dtype``."""
    if dtype == "bf16":
        return bf16_bits(values).tobytes()
    if dtype == "f16":
        return values.astype("<f2").tobytes()
    if dtype == "f32":
        return values.astype("<f4").tobytes()
    # FP8 E4M3 by hand (numpy has no fp8): the f16 bits rebiased by 2^8, mantissa cut to 3 bits
    # (truncated: these are benchmark values, not a conversion anyone relies on).
    bits = (values.astype(np.float32) / np.float32(256)).astype("<f2").view(np.uint16)
    sign = (bits >> 8) & 0x80
    magnitude = np.minimum((bits & 0x7FFF) >> 7, 0x7E)
    return (sign | magnitude).astype(np.uint8).tobytes()


def write_streamed(
    path: Path, shapes: dict[str, tuple[int, ...]], seed: int, base_seed: int | None, dtype: str = "bf16"
) -> None:
    """Writes one safetensors file of ``dtype`` tensor by tensor (bounded memory): the base's
    values (from ``base_seed``) plus, for a fine-tune, a delta from ``seed``."""
    header, offset = {}, 0
    name_of, size = DTYPES[dtype]
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": name_of, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for t, shape in enumerate(shapes.values()):
            base = np.random.default_rng((base_seed if base_seed is not None else seed, t))
            values = base.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if base_seed is not None:
                task = np.random.default_rng((1000, t)).standard_normal(shape, dtype=np.float32)
                own = np.random.default_rng((seed, t)).standard_normal(shape, dtype=np.float32)
                values += np.float32(0.001) * task + np.float32(0.002) * own
            out.write(stored(values, dtype))


def family(directory: Path, params: float, fine_tunes: int, dtype: str = "bf16") -> tuple[Path, list[Path]]:
    shapes = llama_shapes(params)
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / "base.safetensors"
    paths = [directory / f"ft{i}.safetensors" for i in range(fine_tunes)]
    for seed, path in enumerate([base, *paths]):
        if not path.exists():
            print(f"  generating {path} ...", file=sys.stderr, flush=True)
            tmp = path.with_suffix(".tmp")
            write_streamed(tmp, shapes, seed, None if path == base else 0, dtype)
            tmp.rename(path)
    return base, paths


def warm(paths: list[Path]) -> None:
    """Leaves every file in the page cache in the same state on every run: dropped first (the
    kernel drops a file's clean, unmapped pages on request), then read back once. Otherwise the
    cache keeps whatever last filled it, e.g. the small folios left by writing the files, and the
    cost of mapping them (which every pass and the floor pay per byte) varies from run to run."""
    for p in paths:
        with open(p, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while f.read(1 << 24):
                pass


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_examples() -> None:
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--example", "read_floor", "--example", "reference_loop"],
        cwd=ROOT,
        check=True,
    )


def example_seconds(name: str, args: list[str]) -> float:
    """One run of a rust example that prints ``bytes seconds ...``."""
    exe = ROOT / "target" / "release" / "examples" / name
    return float(subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout.split()[1])


def floor_seconds(files: list[str]) -> tuple[float, float]:
    """The floor's (read, read + unmapping) seconds in one run of ``read_floor``."""
    exe = ROOT / "target" / "release" / "examples" / "read_floor"
    fields = subprocess.run([exe, *files], capture_output=True, text=True, check=True).stdout.split()
    return float(fields[1]), float(fields[3])


def cli_seconds(a: Path, b: Path, base: Path) -> float:
    """`modelkin kinship A B --base C --json` as a subprocess, from the imported package."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR)}
    command = [sys.executable, "-m", "modelkin", "kinship", str(a), str(b), "--base", str(base), "--json"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_anon_rss_mb(code: str) -> float:
    """Runs ``code`` in a fresh interpreter and samples its RssAnon every 5 ms."""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(PACKAGE_DIR)})
    peak = 0

    def sample() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    proc.wait()
    thread.join()
    return peak / 1024


TORCH_LOOP = textwrap.dedent("""
    import torch
    from safetensors import safe_open
    def torch_kinship(a, b, z):
        n = sa = sb = saa = sbb = sab = sd = 0.0
        with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb, safe_open(z, "pt") as fz:
            for name in fz.keys():
                base = fz.get_tensor(name).double()
                da = fa.get_tensor(name).double() - base
                db = fb.get_tensor(name).double() - base
                n += da.numel(); sa += da.sum().item(); sb += db.sum().item()
                saa += (da * da).sum().item(); sbb += (db * db).sum().item(); sab += (da * db).sum().item()
                sd += ((da - db) ** 2).sum().item()
        cov = sab / n - sa / n * sb / n
        return cov / ((saa / n - (sa / n) ** 2) * (sbb / n - (sb / n) ** 2)) ** 0.5
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9, help="parameters per model of the pair family")
    parser.add_argument("--matrix-params", type=float, default=2.5e8, help="parameters per model, matrix family")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored dtype of the pair family")
    parser.add_argument("--modelkin", type=Path, help="import modelkin from this directory (A/B runs)")
    parser.add_argument("--no-matrix", action="store_true", help="skip the matrix family")
    args = parser.parse_args()

    import modelkin

    print(f"# pair family: ~{args.params:.3g} parameters per model, {args.dtype}", flush=True)
    suffix = "" if args.dtype == "bf16" else f"-{args.dtype}"
    base, fts = family(args.data / f"pair-{args.params:.0e}{suffix}", args.params, 2, args.dtype)
    files = [base, *fts]
    warm(files)
    build_examples()
    size_gb = sum(p.stat().st_size for p in files) / 1e9
    print(f"modelkin from {PACKAGE_DIR}; {os.cpu_count()} cores")
    # Rounds alternate every measurement (after one untimed pass of each), so a drift in the
    # machine's speed moves every column alike; medians over the rounds.
    columns: dict[str, list[float]] = {"floor": [], "unmap": [], "reference": [], "python": [], "cli": []}

    def floor() -> float:
        read, with_unmap = floor_seconds([str(p) for p in files])
        columns["unmap"].append(with_unmap)
        return read

    measure = {
        "floor": floor,
        "reference": lambda: example_seconds(
            "reference_loop", [str(fts[0]), str(fts[1]), str(base), "--dtype", args.dtype]
        ),
        "python": lambda: median_time(lambda: modelkin.kinship(fts[0], fts[1], base=base), 1),
        "cli": lambda: cli_seconds(fts[0], fts[1], base),
    }
    for fn in measure.values():
        fn()
    columns["unmap"].clear()
    for _ in range(args.repeats):
        for name, fn in measure.items():
            columns[name].append(fn())
    print(f"input bytes                 {size_gb:8.2f} GB")
    for name, label in [
        ("floor", "floor (read every byte)"),
        ("unmap", "floor + dropping the maps"),
        ("reference", "reference loop (kernel)"),
        ("python", "modelkin.kinship (Python)"),
        ("cli", "modelkin kinship (CLI)"),
    ]:
        t = statistics.median(columns[name])
        ratio = statistics.median(x / f for x, f in zip(columns[name], columns["floor"], strict=True))
        print(f"{label:27s} {t:8.3f} s   {size_gb / t:6.2f} GB/s   ratio to floor {ratio:5.2f}x")
    ours = statistics.median(columns["python"])
    cli_over = statistics.median(c - p for c, p in zip(columns["cli"], columns["python"], strict=True))
    print(f"CLI minus Python API        {cli_over:8.3f} s")
    with_unmap = statistics.median(p / u for p, u in zip(columns["python"], columns["unmap"], strict=True))
    print(f"Python over the floor with its unmapping (the pass drops its pages inside its time) {with_unmap:5.2f}x")
    print(
        "rounds (floor, unmap, reference, python, cli): "
        + "; ".join(", ".join(f"{columns[n][r]:.3f}" for n in columns) for r in range(args.repeats))
    )
    code = f"import modelkin; modelkin.kinship({str(fts[0])!r}, {str(fts[1])!r}, base={str(base)!r})"
    print(f"peak anonymous RSS          {peak_anon_rss_mb(code):8.1f} MB  (whole Python process)")
    print(f"peak anonymous RSS, import  {peak_anon_rss_mb('import modelkin'):8.1f} MB  (python + numpy + modelkin)")
    try:
        namespace: dict[str, object] = {}
        exec(TORCH_LOOP, namespace)
        torch_fn = namespace["torch_kinship"]
        torch_time = median_time(lambda: torch_fn(str(fts[0]), str(fts[1]), str(base)), 1)  # type: ignore[operator]
        print(f"torch float64 loop          {torch_time:8.3f} s   modelkin is {torch_time / ours:6.1f}x faster")
    except ImportError as error:
        print(f"torch float64 loop          skipped ({error}; install torch and safetensors to compare)")

    if args.no_matrix:
        return
    print(f"\n# matrix family: ~{args.matrix_params:.3g} parameters per model, 8 fine-tunes", flush=True)
    base, fts = family(args.data / f"matrix-{args.matrix_params:.0e}", args.matrix_params, 8)
    warm([base, *fts])
    # Rounds alternate a pair and the matrix, so a drift in the machine's speed between them
    # cancels in each round's ratio.
    pairs, matrices = [], []
    for _ in range(max(args.repeats, 5)):
        pairs.append(median_time(lambda: modelkin.kinship(fts[0], fts[1], base=base), 1))
        matrices.append(median_time(lambda: modelkin.kinship_matrix(fts, base=base), 1))
    ratio = statistics.median(m / p for p, m in zip(pairs, matrices, strict=True))
    print(f"one pair                    {statistics.median(pairs):8.3f} s")
    print(
        f"8x8 matrix (28 pairs)       {statistics.median(matrices):8.3f} s   ratio to one pair {ratio:5.2f}x"
        "  (median of alternating rounds; 28 pair passes: 28x)"
    )
    # Four fine-tunes against the floor of reading their five models, rounds alternating.
    five = [base, *fts[:4]]
    warm(five)
    floors, unmapped, fours = [], [], []
    for _ in range(max(args.repeats, 5)):
        read, with_unmap = floor_seconds([str(p) for p in five])
        floors.append(read)
        unmapped.append(with_unmap)
        fours.append(median_time(lambda: modelkin.kinship_matrix(fts[:4], base=base), 1))
    floor = statistics.median(floors)
    print(f"floor, its 5 models         {floor:8.3f} s")
    print(
        f"4x4 matrix (6 pairs)        {statistics.median(fours):8.3f} s   "
        f"{statistics.median(f / r for r, f in zip(floors, fours, strict=True)):5.2f}x the floor"
    )
    print(
        "4x4 over the floor with its unmapping        "
        f"{statistics.median(f / u for u, f in zip(unmapped, fours, strict=True)):5.2f}x"
    )


if __name__ == "__main__":
    main()

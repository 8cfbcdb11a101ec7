"""Merge benchmark and mergekit compatibility, measured in the same run.

    python benches/bench_merge.py [--params 2.65e8] [--dtype bfloat16] [--mergekit PATH/TO/mergekit-yaml]

Generates a Llama-shaped bf16 family (base + 3 fine-tunes, with config.json) under bench-data/,
runs the same TIES recipe (`dtype: bfloat16` by default) with modelkin and (when found) mergekit on
the CPU, and prints wall time,
peak RSS and the speed ratio. Then the floor of a merge on this machine, measured in the same run:
reading every input byte once from the page cache on all cores (the rust example read_floor) plus
writing the output's bytes once (16 MiB pieces of a ready buffer into a new file in the same folder),
and TIES, linear and task_arithmetic over the same models timed inside one process (the plan and
the merge to disk, interpreter start-up left out, as the floor has none), each as a ratio to it.
Then, on a small family, it runs several methods with both tools (`dtype: float32`,
`out_dtype: bfloat16`) and prints the share of bit-identical elements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

from bench_kinship import build_examples, example_seconds, family, llama_shapes  # noqa: E402
from modelkin.example import llama_config  # noqa: E402
from modelkin.testing import read_safetensors  # noqa: E402

# The same plan merged to disk and in memory, in a fresh process each, so both pay the same start.
DISK = "import sys, modelkin; modelkin.merge(modelkin.plan(sys.argv[1]), sys.argv[2])"
MEMORY = "import sys, modelkin; m = modelkin.merge(modelkin.plan(sys.argv[1])); assert len(m)"


def model_dirs(directory: Path, params: float) -> tuple[Path, list[Path]]:
    """The bench family as model directories (a file + config.json each), as mergekit needs."""
    base_file, files = family(directory, params, 3)
    config = llama_config(llama_shapes(params), head_dim=64)
    dirs = []
    for file in [base_file, *files]:
        d = directory / file.stem
        d.mkdir(exist_ok=True)
        target = d / "model.safetensors"
        if not target.exists():
            target.symlink_to(file.resolve())
        (d / "config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs[0], dirs[1:]


def run_measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, anonymous + file) of a command, sampled every 10 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
                    if line.startswith("VmRSS:"):
                        peak[1] = max(peak[1], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {err[-2000:]}")
    return time.perf_counter() - start, peak[0] / 1024


def recipe(method: str, base: Path, models: list[Path], params: list[dict], dtype: str = "float32") -> dict:
    # dtype float32 with a bf16 output is the compatibility baseline; a half dtype is what most
    # published recipes say (mergekit then rounds after each op, and so does modelkin).
    precision = {"dtype": "float32", "out_dtype": "bfloat16"} if dtype == "float32" else {"dtype": dtype}
    return {
        "models": [{"model": str(m), "parameters": p} for m, p in zip(models, params, strict=True)]
        + ([{"model": str(base)}] if method == "slerp" else []),
        "merge_method": method,
        "base_model": str(base),
        **precision,
        **({"parameters": {"t": 0.3}} if method == "slerp" else {}),
    }


def memory_vs_disk(path: Path, work: Path) -> None:
    """The same TIES plan merged in memory and to disk, alternating three rounds; then the
    in-memory tensors compared with the disk output bit for bit."""
    disk, memory = [], []
    for i in range(3):
        disk.append(run_measured([sys.executable, "-c", DISK, str(path), str(work / f"disk{i}")])[0])
        memory.append(run_measured([sys.executable, "-c", MEMORY, str(path)]))
        shutil.rmtree(work / f"disk{i}", ignore_errors=True)
    disk_s = sorted(disk)[1]
    memory_s, memory_rss = sorted(memory)[1]
    print(f"in memory   {memory_s:8.2f} s   peak anonymous RSS {memory_rss:8.1f} MB  (median of 3)")
    print(f"to disk     {disk_s:8.2f} s   (median of 3, alternating)   memory / disk {memory_s / disk_s:5.2f}x")
    import modelkin

    merged = modelkin.merge(modelkin.plan(path))
    on_disk = read_safetensors(work / "ours")
    same = all(np.array_equal(merged[n].astype(np.float64), v) for n, v in on_disk.items()) and len(merged) == len(
        on_disk
    )
    print(f"in memory   {'bit-identical' if same else 'DIFFERENT'} to the disk output ({len(merged)} tensors)")


# One merge to disk timed inside the process: the plan and the merge, not the interpreter's start.
IN_PROCESS = (
    "import sys, time, modelkin; t = time.perf_counter(); modelkin.merge(modelkin.plan(sys.argv[1]), sys.argv[2]);"
    " print(time.perf_counter() - t)"
)


def floor_and_methods(base: Path, models: list[Path], ties: dict, work: Path, repeats: int = 3) -> None:
    """The read-and-write floor of a merge of these models, and TIES, linear and task_arithmetic
    (the TIES recipe's dtype) as ratios to it; rounds alternate, medians of ``repeats``."""
    build_examples()
    files = [str((p / "model.safetensors").resolve()) for p in [base, *models]]
    weights = [{"weight": w} for w in (1.0, 0.6, 0.5)]
    specs = {"ties": ties}
    for method in ("linear", "task_arithmetic"):
        spec = {**ties, "merge_method": method}
        spec["models"] = [{"model": m["model"], "parameters": w} for m, w in zip(ties["models"], weights, strict=True)]
        if method == "linear":
            spec.pop("base_model")
        specs[method] = spec
    paths = {}
    for method, spec in specs.items():
        paths[method] = work / f"floor-{method}.yml"
        paths[method].write_text(json.dumps(spec))
    out_bytes = sum(f.stat().st_size for f in (work / "ours").glob("*.safetensors"))
    # The output's bytes written once as a writer does it: in pieces from memory already touched
    # (one write of a zero-filled buffer also paid a page fault per source page, and the kernel's
    # throttling of one huge write: 0.8-1.5 s against 0.2-0.45 s for the same bytes in pieces).
    piece = bytearray(b"\x01") * (16 << 20)

    def write_once(target: Path) -> None:
        with open(target, "wb") as f:
            for start in range(0, out_bytes, len(piece)):
                f.write(memoryview(piece)[: min(len(piece), out_bytes - start)])

    times: dict[str, list[float]] = {k: [] for k in ("read", "write", *specs)}
    for _ in range(repeats):
        # Each timed write starts with no dirty pages left by the one before (the kernel throttles
        # a writer once they pile up).
        os.sync()
        times["read"].append(example_seconds("read_floor", files))
        target = work / "floor.bin"
        start = time.perf_counter()
        write_once(target)
        times["write"].append(time.perf_counter() - start)
        target.unlink()
        for method, path in paths.items():
            out = work / f"floor-{method}"
            os.sync()
            done = subprocess.run(
                [sys.executable, "-c", IN_PROCESS, str(path), str(out)], capture_output=True, text=True, check=True
            )
            times[method].append(float(done.stdout.split()[-1]))
            shutil.rmtree(out, ignore_errors=True)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    floor = median["read"] + median["write"]
    read_gb = sum(Path(f).stat().st_size for f in files) / 1e9
    print(f"\n# floor of this merge (medians of {repeats}, rounds alternating)")
    print(
        f"floor       {floor:8.2f} s   read {read_gb:.2f} GB once {median['read']:.2f} s"
        f" + write {out_bytes / 1e9:.2f} GB once {median['write']:.2f} s"
    )
    for method in specs:
        print(f"{method:16s} {median[method]:8.2f} s   {median[method] / floor:6.1f}x the floor   (in the process)")


def identical_share(ours: Path, theirs: Path) -> tuple[float, int]:
    a, b = read_safetensors(ours), read_safetensors(theirs)
    same = total = worst = 0
    for name, y in b.items():
        x = a[name]

        # bf16 values as ordered integers: adjacent representable values differ by 1
        def ordered(v: np.ndarray) -> np.ndarray:
            bits = v.astype(np.float32).view(np.int32).astype(np.int64) >> 16
            return np.where(bits < 0, -(bits & 0x7FFF), bits)

        ulps = np.abs(ordered(x) - ordered(y))
        same += int((ulps == 0).sum())
        total += ulps.size
        worst = max(worst, int(ulps.max()))
    return same / total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=2.65e8)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--keep", action="store_true", help="keep the outputs for inspection")
    parser.add_argument("--dtype", default="bfloat16", help="the TIES recipe's dtype (bfloat16, float32)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.data if args.data.exists() else None))
    ours_cmd = [sys.executable, "-c", "import sys, modelkin; modelkin.merge(sys.argv[1], sys.argv[2])"]

    print(f"# TIES of 3 fine-tunes, ~{args.params:.3g} parameters per model, bf16, dtype {args.dtype}", flush=True)
    base, models = model_dirs(args.data / f"merge-{int(args.params)}", args.params)
    ties = recipe(
        "ties", base, models, [{"weight": w, "density": d} for w, d in ((1.0, 0.5), (0.6, 0.7), (0.5, 0.9))], args.dtype
    )
    path = work / "ties.yml"
    path.write_text(json.dumps(ties))
    for p in [base, *models]:
        (p / "model.safetensors").read_bytes()
    # modelkin: median of three runs (each a fresh process); mergekit, at a minute a run, once.
    runs = sorted(run_measured([*ours_cmd, str(path), str(work / f"ours{i}")]) for i in range(3))
    ours_time, ours_rss = runs[1]
    for i in range(1, 3):
        shutil.rmtree(work / f"ours{i}", ignore_errors=True)
    (work / "ours0").rename(work / "ours")
    print(f"modelkin    {ours_time:8.2f} s   peak anonymous RSS {ours_rss:8.1f} MB  (median of 3)")
    memory_vs_disk(path, work)
    if args.mergekit:
        theirs_time, theirs_rss = run_measured([args.mergekit, str(path), str(work / "theirs"), "--no-copy-tokenizer"])
        print(f"mergekit    {theirs_time:8.2f} s   peak anonymous RSS {theirs_rss:8.1f} MB")
        print(f"speed-up    {theirs_time / ours_time:8.1f}x")
        share, worst = identical_share(work / "ours", work / "theirs")
        print(f"identical   {share * 100:8.4f}% of elements, max {worst} bf16 ulp apart")
    else:
        print("mergekit    not found (pass --mergekit or install mergekit==0.1.5 in a separate venv)")
    floor_and_methods(base, models, ties, work)

    if args.mergekit:
        print("\n# compatibility per method (small bf16 family)", flush=True)
        small_base, small = model_dirs(args.data / "merge-small", 2e6)
        cases = {
            "linear": [{"weight": w} for w in (1.0, 0.6, 0.5)],
            "task_arithmetic": [{"weight": w} for w in (1.0, 0.6, 0.5)],
            "slerp": [{}],
            "model_stock": [{}, {}, {}],
            "ties": [{"weight": w, "density": 0.5} for w in (1.0, 0.6, 0.5)],
            "breadcrumbs": [{"weight": w, "density": 0.8, "gamma": 0.02} for w in (1.0, 0.6, 0.5)],
            "dare_linear": [{"weight": w, "density": 1.0} for w in (1.0, 0.6, 0.5)],
        }
        for method, params in cases.items():
            chosen = small[: len(params)]
            spec = recipe(method, small_base, chosen, params)
            if method == "linear":
                spec.pop("base_model")
            file = work / f"{method}.yml"
            file.write_text(json.dumps(spec))
            subprocess.run([*ours_cmd, str(file), str(work / f"ours-{method}")], check=True)
            subprocess.run(
                [args.mergekit, str(file), str(work / f"theirs-{method}"), "--no-copy-tokenizer"],
                check=True,
                capture_output=True,
            )
            share, worst = identical_share(work / f"ours-{method}", work / f"theirs-{method}")
            print(f"{method:16s} {share * 100:8.4f}% identical, max {worst} ulp apart")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()

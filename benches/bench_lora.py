"""Kinship of two LoRA adapters: exact from the factors vs materialise-then-dense, in one session.

    python benches/bench_lora.py [--base bench-data/pair-1e+09/base.safetensors] [--rank 16]

Two rank-r adapters (q, k, v, o, gate, up, down of every layer; PEFT's layout, float32 factors) of a
~1B-parameter bf16 base. The factor path reads the base's header and the adapters only. The dense
path is what a user without it does: write base + ΔW for each adapter as a bf16 model (PEFT's merge),
then measure dense kinship against the base. It prints both times, their ratio, each path's peak
memory (ru_maxrss of a child process per path) and the two results (they differ by the bf16
rounding of the materialised models, which the factor path does not have).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FACTORS = """
import json, sys, time
import modelkin
start = time.perf_counter()
r = modelkin.kinship(sys.argv[1], sys.argv[2], base=sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "pcc": r.pcc, "cs": r.cs, "ed": r.ed}))
"""

DENSE = """
import json, sys, time
import numpy as np
import modelkin
from modelkin.io.adapter import load_adapter
from modelkin.io.safetensors import save_file
from modelkin._core import open_model
base_path, out = sys.argv[3], sys.argv[4]
start = time.perf_counter()
import ml_dtypes
handle = open_model(base_path)
for i, adapter_dir in enumerate(sys.argv[1:3]):
    adapter = load_adapter(adapter_dir)
    tensors = {}
    for name, shape, dtype in handle.tensors():
        w = handle.raw(name).view(ml_dtypes.bfloat16).reshape(shape).astype(np.float32)
        delta = adapter.low_rank.get(name)
        if delta is not None:
            w = w + delta.dense().astype(np.float32)
        tensors[name] = w
    save_file(f"{out}/m{i}.safetensors", tensors, "BF16")
    del tensors
made = time.perf_counter() - start
r = modelkin.kinship(f"{out}/m0.safetensors", f"{out}/m1.safetensors", base=base_path)
total = time.perf_counter() - start
print(json.dumps({"seconds": total, "materialise": made, "pcc": r.pcc, "cs": r.cs, "ed": r.ed}))
"""


def write_adapter(path: Path, base: str, rank: int, seed: int) -> None:
    import numpy as np

    from modelkin._core import open_model
    from modelkin.io.safetensors import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape, _ in open_model(base).tensors():
        if name.endswith(".weight") and any(f".{t}." in name for t in TARGETS):
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(0, 0.02, (rank, shape[1])).astype("f4")
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(0, 0.02, (shape[0], rank)).astype("f4")
    path.mkdir(parents=True)
    save_file(path / "adapter_model.safetensors", tensors, "F32")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (path / "adapter_config.json").write_text(json.dumps(config))


def child(code: str, *args: str) -> tuple[dict[str, float], float]:
    """Runs one path in its own process; (its JSON line, its peak RSS in GB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(done.stdout.strip().splitlines()[-1]), max(peak, before) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=str(ROOT / "bench-data" / "pair-1e+09" / "base.safetensors"))
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if not Path(args.base).is_file():
        sys.exit(f"{args.base}: no such base (benches/bench_kinship.py writes bench-data/pair-1e+09; or pass --base)")
    sys.path.insert(0, str(ROOT / "python"))
    with tempfile.TemporaryDirectory(prefix="bench-lora-", dir=ROOT / "bench-data") as scratch:
        root = Path(scratch)
        for i in (0, 1):
            write_adapter(root / f"a{i}", args.base, args.rank, seed=i)
        adapters = [str(root / "a0"), str(root / "a1")]
        factors, factor_peak = child(FACTORS, *adapters, args.base)
        dense, dense_peak = child(DENSE, *adapters, args.base, scratch)
    print(f"two rank-{args.rank} adapters of {args.base}")
    print(f"{'path':28s} {'seconds':>8s} {'peak GB':>8s}  pcc / cs / ed")
    for name, result, peak in (("factors (exact)", factors, factor_peak), ("materialise + dense", dense, dense_peak)):
        values = " / ".join(f"{result[m]:.6g}" for m in ("pcc", "cs", "ed"))
        print(f"{name:28s} {result['seconds']:8.3f} {peak:8.2f}  {values}")
    print(f"  of which materialising: {dense['materialise']:.2f} s")
    print(f"factor path: {dense['seconds'] / factors['seconds']:.0f}x faster")
    assert math.isclose(factors["cs"], dense["cs"], rel_tol=1e-2), "the two paths measure the same adapters"


if __name__ == "__main__":
    main()

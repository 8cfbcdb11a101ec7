"""The wheel users install (`make wheel`: abi3, manylinux2014), installed into a fresh venv and run
from there with no Rust toolchain on PATH: kinship and a merge."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELS = sorted((ROOT / "dist").glob("modelkin-*.whl"))

pytestmark = pytest.mark.skipif(not WHEELS, reason="no wheel in dist/ (`make wheel` builds it; `make test` runs it)")


def test_the_wheel_is_abi3_for_manylinux2014():
    name = WHEELS[-1].name
    assert "-cp310-abi3-" in name, name
    assert "manylinux2014_x86_64" in name or "manylinux_2_17_x86_64" in name, name


def test_the_wheel_installs_and_runs_without_rust(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # The wheel alone (--no-deps, no index: no network); its dependencies come from this test's
    # environment through PYTHONPATH, where modelkin itself is only an editable .pth that is not read.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", WHEELS[-1]], check=True)
    env = {
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
    }
    assert subprocess.run(["which", "cargo"], env=env, capture_output=True).returncode != 0

    def run(*args: str) -> str:
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    where = run(str(python), "-c", "import modelkin, modelkin._core as c; print(c.__file__)")
    assert where.strip().startswith(str(env_dir)), where
    modelkin = str(env_dir / "bin" / "modelkin")
    run(modelkin, "example", "family")
    out = run(modelkin, "kinship", "family/math-a", "family/math-b", "--base", "family/base", "--json")
    assert '"pcc"' in out
    (tmp_path / "ties.yml").write_text(
        "models:\n  - model: family/math-a\n    parameters: {weight: 1.0, density: 0.5}\n"
        "  - model: family/code\n    parameters: {weight: 0.7, density: 0.5}\n"
        "merge_method: ties\nbase_model: family/base\ndtype: bfloat16\n"
    )
    run(modelkin, "merge", "ties.yml", "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert sys.version_info >= (3, 10)
    assert os.path.exists(tmp_path / "merged" / "modelkin.json")

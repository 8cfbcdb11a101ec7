"""The optional torch path gives the same numbers as the Rust pass."""

from __future__ import annotations

import pytest

import modelkin
from modelkin.testing import run_cli


@pytest.mark.parametrize("split_mode", [False, True])
@pytest.mark.parametrize("low_precision", [False, True])
def test_torch_cpu_matches_rust(family_factory, split_mode, low_precision):
    pytest.importorskip("torch", reason="torch is not installed (pip install modelkin[torch])")
    fam = family_factory(n=3, dtype="BF16", shards=2, extra_vocab=(0, 3))
    rust = modelkin.kinship_matrix(fam.models, base=fam.base, split=split_mode, low_precision=low_precision)
    torch = modelkin.kinship_matrix(
        fam.models, base=fam.base, split=split_mode, low_precision=low_precision, device="cpu"
    )
    for metric in ("pcc", "cs", "ed"):
        assert torch[metric] == pytest.approx(rust[metric], rel=1e-6, abs=1e-9)


def test_cuda_device_matches_rust(family_factory):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install modelkin[torch])")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    fam = family_factory(n=2)
    rust = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base)
    cuda = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, device="cuda")
    for metric in ("pcc", "cs", "ed"):
        assert cuda.metrics[metric] == pytest.approx(rust.metrics[metric], rel=1e-6)


def test_missing_torch_or_cuda_is_a_clear_error(family_factory):
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here, so --device cuda cannot fail")
    except ImportError:
        pass
    fam = family_factory()
    proc = run_cli("kinship", str(fam.models[0]), str(fam.models[1]), "--base", str(fam.base), "--device", "cuda")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "torch" in proc.stderr or "CUDA" in proc.stderr

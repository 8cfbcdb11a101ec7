"""The shipped `.pyi` stubs agree with the compiled extension."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_core_stubs_match_the_extension():
    pytest.importorskip("mypy", reason="stub checking needs mypy (installed by `make test`)")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "modelkin._core"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

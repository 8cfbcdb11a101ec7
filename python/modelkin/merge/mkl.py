"""MKL's runtime library, where installed: the source of torch's float32 angles.

torch built with MKL (its PyPI wheels) computes float32 ``acos``/``sin``/``cos`` with MKL's vector
math library, an ulp away from the C library's on a few percent of arguments. mergekit's slerp,
nuslerp, multislerp and karcher take their angles from those functions, so with ``dtype:
float32`` modelkin matches mergekit's bits only when it calls the same library. It does when the
``mkl`` package (``pip install "modelkin[mkl]"``, the version ``torch.__config__.show()`` reports)
is installed in the environment, or when ``MODELKIN_MKL`` names ``libmkl_rt``; otherwise it uses
the C library's functions. ``MODELKIN_MKL=`` (empty) turns MKL off.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

ENV = "MODELKIN_MKL"

# Where the `mkl` wheel puts its runtime library, per platform.
_NAMES = ("libmkl_rt.so.2", "libmkl_rt.so", "libmkl_rt.2.dylib", "libmkl_rt.dylib")


def mkl_library() -> str | None:
    """The ``libmkl_rt`` float32 angles come from: ``MODELKIN_MKL`` when set (empty: none), else
    the one the ``mkl`` package installed into this environment, else none."""
    named = os.environ.get(ENV)
    if named is not None:
        return named or None
    return _installed()


@lru_cache(maxsize=1)
def _installed() -> str | None:
    lib = Path(sys.prefix) / "lib"
    return next((str(lib / name) for name in _NAMES if (lib / name).is_file()), None)

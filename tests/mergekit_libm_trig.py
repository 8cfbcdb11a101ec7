"""Runs ``mergekit-yaml`` (argv as for it) with torch's float32 ``acos``/``sin``/``cos`` replaced by
the C library's ``acosf``/``sinf``/``cosf``, the functions modelkin uses.

torch built with MKL takes float32 trig from MKL's vector math library, whose results are an ulp
away from the C library's on a few percent of arguments and whose algorithm is not published. With
the trig swapped, what is left between mergekit's output and modelkin's is everything else: the
norms, the sums and their order, and each rounding. Run with the peer venv's Python; tests only.
"""

import ctypes
import sys

import numpy as np
import torch

_LIBM = ctypes.CDLL("libm.so.6")


def _swap(name: str, cname: str) -> None:
    original = getattr(torch, name)
    function = getattr(_LIBM, cname)
    function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float]

    def trig(x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or args or kwargs:
            return original(x, *args, **kwargs)
        values = x.detach().cpu().contiguous().reshape(-1).numpy()
        out = np.fromiter((function(float(v)) for v in values), dtype=np.float32, count=values.size)
        return torch.from_numpy(out).reshape(x.shape).to(x.device)

    setattr(torch, name, trig)


for _name, _cname in (("acos", "acosf"), ("arccos", "acosf"), ("sin", "sinf"), ("cos", "cosf")):
    _swap(_name, _cname)

if __name__ == "__main__":
    from mergekit.scripts.run_yaml import main

    sys.argv = ["mergekit-yaml", *sys.argv[1:]]
    main()

"""The optional torch path: the same plan and moments, computed by torch in float64 on any device.

The Rust core still matches tensors and decodes the files; torch does the arithmetic, so a GPU
can take the pass. Results go through the same Rust merge and metric code as the CPU path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._core import KinshipPlan, KinshipStats
from ..io.errors import ModelkinError

if TYPE_CHECKING:
    from .._core import _MomentBlock

# Elements per block: bounds device memory at (k + 1) float64 copies of this many values.
BLOCK = 1 << 22


def _torch_device(device: str) -> tuple[Any, Any]:
    try:
        import torch
    except ImportError as error:
        raise ModelkinError(
            f"--device {device} needs torch, which is not installed: pip install 'modelkin[torch]'"
        ) from error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelkinError(f"--device {device}: torch was built without CUDA or sees no GPU")
    try:
        return torch, torch.device(device)
    except RuntimeError as error:
        raise ModelkinError(f"--device {device}: {error}") from error


def run_torch(
    plan: KinshipPlan,
    device: str,
    *,
    low_precision: str | None = None,
    skip_nonfinite: bool = False,
    progress: Any = None,
) -> KinshipStats:
    torch, dev = _torch_device(device)
    k = plan.k
    tensors = plan.tensors
    passes = 2 if low_precision else 1
    bytes_total = plan.tensor_bytes * passes
    elements_total = max(1, passes * sum(numel for _, _, numel in tensors))
    elements_done = [0]

    def load(t: int, first: int, count: int) -> Any:
        """Deltas of one block as a (k, count) float64 tensor, or the index of a non-finite source."""
        rows = [torch.from_numpy(plan.read(t, s, first, count)).to(dev) for s in range(k + 1)]
        elements_done[0] += count
        if progress is not None:
            progress(bytes_total * elements_done[0] // elements_total, bytes_total)
        deltas = torch.stack(rows[1:]) - rows[0]
        finite = torch.isfinite(deltas.sum(dim=1))
        if bool(finite.all()):
            return deltas
        return 0 if not bool(torch.isfinite(rows[0].sum())) else int((~finite).nonzero()[0]) + 1

    bad: dict[int, int] = {}
    scales: dict[int, Any] = {}
    if low_precision:
        for t, (_, _, numel) in enumerate(tensors):
            top = torch.zeros(k, dtype=torch.float64, device=dev)
            for first in range(0, numel, BLOCK):
                deltas = load(t, first, min(BLOCK, numel - first))
                if isinstance(deltas, int):
                    bad[t] = deltas
                    break
                top = torch.maximum(top, deltas.abs().amax(dim=1))
            scales[t] = top
        if low_precision == "full":
            good = [s for t, s in scales.items() if t not in bad]
            overall = torch.stack(good).amax(dim=0) if good else torch.zeros(k, dtype=torch.float64, device=dev)
            scales = dict.fromkeys(scales, overall)

    blocks: list[_MomentBlock] = []
    skipped: list[tuple[str, str]] = []
    for t, (name, _, numel) in enumerate(tensors):
        tensor_blocks: list[_MomentBlock] = []
        for first in range(0, numel, BLOCK):
            deltas = bad.get(t)
            if deltas is None:
                deltas = load(t, first, min(BLOCK, numel - first))
            if isinstance(deltas, int):
                path = plan.file_of(t, deltas)
                if not skip_nonfinite:
                    raise plan.nonfinite_error(t, deltas)
                skipped.append((name, f"NaN or Inf values in {path}"))
                tensor_blocks = []
                break
            if low_precision:
                deltas = torch.clamp(torch.round(127 * (deltas / scales[t][:, None])), -127, 127)
            count = deltas.shape[1]
            means = deltas.mean(dim=1)
            centred = deltas - means[:, None]
            comoment = centred @ centred.T
            sqdist = torch.zeros((k, k), dtype=torch.float64, device=dev)
            for i in range(k):
                for j in range(i + 1, k):
                    shift = means[i] - means[j]
                    value = ((centred[i] - centred[j]) ** 2).sum() + count * shift * shift
                    sqdist[i, j] = sqdist[j, i] = value
            tensor_blocks.append((t, count, means.cpu().numpy(), comoment.cpu().numpy(), sqdist.cpu().numpy()))
        blocks.extend(tensor_blocks)
    return plan.report(blocks, skipped)

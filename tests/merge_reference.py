"""Independent float64 references of the merge methods, written from mergekit's definitions
(DESIGN.md section 3) with numpy on whole tensors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from modelkin.testing import read_safetensors, stored_dtypes  # noqa: F401 (tests import them here too)

Array = np.ndarray


def _at_least(values: Array, rank: int) -> Array:
    """Mask of ascending ranks >= ``rank``; entries tied with the boundary value go all in or all
    out, whichever side holds most of them (modelkin's documented tie rule)."""
    ordered = np.sort(values)
    value = ordered[rank]
    below, equal = int((values < value).sum()), int((values == value).sum())
    inside = below + equal - rank
    return values >= value if 2 * inside >= equal else values > value


def _below(values: Array, rank: int) -> Array:
    """Mask of ascending ranks < ``rank``, with the same tie rule."""
    if rank >= values.size:
        return np.ones(values.shape, dtype=bool)
    value = np.sort(values)[rank]
    below, equal = int((values < value).sum()), int((values == value).sum())
    inside = rank - below
    return values <= value if 2 * inside >= equal else values < value


def libstdcxx_sort_order(values: Array, descending: bool) -> list[int]:
    """The permutation libstdc++'s ``std::sort`` (introsort) leaves (value, index) pairs in, as
    torch's CPU ``sort``/``argsort`` does: a literal transcription, every range sorted."""
    v = values.tolist()
    idx = list(range(len(v)))

    def comp(a: float, b: float) -> bool:
        return a > b if descending else a < b

    def swap(i: int, j: int) -> None:
        v[i], v[j] = v[j], v[i]
        idx[i], idx[j] = idx[j], idx[i]

    def adjust_heap(first: int, hole: int, length: int, value: tuple[float, int]) -> None:
        top = second = hole
        while second < (length - 1) // 2:
            second = 2 * (second + 1)
            if comp(v[first + second], v[first + second - 1]):
                second -= 1
            v[first + hole], idx[first + hole] = v[first + second], idx[first + second]
            hole = second
        if length % 2 == 0 and second == (length - 2) // 2:
            second = 2 * (second + 1)
            v[first + hole], idx[first + hole] = v[first + second - 1], idx[first + second - 1]
            hole = second - 1
        parent = (hole - 1) // 2
        while hole > top and comp(v[first + parent], value[0]):
            v[first + hole], idx[first + hole] = v[first + parent], idx[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        v[first + hole], idx[first + hole] = value

    def heap_sort(first: int, last: int) -> None:
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, (v[first + parent], idx[first + parent]))
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            value = (v[last], idx[last])
            v[last], idx[last] = v[first], idx[first]
            adjust_heap(first, 0, last - first, value)

    def introsort_loop(first: int, last: int, depth: int) -> None:
        while last - first > 16:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            a, b, c = first + 1, first + (last - first) // 2, last - 1
            if comp(v[a], v[b]):
                swap(first, b if comp(v[b], v[c]) else c if comp(v[a], v[c]) else a)
            else:
                swap(first, a if comp(v[a], v[c]) else c if comp(v[b], v[c]) else b)
            lo, hi, pivot = first + 1, last, v[first]
            while True:
                while comp(v[lo], pivot):
                    lo += 1
                hi -= 1
                while comp(pivot, v[hi]):
                    hi -= 1
                if lo >= hi:
                    break
                swap(lo, hi)
                lo += 1
            introsort_loop(lo, last, depth)
            last = lo

    n = len(v)
    if n > 1:
        introsort_loop(0, n, 2 * (n.bit_length() - 1))
        for i in range(1, n):  # the final insertion sort
            value, j = (v[i], idx[i]), i
            while j > 0 and comp(value[0], v[j - 1]):
                v[j], idx[j] = v[j - 1], idx[j - 1]
                j -= 1
            v[j], idx[j] = value
    return idx


def _positions(values: Array, descending: bool, start: int, stop: int) -> Array:
    """Mask of the entries torch's CPU sort puts at positions [start, stop)."""
    mask = np.zeros(values.size, dtype=bool)
    mask[libstdcxx_sort_order(values, descending)[start:stop]] = True
    return mask


def kth_magnitude_mask(delta: Array, keep: int, torch_ties: bool = True) -> Array:
    """Top-``keep`` |delta| (ranked in float32); ties at the threshold split as torch's argsort
    splits them, or (``torch_ties=False``) by modelkin's streamed all-or-nothing rule."""
    magnitude = np.abs(delta.astype(np.float32)).ravel()
    keep = min(max(1, keep), magnitude.size)
    if torch_ties:
        return _positions(magnitude, True, 0, keep).reshape(delta.shape)
    return _at_least(magnitude, magnitude.size - keep).reshape(delta.shape)


def breadcrumbs_mask(delta: Array, density: float, gamma: float, torch_ties: bool = True) -> Array:
    """mergekit 0.1.5: ascending magnitude ranks [n_bot, n_bot + target) survive."""
    n = delta.size
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    magnitude = np.abs(delta.astype(np.float32)).ravel()
    if torch_ties:
        return _positions(magnitude, False, bottom, bottom + target).reshape(delta.shape)
    return (_at_least(magnitude, bottom) & _below(magnitude, bottom + target)).reshape(delta.shape)


def f32_delta(x: Array, z: Array) -> Array:
    return x.astype(np.float32) - z.astype(np.float32)


def task_vector_merge(
    base: Array,
    models: list[Array],
    weights: list[float],
    *,
    masks: list[Array] | None,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> Array:
    deltas = [x - base for x in models]
    if masks is not None:
        deltas = [d * m for d, m in zip(deltas, masks, strict=True)]
    weighted = np.stack([w * d for w, d in zip(weights, deltas, strict=True)])
    w = np.array(weights).reshape((-1,) + (1,) * base.ndim) * np.ones_like(weighted)
    if consensus:
        majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
        keep = np.sign(weighted) == majority
        mixed = (weighted * keep).sum(axis=0)
        divisor = (w * keep).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(axis=0)
        divisor = w.sum(axis=0)
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def slerp(t: float, v0: Array, v1: Array) -> Array:
    def unit(v: Array) -> Array:
        norm = np.linalg.norm(v)
        return v / norm if norm > 1e-8 else v

    dot = float(np.sum(unit(v0) * unit(v1)))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return np.sin(theta - theta * t) / np.sin(theta) * v0 + np.sin(theta * t) / np.sin(theta) * v1


def model_stock(base: Array, models: list[Array], filter_wise: bool = False) -> Array:
    """Model Stock; ``filter_wise`` takes one factor per row along the last axis (1-D tensors whole)."""
    if filter_wise and base.ndim >= 2:
        flat = [m.reshape(-1, base.shape[-1]) for m in models]
        rows = [model_stock(b, [m[r] for m in flat]) for r, b in enumerate(base.reshape(-1, base.shape[-1]))]
        return np.stack(rows).reshape(base.shape)
    offsets = [(x - base).ravel() for x in models]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]), 1e-6)
            cosines.append(np.clip(offsets[i] @ offsets[j] / norms, -1, 1))
    cos = float(np.mean(cosines))
    n = len(models)
    denominator = 1 + (n - 1) * cos
    # mergekit 0.1.5 keeps the base where the denominator vanishes.
    t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
    return t * (sum(models) / n) + (1 - t) * base


def sce(base: Array, models: list[Array], select_topk: float) -> Array:
    tvs = np.stack([x - base for x in models])
    if select_topk < 1:
        var = tvs.var(axis=0).astype(np.float32).ravel()
        k = int(np.count_nonzero(var) * select_topk)
        mask = np.zeros(var.shape, bool) if k == 0 else _at_least(var, var.size - k)
        tvs = tvs * mask.reshape(base.shape)
    majority = np.where(tvs.sum(axis=0) >= 0, 1.0, -1.0)
    erase = np.sign(tvs) == majority
    energy = (tvs**2).reshape(len(models), -1).mean(axis=1)
    weights = np.ones(len(models)) / len(models) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    w = weights.reshape((-1,) + (1,) * base.ndim) * erase
    return base + (tvs * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-6)


def nuslerp(t: float, v0: Array, v1: Array, flatten: bool = True, row_wise: bool = False) -> Array:
    """mergekit's nuslerp: over the flattened tensors, else per row along the last axis (or with
    ``row_wise`` per vector along the first axis)."""
    if not flatten and v0.ndim >= 2:
        a0, a1 = (np.moveaxis(v, 0, -1) for v in (v0, v1)) if row_wise else (v0, v1)
        rows = [
            nuslerp(t, x, y) for x, y in zip(a0.reshape(-1, a0.shape[-1]), a1.reshape(-1, a1.shape[-1]), strict=True)
        ]
        out = np.stack(rows).reshape(a0.shape)
        return np.moveaxis(out, -1, 0) if row_wise else out
    a, b = v0.ravel(), v1.ravel()
    ua, ub = a / max(np.linalg.norm(a), 1e-7), b / max(np.linalg.norm(b), 1e-7)
    cos = np.clip(ua @ ub, -1, 1)
    if 1 - cos**2 <= 1e-16:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


def multislerp(vectors: list[Array], weights: list[float], eps: float = 1e-8) -> Array:
    flat = np.stack([v.ravel() for v in vectors])
    w = np.array(weights) / np.sum(weights)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    dots = units @ mean
    tangent = ((units - dots[:, None] * mean) * w[:, None]).sum(0)
    tangent_norm = np.linalg.norm(tangent) + eps
    result = mean * np.cos(tangent_norm) + tangent * (np.sin(tangent_norm) / tangent_norm)
    return (result * (norms[:, 0] * w).sum()).reshape(vectors[0].shape)


def karcher(tensors: list[Array], max_iter: int = 10, tol: float = 1e-5) -> Array:
    alphas = [1 / len(tensors)] * len(tensors)
    norms = [np.linalg.norm(t) for t in tensors]
    units = [t / n if n else np.zeros_like(t) for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = [1 / len(valid)] * len(valid)
    mean = sum(ai * units[i] for ai, i in zip(a, valid, strict=True))
    mean = mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for ai, i in zip(a, valid, strict=True):
            dot = np.clip(np.sum(mean * units[i]), -1, 1)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += ai * (theta / np.sin(theta)) * (units[i] - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        mean = mean / np.linalg.norm(mean)
    return sum(al * n for al, n in zip(alphas, norms, strict=True)) * mean


# --- mergekit's `dtype: float32` reductions, in torch's CPU order -------------------------------


def _f32(x: float) -> np.float32:
    return np.float32(x)


def _fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """a·b + c rounded once to float32. The product is exact in float64 and rounding the float64
    sum again to float32 errs only when it lands exactly halfway between two float32 values; then
    the exact value (fractions) decides."""
    wide = float(a) * float(b) + float(c)
    narrow = np.float32(wide)
    if float(narrow) == wide:
        return narrow
    neighbour = np.nextafter(narrow, np.float32(np.inf if wide > float(narrow) else -np.inf))
    if wide != (float(narrow) + float(neighbour)) / 2:
        return narrow
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))


def torch_f32_norm(values: Array) -> np.float32:
    """torch.linalg.vector_norm in float32 (runs of 64 or more): rounded squares added into 8
    lanes in order, lanes added, the last len % 8 squares FMA'd one by one."""
    v = values.astype(np.float32).ravel()
    grouped = v.size - v.size % 8
    lanes = np.zeros(8, np.float32)
    for row in v[:grouped].reshape(-1, 8):
        lanes = lanes + row * row
    total = np.float32(lanes[0])
    for lane in lanes[1:]:
        total = _f32(total + lane)
    for e in range(grouped, v.size):
        total = _fma_f32(v[e], v[e], total)
    return np.float32(np.sqrt(np.float32(total)))


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _torch_inner_sum(row: Array) -> np.float32:
    """ATen's vectorized_inner_sum with 8-lane float vectors: row_sum (4-way ILP) over
    multi_row_sum's four cascade levels, leftover vectors, then the scalar tail and the lanes."""
    vectors = row.size // 8
    vecs = row[: vectors * 8].reshape(vectors, 8)
    rows = vectors // 4
    level_power = max(4, _ceil_log2(rows) // 4)
    step, mask = 1 << level_power, (1 << level_power) - 1
    acc = np.zeros((4, 4, 8), np.float32)
    i = 0
    while i + step <= rows:
        for _ in range(step):
            acc[0] = acc[0] + vecs[4 * i : 4 * i + 4]
            i += 1
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * level_power)):
                break
    for r in range(i, rows):
        acc[0] = acc[0] + vecs[4 * r : 4 * r + 4]
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    partial = acc[0]
    for v in range(4 * rows, vectors):
        partial[0] = partial[0] + vecs[v]
    for k in range(1, 4):
        partial[0] = partial[0] + partial[k]
    total = np.float32(0)
    for x in row[vectors * 8 :]:
        total = _f32(total + x)
    for lane in partial[0]:
        total = _f32(total + lane)
    return total


def torch_f32_sum(values: Array, threads: int) -> np.float32:
    """torch.sum of a contiguous float32 run on the CPU with ``threads`` intra-op threads: runs of
    32768 or more are split into one range per thread, each summed, the results summed in order."""
    v = values.astype(np.float32).ravel()
    n = v.size
    if n < 32768 or threads == 1:
        return _f32(np.float32(0) + _torch_inner_sum(v))
    used = min(threads, -(-n // 32768))
    size = -(-n // used)
    parts = np.zeros(threads, np.float32)
    for t in range(used):
        if t * size < n:
            parts[t] = np.float32(0) + _torch_inner_sum(v[t * size : min(n, (t + 1) * size)])
    return _f32(np.float32(0) + _torch_inner_sum(parts))


def slerp_float32(t: float, v0: Array, v1: Array, threads: int, chunk: int = 1 << 20) -> Array:
    """mergekit 0.1.5's slerp with ``dtype: float32`` on one tensor (its leading axis is the batch
    of outputs, so the whole tensor is one row): chunked norms and dot, factors in float32."""
    a, b = v0.astype(np.float32).ravel(), v1.astype(np.float32).ravel()
    starts = range(0, a.size, chunk)

    def norm(x: Array) -> np.float32:
        n = torch_f32_norm(np.array([torch_f32_norm(x[s : s + chunk]) for s in starts], np.float32))
        return n if n > 1e-8 else np.float32(1)

    na, nb = norm(a), norm(b)
    parts = [torch_f32_sum((a[s : s + chunk] / na) * (b[s : s + chunk] / nb), threads) for s in starts]
    dot = np.float32(np.clip(torch_f32_sum(np.array(parts, np.float32), threads), -1, 1))
    t32 = np.float32(t)
    if abs(dot) > 0.9995:
        coef_a, coef_b = np.float32(1) - t32, t32
    else:
        # Correctly rounded float32 acos and sin (float64 results rounded), as glibc's acosf/sinf
        # give on these arguments.
        theta = np.float32(math.acos(float(dot)))
        sin_theta = np.float32(math.sin(float(theta)))
        coef_a = np.float32(np.float32(math.sin(float(np.float32((np.float32(1) - t32) * theta)))) / sin_theta)
        coef_b = np.float32(np.float32(math.sin(float(np.float32(t32 * theta)))) / sin_theta)
    return (coef_a * v0.astype(np.float32) + coef_b * v1.astype(np.float32)).astype(np.float32)


def model_stock_float32(base: Array, models: list[Array], threads: int) -> Array:
    """mergekit 0.1.5's model_stock with ``dtype: float32`` (not filter-wise)."""
    z = base.astype(np.float32)
    ws = [m.astype(np.float32) for m in models]
    offsets = [(w - z).ravel() for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norm_product = max(np.float32(torch_f32_norm(a) * torch_f32_norm(b)), np.float32(1e-6))
            cosines.append(np.float32(np.clip(torch_f32_sum(a * b, threads) / norm_product, -1, 1)))
    total = np.float32(0)
    for c in cosines:
        total = _f32(total + c)
    cos = np.float32(total / np.float32(len(cosines)))
    count = np.float32(len(ws))
    denominator = np.float32(1) + np.float32((count - 1) * cos)
    t = np.float32(0) if abs(denominator) < 1e-6 else np.float32(np.float32(count * cos) / denominator)
    average = ws[0]
    for w in ws[1:]:
        average = average + w
    average = (average / count).astype(np.float32)
    return (t * average + (np.float32(1) - t) * z).astype(np.float32)


def ram(base: Array, models: list[Array], epsilon: float = 1e-5, lambdas: list[float] | None = None) -> Array:
    """mergekit's ram (``lambdas`` None) and ramplus_tl's combination: entries above epsilon count;
    one contributor keeps its entry (times its lambda), several are averaged."""
    deltas = np.stack([m - base for m in models])
    contributes = np.abs(deltas) > epsilon
    count = contributes.sum(axis=0)
    scale = np.ones(len(models)) if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    unique = np.where(count == 1, deltas * scale.reshape((-1,) + (1,) * base.ndim), 0.0)
    shared = np.where(count > 1, deltas / np.maximum(count, 1), 0.0)
    return base + (np.where(contributes, unique + shared, 0.0)).sum(axis=0)


def ramplus_lambdas(base: Array, models: list[Array], r: float, alpha: float, epsilon: float) -> list[float]:
    """ramplus_tl's per-model lambda: 1 + r * clamp(shared / max(unique, epsilon), 0, alpha)."""
    contributes = np.abs(np.stack([m - base for m in models])) > epsilon
    count = contributes.sum(axis=0)
    shared = (contributes & (count > 1)).reshape(len(models), -1).sum(axis=1)
    unique = (contributes & (count == 1)).reshape(len(models), -1).sum(axis=1)
    return [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique, strict=True)]


def arcee_fusion(base: Array, other: Array) -> Array:
    """mergekit's arcee_fusion with exact quartiles: importance = |x - z| * KL(softmax(x) + 1e-8 ||
    softmax(z) + 1e-8) of the row (last axis), keyed at float32; x's change kept where importance >=
    median + 1.5 IQR, the quartile ranks (q * (n - 1)) in float32, truncated."""

    def softmax(v: Array) -> Array:
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True) + 1e-8

    rows_x = other.reshape(-1, other.shape[-1]) if other.ndim >= 2 else other.reshape(1, -1)
    rows_z = base.reshape(rows_x.shape)
    p, q = softmax(rows_x), softmax(rows_z)
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    importance = (np.abs(rows_x - rows_z) * kl).astype(np.float32).ravel()
    ordered = np.sort(importance)
    n = importance.size
    q1, median, q3 = (float(ordered[int(np.float32(f) * np.float32(n - 1))]) for f in (0.25, 0.5, 0.75))
    keep = importance.astype(np.float64) >= median + 1.5 * (q3 - q1)
    return base + (other - base) * keep.reshape(base.shape)

"""Selection rules of the evolution strategies, as pure functions of what the store holds.

Keeping them pure (no I/O, no clocks, no randomness) is what makes a resumed run take the same
decisions as an uninterrupted one: the driver re-derives every step from the stored scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import combinations

from .store import Candidate

Kinship = Callable[[int, int], float]


def rank(population: Iterable[Candidate]) -> list[Candidate]:
    """Done candidates, best search objective first; ties go to the older candidate (lower id)."""
    done = [c for c in population if c.status == "done" and c.objective_search is not None]
    return sorted(done, key=lambda c: (-(c.objective_search or 0.0), c.id))


def pair_key(a: int, b: int) -> tuple[int, int]:
    return (min(a, b), max(a, b))


def merged_pairs(population: Iterable[Candidate]) -> set[tuple[int, int]]:
    """Parent pairs already merged (pending, done or failed alike: nothing is tried twice)."""
    return {pair_key(*c.parents) for c in population if len(c.parents) == 2}


def topk_pairs(top: Sequence[Candidate], merged: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Every not-yet-merged pair among the top k, in rank order."""
    return [(a.id, b.id) for a, b in combinations(top, 2) if pair_key(a.id, b.id) not in merged]


def lower_is_closer(metric: str) -> bool:
    """ed is a distance (small = related); pcc and cs are similarities (large = related)."""
    return metric == "ed"


def explore_partner(
    best: Candidate,
    population: Sequence[Candidate],
    taken: set[tuple[int, int]],
    kinship: Kinship,
    metric: str,
) -> Candidate | None:
    """The model least related to the best one that the best was never merged with (Hu et al.'s
    exploration merge); ``taken`` holds the pairs merged or proposed already. NaN kinship sorts last."""
    options = [c for c in population if c.id != best.id and pair_key(best.id, c.id) not in taken]
    if not options:
        return None

    def distance(c: Candidate) -> tuple[bool, float, int]:
        value = kinship(best.id, c.id)
        closeness = -value if lower_is_closer(metric) else value
        return (math.isnan(value), closeness, c.id)

    return min(options, key=distance)


def kinship_saturated(top: Sequence[Candidate], kinship: Kinship, metric: str, threshold: float) -> bool:
    """True when every pair of the top k is more related than ``threshold`` (the paper's stop:
    pcc or cs above it; for ed, a distance below it)."""
    values = [kinship(a.id, b.id) for a, b in combinations(top, 2)]
    if not values or any(math.isnan(v) for v in values):
        return False
    return all(v < threshold for v in values) if lower_is_closer(metric) else all(v > threshold for v in values)


def unchanged_for(history: Sequence[Sequence[int]], patience: int) -> bool:
    """True when the last ``patience`` generations left the top-k set as it was before them."""
    if len(history) <= patience:
        return False
    last = set(history[-1])
    return all(set(h) == last for h in history[-patience - 1 :])


def soup_accepts(new: float, current: float, compare: str) -> bool:
    """Wortsman's rule: keep the ingredient if the soup's held-out score does not drop (``>=``)."""
    return new >= current if compare == ">=" else new > current

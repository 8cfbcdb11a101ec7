"""The bundled task family's synthetic tasks: four string transformations with exact-match answers.

Every prompt is ``MARKER x1 x2 x3 x4 =`` and its answer four tokens, so prompts of one task batch
without padding. Inputs are split deterministically by their index: one tenth is the ``search``
split (used for selection), one tenth the ``test`` split (held out, reported), the rest trains.
This module needs only numpy: the training script (torch) and the evaluator both import it."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

LETTERS = "abcdefgh"
DIGITS = "0123456789"
TOKENS = ["<pad>", "=", "R", "S", "T", "W", *DIGITS, *LETTERS]
VOCAB = 32  # the embedding has spare rows, as real vocabularies do
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
PROMPT_LEN = 6
ANSWER_LEN = 4
SPLITS = ("search", "test", "train")
# Prompts per task in an evaluation split: enough to score to ~3 points, few enough that an evaluation
# takes a fraction of a second with the numpy forward pass.
EVAL_PROMPTS = 256


def _reverse(x: str) -> str:
    return x[::-1]


def _sort(x: str) -> str:
    return "".join(sorted(x))


def _shift(x: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in x)


def _swap(x: str) -> str:
    return x[1] + x[0] + x[3] + x[2]


# task name -> (marker, alphabet, answer)
TASKS: dict[str, tuple[str, str, Callable[[str], str]]] = {
    "reverse": ("R", LETTERS, _reverse),
    "sort": ("S", DIGITS, _sort),
    "shift": ("T", LETTERS, _shift),
    "swap": ("W", DIGITS, _swap),
}


def _input(alphabet: str, index: int) -> str:
    n = len(alphabet)
    return "".join(alphabet[(index // n**p) % n] for p in range(ANSWER_LEN))


def split_of(index: int) -> str:
    """Which split the input with this index belongs to (a fixed hash of the index)."""
    bucket = (index * 2654435761) % 2**32 % 10
    return "search" if bucket == 0 else "test" if bucket == 1 else "train"


@functools.cache
def examples(task: str, split: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(prompts, answers) of ``task`` in ``split`` as token ids, shapes (n, 6) and (n, 4); the
    evaluation splits hold at most EVAL_PROMPTS evenly spaced inputs. Cached, read-only."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    marker, alphabet, answer = TASKS[task]
    prompts, answers = [], []
    for index in range(len(alphabet) ** ANSWER_LEN):
        if split_of(index) != split:
            continue
        x = _input(alphabet, index)
        prompts.append([TOKEN_ID[marker], *(TOKEN_ID[c] for c in x), TOKEN_ID["="]])
        answers.append([TOKEN_ID[c] for c in answer(x)])
    keep = np.arange(len(prompts))
    if split != "train" and len(prompts) > EVAL_PROMPTS:
        keep = np.linspace(0, len(prompts) - 1, EVAL_PROMPTS).round().astype(np.int64)
    out = np.array(prompts, dtype=np.int64)[keep], np.array(answers, dtype=np.int64)[keep]
    for array in out:
        array.flags.writeable = False  # cached: shared by every caller
    return out


def decode(ids: npt.ArrayLike) -> str:
    """The text of a row of token ids."""
    return "".join(TOKENS[int(i)] if int(i) < len(TOKENS) else "?" for i in np.asarray(ids).ravel())

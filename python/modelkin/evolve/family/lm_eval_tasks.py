"""The bundled task family's tasks as lm-evaluation-harness task YAMLs with their data, so the family
evolves through the ``lm_eval`` evaluator as it does through the numpy one.

Each family task becomes two lm-eval tasks, one per evaluation split (``tasks.split_of``):
``family_<task>_search`` (what ``tasks:`` scores) and ``family_<task>_test`` (held out: what
``test_tasks:`` scores). Each reads its split from a local JSONL file of ``{"prompt", "answer"}``
rows, the same prompts (and order) as the numpy evaluator's, generates with ``generate_until``
(greedy, ``ANSWER_LEN`` tokens, stopping at ``<pad>``, the tokenizer's eos) and scores
``exact_match``, so its score equals the numpy evaluator's score of that task.

The YAMLs name their data files by absolute path (``datasets`` resolves relative data files from the
working directory, not from the YAML): after moving the directory, write it again."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .tasks import ANSWER_LEN, TASKS, TOKENS, examples

SPLITS = ("search", "test")
DIRECTORY = "lm_eval_tasks"


def task_name(task: str, split: str) -> str:
    """The lm-eval task that scores family task ``task`` on ``split``."""
    return f"family_{task}_{split}"


def _text(ids: Iterable[Any]) -> str:
    return "".join(TOKENS[int(i)] for i in ids)


def _yaml(task: str, split: str, data: Path) -> str:
    # json.dumps gives a double-quoted scalar that YAML reads back unchanged (paths with spaces,
    # colons or backslashes included).
    return f"""\
# The bundled task family's {task!r} task, {split} split (written by `modelkin example --tasks`).
task: {task_name(task, split)}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {json.dumps(str(data))}
test_split: {split}
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["<pad>"]
  max_gen_toks: {ANSWER_LEN}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lm_eval_tasks(directory: str | Path) -> dict[str, list[str]]:
    """Writes one task YAML per family task and split into ``directory`` (its data under
    ``directory/data``); returns the lm-eval task names per split, in TASKS order."""
    root = Path(directory).resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    for task in TASKS:
        for split in SPLITS:
            prompts, answers = examples(task, split)
            data = root / "data" / f"{task}.{split}.jsonl"
            rows = (
                json.dumps({"prompt": _text(p), "answer": _text(a)}) + "\n"
                for p, a in zip(prompts, answers, strict=True)
            )
            data.write_text("".join(rows))
            (root / f"{task_name(task, split)}.yaml").write_text(_yaml(task, split, data))
            names[split].append(task_name(task, split))
    return names

"""The bundled task family: a tiny Llama-architecture base and four fine-tunes, each trained on one
synthetic task (see :mod:`.tasks`), with an evaluator that runs them with a numpy forward pass.

The weights were trained by ``scripts/train_task_family.py`` (torch, run by a developer) and ship
with the package, so the whole evolution loop runs for real on a laptop with no download. Each model
is a complete Hugging Face model (a character-level tokenizer and a generation config beside the
weights, see :mod:`.hf`), and the tasks also ship as lm-eval task YAMLs (see :mod:`.lm_eval_tasks`).

    python -m modelkin.evolve.family MODEL --split search     # prints {"reverse": 0.93, ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...io.resident import ResidentModel, StoredModel
from ...io.safetensors import load_model
from ...io.staging import copy_tree
from ...io.towers import language_model
from .forward import LlamaModel
from .lm_eval_tasks import DIRECTORY as LM_EVAL_TASKS
from .lm_eval_tasks import write_lm_eval_tasks
from .tasks import ANSWER_LEN, TASKS, examples

WEIGHTS = Path(__file__).parent / "weights"
MODELS = ("base", "ft-reverse", "ft-sort", "ft-shift", "ft-swap")
# LoRA adapters of the base, one per task (scripts/extract_family_adapters.py).
ADAPTERS = ("lora-reverse", "lora-sort", "lora-shift", "lora-swap")


def load(model: str | Path | ResidentModel) -> LlamaModel:
    """A model of the family (or a merge of it) ready for the numpy forward pass: its directory, or
    the model in memory (a merged candidate handed over by a resident run, nothing written)."""
    if not isinstance(model, ResidentModel):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (a Llama model directory is expected)")
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
        if "vision_config" not in config:
            return LlamaModel(load_model(path), config)
        model = StoredModel(path)
    # A VLM (its text model the family's) is scored by its language model: the tasks are text.
    model = language_model(model)
    if model.config is None:
        raise ValueError(f"{model.label}: no config (a Llama model is expected)")
    return LlamaModel(model, model.config)


def evaluate(model: str | Path | ResidentModel, split: str = "search") -> dict[str, float]:
    """Exact-match accuracy of greedy decoding on each task's prompts of ``split`` (search or test);
    ``model`` is a model directory or a model in memory (``resident: true``)."""
    net = load(model)
    scores: dict[str, float] = {}
    for task in TASKS:
        prompts, answers = examples(task, split)
        got = net.generate(prompts, ANSWER_LEN)
        scores[task] = float(np.mean(np.all(got == answers, axis=1)))
    return scores


# The topk search both evolve.yml and evolve-lmeval.yml run: only the evaluator differs.
TOPK_SEARCH = """\
pool: [./ft-reverse, ./ft-sort, ./ft-shift, ./ft-swap]
base_model: ./base
strategy: topk
topk: {k: 3, generations: 5, explore: kinship, metric: pcc, stop_kinship: 0.9, patience: 2}
merge:
  merge_method: slerp
  parameters: {t: 0.5}
  dtype: float32
"""

EVOLVE_YML = (
    "# Top-k greedy merging with kinship-guided exploration (Hu et al. 2024) on the bundled task family.\n"
    + TOPK_SEARCH.replace("{", "{{").replace("}", "}}")
    + """\
evaluator:
  python: "modelkin.evolve.family:evaluate"
  resident: true   # candidates are handed over in memory: nothing is read back from disk
{keep}"""
)

EVOLVE_LMEVAL_YML = """\
# The search of evolve.yml, scored by lm-evaluation-harness (pip install 'modelkin[lmeval]') instead of
# the numpy evaluator: the task YAMLs and their data are in ./{directory}; tasks score the search split,
# test_tasks the held-out test split, each by exact_match (the same prompts and scores as evolve.yml).
{search}evaluator:
  lm_eval:
    include_path: ./{directory}
    tasks: [{tasks}]
    test_tasks: [{test_tasks}]
    batch_size: 256
    device: cpu
"""

SOUP_YML = """\
# Greedy soup (Wortsman et al. 2022) of the bundled task family; the uniform soup is scored beside it.
pool: [./ft-reverse, ./ft-sort, ./ft-shift, ./ft-swap]
base_model: ./base
strategy: greedy_soup
greedy_soup: {compare: ">="}
merge: {merge_method: linear, dtype: float32}
evaluator:
  python: "modelkin.evolve.family:evaluate"
  resident: true
"""


# LoraHub's setting (Huang et al. 2023) on the family's adapters: CMA-ES over one weight per adapter.
EVOLVE_LORA_YML = """\
# CMA-ES over the weights of the family's four LoRA adapters (one per adapter, as LoraHub searches
# them): each candidate their task arithmetic, written as one PEFT adapter (the factors concatenated,
# kilobytes), scored by the numpy evaluator on the base with the adapter applied in memory.
strategy: cmaes
genome:
  models: [./lora-reverse, ./lora-sort, ./lora-shift, ./lora-swap]
  base_model: ./base
  merge_method: task_arithmetic
  layer_granularity: 0
  out_format: adapter
cmaes: {sigma0: 0.1667, max_evals: 40, seed: 0}
evaluator:
  python: "modelkin.evolve.family:evaluate"
  resident: true
"""


def write_task_family(directory: str | Path) -> dict[str, Path]:
    """Copies the family's models to ``directory`` (each a complete Hugging Face model: weights,
    config, tokenizer and generation config) and its four LoRA adapters (``lora-*``, PEFT's layout)
    with ready configs ``evolve.yml`` (topk with kinship exploration), ``soup.yml`` (greedy soup),
    ``evolve-lora.yml`` (CMA-ES over the adapters' weights) and ``evolve-lmeval.yml`` (the topk search through
    lm-eval, on the task YAMLs and data written to ``lm_eval_tasks/``); returns the paths written."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in (*MODELS, *ADAPTERS):
        copy_tree(WEIGHTS / name, root / name)  # modes from the umask, not the installed package's
        written[name] = root / name
    names = write_lm_eval_tasks(root / LM_EVAL_TASKS)
    texts = {
        "evolve.yml": EVOLVE_YML.format(keep=""),
        "soup.yml": SOUP_YML,
        "evolve-lora.yml": EVOLVE_LORA_YML,
        "evolve-lmeval.yml": EVOLVE_LMEVAL_YML.format(
            directory=LM_EVAL_TASKS,
            search=TOPK_SEARCH,
            tasks=", ".join(names["search"]),
            test_tasks=", ".join(names["test"]),
        ),
    }
    for name, text in texts.items():
        (root / name).write_text(text)
        written[name] = root / name
    written[LM_EVAL_TASKS] = root / LM_EVAL_TASKS
    return written

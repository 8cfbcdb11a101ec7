"""The lm-evaluation-harness evaluator: the adapter's contract with ``lm_eval.simple_evaluate``
(checked against a stand-in module that records its call), and the real package where installed."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import pytest

from modelkin.evolve.config import lm_eval_weights, load_evolve_config
from modelkin.evolve.evaluator_registry import make_evaluator
from modelkin.evolve.evaluators import ObjectiveError
from modelkin.evolve.lmeval import lm_eval_evaluator


@pytest.fixture
def fake_lm_eval(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("lm_eval")

    def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"results": {"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.6}, "gsm8k": {"exact_match,strict": 0.25}}}

    module.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    return calls


def test_adapter_passes_settings_and_reads_metrics(fake_lm_eval):
    settings = {
        # arc_easy reports two metrics: its entry names one (there is no default metric).
        "tasks": [
            {"name": "arc_easy", "metric": "acc,none"},
            {"name": "gsm8k", "weight": 2.0, "metric": "exact_match,strict"},
        ],
        "model_args": "dtype=float32",
        "limit": 50,
        "num_fewshot": 5,
        "batch_size": 4,
        "device": "cpu",
    }
    scores = lm_eval_evaluator(settings)("/models/c3", "search")
    assert scores == {"arc_easy": 0.5, "gsm8k": 0.25}
    call = fake_lm_eval[0]
    assert call["model"] == "hf" and call["model_args"] == "pretrained=/models/c3,dtype=float32"
    assert call["tasks"] == ["arc_easy", "gsm8k"]
    assert (call["limit"], call["num_fewshot"], call["batch_size"], call["device"]) == (50, 5, 4, "cpu")
    assert lm_eval_weights(settings) == {"arc_easy": 1.0, "gsm8k": 2.0}
    assert lm_eval_weights({"tasks": ["a", {"name": "b"}]}) is None


def test_adapter_refuses_a_missing_metric(fake_lm_eval):
    run = lm_eval_evaluator({"tasks": [{"name": "arc_easy", "metric": "f1,none"}]})
    # A config error (the same for every candidate): it stops the run rather than failing candidates.
    with pytest.raises(
        ObjectiveError, match=r"no 'f1,none' for task 'arc_easy' \(it reports: acc,none, acc_norm,none\)"
    ):
        run("/m", "search")


def test_config_selects_the_adapter(fake_lm_eval):
    config = load_evolve_config(
        {"pool": ["a", "b"], "base_model": "z", "evaluator": {"lm_eval": {"tasks": ["gsm8k"], "limit": 10}}}
    )
    assert config.evaluator.resident  # lm-eval's hf model is kept resident unless told otherwise
    config = load_evolve_config(
        {"pool": ["a", "b"], "base_model": "z", "evaluator": {"resident": False, "lm_eval": {"tasks": ["gsm8k"]}}}
    )
    # gsm8k reports one metric: it is the score (without test_tasks, only search is scored).
    assert make_evaluator(config.evaluator)("/m", "search") == {"gsm8k": 0.25}


def test_heavy_dependencies_are_imported_only_when_asked_for():
    code = (
        "import sys, modelkin, modelkin.cli, modelkin.evolve, modelkin.evolve.family; "
        "print(sorted(m for m in ('lm_eval', 'ray', 'torch', 'cmaes') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

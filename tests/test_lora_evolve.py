"""Evolving pools of LoRA adapters (issue 24, items 5 and 7): the bundled family's adapters, topk
(whose kinship takes the factor path), greedy soups and CMA-ES over the adapters' weights give the
same scores and decisions as the same runs over the adapters materialised as full models, resident
or by path; DFS refuses adapters by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import modelkin
import modelkin.evolve as evo
from evolve_support import strategy_specs
from modelkin.evolve.family import ADAPTERS, write_task_family
from modelkin.io.resident import AdaptedModel
from modelkin.testing import run_cli

SPECS = strategy_specs(layer_granularity=0, max_evals=8)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    written = write_task_family(root)
    # The adapters materialised as full models: the reference runs.
    for name in ADAPTERS:
        AdaptedModel(written[name], written["base"]).save(root / f"dense-{name}")
    return root


def config(root: Path, strategy: str, models: list[str], resident: bool) -> dict[str, Any]:
    spec = json.loads(json.dumps(SPECS[strategy]))
    models_given = models
    models = [str(root / m) for m in models]
    if strategy == "cmaes":
        spec["genome"] |= {"models": models, "base_model": str(root / "base")}
        if all(m.startswith("lora-") for m in models_given):
            # Candidates written as adapters: the factors concatenated, no merge dtype.
            del spec["genome"]["dtype"]
            spec["genome"]["out_format"] = "adapter"
    else:
        spec |= {"pool": models, "base_model": str(root / "base")}
    return spec | {"evaluator": {"python": "modelkin.evolve.family:evaluate", "resident": resident}}


def summary(run: evo.Run) -> list[tuple[Any, ...]]:
    return [(c.generation, c.role, len(c.parents), c.objective_search, c.objective_test) for c in run.candidates]


@pytest.mark.parametrize("strategy", list(SPECS))
@pytest.mark.parametrize("resident", [True, False])
def test_an_adapter_pool_evolves_as_its_materialised_models(tmp_path, family, strategy, resident):
    adapters = evo.evolve(config(family, strategy, list(ADAPTERS), resident), tmp_path / "adapters")
    dense = evo.evolve(config(family, strategy, [f"dense-{a}" for a in ADAPTERS], resident), tmp_path / "dense")
    assert summary(adapters) == summary(dense)
    assert adapters.best is not None and adapters.best.objective_search is not None
    assert adapters.stop_reason == (dense.stop_reason or "").replace("dense-", "")
    if strategy == "cmaes":
        # The best candidate is exported as what it is: a PEFT adapter of the base.
        done = run_cli("runs", "best", str(tmp_path / "adapters"), str(tmp_path / "best"))
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "best" / "adapter_config.json").is_file()
        assert not (tmp_path / "best" / "model.safetensors").exists()


def test_topk_kinship_of_adapters_is_the_factor_path_and_matches_dense(family):
    a, b = family / ADAPTERS[0], family / ADAPTERS[1]
    factor = modelkin.kinship(a, b, base=family / "base")
    dense = modelkin.kinship(family / f"dense-{ADAPTERS[0]}", family / f"dense-{ADAPTERS[1]}", base=family / "base")
    for metric in ("pcc", "cs", "ed"):
        # The dense models are the adapters applied in float32, so they agree to float32 rounding.
        assert factor.metrics[metric] == pytest.approx(dense.metrics[metric], rel=1e-4), metric


def test_the_shipped_lora_config_evolves(tmp_path, family):
    text = (family / "evolve-lora.yml").read_text()
    spec = yaml.safe_load(text)
    assert spec["genome"]["models"] == [f"./{a}" for a in ADAPTERS]
    spec["cmaes"]["max_evals"] = 8
    path = family / "evolve-lora-short.yml"
    path.write_text(yaml.safe_dump(spec))
    done = run_cli("evolve", str(path), str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    run = evo.open_run(tmp_path / "run")
    assert run.best is not None and run.best.objective_search is not None


def test_dfs_refuses_an_adapter_pool(tmp_path, family):
    spec = {
        "strategy": "dfs",
        "base_model": str(family / "base"),
        "dfs": {"models": [str(family / "ft-sort"), str(family / ADAPTERS[0])], "repeats": 1},
        "evaluator": {"python": "modelkin.evolve.family:evaluate"},
    }
    path = tmp_path / "dfs.yml"
    path.write_text(yaml.safe_dump(spec))
    done = run_cli("evolve", str(path), str(tmp_path / "run"))
    assert done.returncode == 2 and "LoRA adapter" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "genome,words",
    [
        ({"merge_method": "ties", "out_format": "adapter"}, "not ties"),
        ({"merge_method": "task_arithmetic", "out_format": "adapter", "dtype": "float32"}, "dtype"),
        ({"merge_method": "task_arithmetic", "out_format": "lora"}, "model or adapter"),
    ],
)
def test_adapter_candidates_are_refused_where_not_exact(tmp_path, family, genome, words):
    spec = {
        "strategy": "cmaes",
        "genome": {"models": [str(family / a) for a in ADAPTERS[:2]], "base_model": str(family / "base"), **genome},
        "evaluator": {"python": "modelkin.evolve.family:evaluate"},
    }
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(spec))
    done = run_cli("evolve", str(path), str(tmp_path / "run"))
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()

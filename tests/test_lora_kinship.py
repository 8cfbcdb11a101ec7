"""LoRA adapters in kinship (issue 24, item 2): exact from the factors, never materialising ΔW,
equal to dense kinship of the materialised models for every PEFT config variant written here
(numpy, PEFT's layout): plain, rsLoRA, rank and alpha patterns, fan_in_fan_out, embedding LoRA,
modules_to_save, and an adapter against a full fine-tune."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from lora_support import VARIANTS, exact_deltas, write_adapter

import modelkin
from evolve_support import small_family
from modelkin.io.safetensors import load_model, save_model
from modelkin.testing import read_safetensors, run_cli
from reference import full, split


@pytest.fixture
def family(tmp_path):
    base, pool = small_family(tmp_path / "fam", n=1)
    return base, pool[0], load_model(base)


@pytest.mark.parametrize("other", list(VARIANTS))
@pytest.mark.parametrize("split_mode", [False, True])
def test_adapter_kinship_equals_the_dense_kinship_of_the_materialised_models(tmp_path, family, other, split_mode):
    base_dir, _, base = family
    first = write_adapter(tmp_path / "a", base, *VARIANTS["plain"], seed=1)
    second = write_adapter(tmp_path / "b", base, *VARIANTS[other], seed=2)
    result = modelkin.kinship(tmp_path / "a", tmp_path / "b", base=base_dir, split=split_mode)
    da, db = exact_deltas(base, first), exact_deltas(base, second)
    for metric in ("pcc", "cs", "ed"):
        try:
            want = (split if split_mode else full)(da, db, metric)
        except ZeroDivisionError:  # split: no tensor where the metric is defined (no common target)
            want = math.nan
        assert result.metrics[metric] == pytest.approx(want, rel=1e-9, abs=1e-12, nan_ok=True), metric
    assert result.n == sum(d.size for d in da.values()) and result.tensors == len(base)
    # The same models materialised in float64 and measured by the dense pass: the same numbers.
    for name, deltas in (("a", first), ("b", second)):
        save_model(
            tmp_path / f"dense-{name}", {n: z.astype(np.float64) + deltas.get(n, 0.0) for n, z in base.items()}, "F64"
        )
    save_model(tmp_path / "dense-base", base, "F64")
    dense = modelkin.kinship(tmp_path / "dense-a", tmp_path / "dense-b", base=tmp_path / "dense-base", split=split_mode)
    for metric in ("pcc", "cs", "ed"):
        assert result.metrics[metric] == pytest.approx(dense.metrics[metric], rel=1e-9, abs=1e-12, nan_ok=True), metric


def test_adapter_against_a_full_fine_tune_and_per_tensor(tmp_path, family):
    base_dir, fine_tune, base = family
    deltas = write_adapter(tmp_path / "a", base, *VARIANTS["embedding and saved head"], seed=3)
    result = modelkin.kinship(tmp_path / "a", fine_tune, base=base_dir, per_tensor=True)
    tuned = load_model(fine_tune)
    rows = base["lm_head.weight"].shape[0]
    dense = {n: (tuned[n].astype(np.float64) - z.astype(np.float64))[:rows].ravel() for n, z in base.items()}
    da = exact_deltas(base, deltas)
    for metric in ("pcc", "cs", "ed"):
        assert result.metrics[metric] == pytest.approx(full(da, dense, metric), rel=1e-9), metric
    assert result.per_tensor is not None
    rows_by_name = {t.name: t for t in result.per_tensor}
    untargeted = rows_by_name["model.norm.weight"]
    assert math.isnan(untargeted.pcc) and untargeted.ed == pytest.approx(
        float(np.linalg.norm(dense["model.norm.weight"]))
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "use_dora: true is not supported yet"),
        ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
        ({"r": 8}, "rank 8 from the config, but lora_A is [4, 32]"),
    ],
)
def test_unsupported_or_inconsistent_adapters_are_refused_by_name(tmp_path, family, config, message):
    base_dir, _, base = family
    write_adapter(tmp_path / "a", base, {"model.layers.0.self_attn.q_proj": {"r": 4}}, {}, seed=1)
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    write_adapter(tmp_path / "b", base, *VARIANTS["plain"], seed=2)
    with pytest.raises(modelkin.InvalidModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        modelkin.kinship(tmp_path / "a", tmp_path / "b", base=base_dir)


def test_a_module_the_base_lacks_and_unsupported_options_are_refused(tmp_path, family):
    base_dir, _, base = family
    write_adapter(tmp_path / "b", base, *VARIANTS["plain"], seed=2)
    write_adapter(
        tmp_path / "a",
        {**base, "model.layers.9.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"]},
        {"model.layers.9.mlp.up_proj": {}},
        {},
        seed=1,
    )
    with pytest.raises(
        modelkin.InvalidModelError, match=r"targets model\.layers\.9\.mlp\.up_proj\.weight, which the base"
    ):
        modelkin.kinship(tmp_path / "a", tmp_path / "b", base=base_dir)
    with pytest.raises(ValueError, match="low_precision: adapter kinship is computed exactly from the factors"):
        modelkin.kinship(tmp_path / "b", tmp_path / "b", base=base_dir, low_precision=True)


def test_the_command_line_takes_adapters(tmp_path, family):
    from evolve_support import one_line_error
    from modelkin.testing import run_cli

    base_dir, _, base = family
    write_adapter(tmp_path / "a", base, *VARIANTS["plain"], seed=1)
    write_adapter(tmp_path / "b", base, *VARIANTS["rslora and patterns"], seed=2)
    done = run_cli("kinship", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(base_dir), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    api = modelkin.kinship(tmp_path / "a", tmp_path / "b", base=base_dir)
    assert shown["metrics"]["pcc"] == pytest.approx(api.pcc, rel=1e-12)
    done = run_cli("matrix", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(base_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert str(api.pcc)[:8] in done.stdout
    config = tmp_path / "a" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    done = run_cli("kinship", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(base_dir))
    one_line_error(done, "use_dora: true is not supported yet")


def test_a_matrix_of_adapters_and_a_full_fine_tune(tmp_path, family):
    base_dir, fine_tune, base = family
    write_adapter(tmp_path / "a", base, *VARIANTS["plain"], seed=1)
    write_adapter(tmp_path / "b", base, *VARIANTS["rslora and patterns"], seed=2)
    models = [tmp_path / "a", tmp_path / "b", fine_tune]
    matrix = modelkin.kinship_matrix(models, base=base_dir)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        pair = modelkin.kinship(models[i], models[j], base=base_dir)
        for metric in ("pcc", "cs", "ed"):
            assert matrix[metric][i, j] == matrix[metric][j, i] == pytest.approx(pair.metrics[metric], rel=1e-12)
    assert np.allclose(np.diag(matrix["pcc"]), 1.0) and np.all(np.diag(matrix["ed"]) == 0.0)


def test_adapters_by_hub_id_from_a_fake_offline_cache(tmp_path, family):
    from test_cli import fake_hub_cache

    base_dir, _, base = family
    for name, variant, seed in (("a", "plain", 1), ("b", "rslora and patterns", 2)):
        write_adapter(tmp_path / name, base, *VARIANTS[variant], seed=seed)

    def linear(model: str) -> dict[str, Any]:
        return {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1}}]}

    # The same adapters by path, before their configs name a base.
    local = modelkin.kinship(tmp_path / "a", tmp_path / "b", base=base_dir)
    want = modelkin.merge(linear(f"{base_dir}+{tmp_path / 'a'}"))
    # On the Hub, each adapter's config names its base by Hub id.
    for name in ("a", "b"):
        config_file = tmp_path / name / "adapter_config.json"
        named = {**json.loads(config_file.read_text()), "base_model_name_or_path": "org/base"}
        config_file.write_text(json.dumps(named))
    cache = tmp_path / "hub"
    for repo, path in (("org/base", base_dir), ("org/lora-a", tmp_path / "a"), ("org/lora-b", tmp_path / "b")):
        fake_hub_cache(cache, repo, path)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = run_cli("kinship", "org/lora-a", "org/lora-b", "--base", "org/base", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["metrics"]["pcc"] == pytest.approx(local.pcc, rel=1e-12)
    # In a recipe: BASE+ADAPTER by Hub ids, and a bare adapter whose config names its base by Hub id.
    for model in ("org/base+org/lora-a", "org/lora-a"):
        recipe = tmp_path / "r.yml"
        recipe.write_text(json.dumps(linear(model)))
        out = tmp_path / f"out-{model.replace('/', '_')}"
        done = run_cli("merge", str(recipe), str(out), env=env)
        assert done.returncode == 0, done.stderr
        got = read_safetensors(out)
        for name in want.tensor_names:
            np.testing.assert_array_equal(got[name], np.asarray(want[name], dtype=np.float64), err_msg=name)


def test_an_adapter_of_another_base_is_refused_naming_both(tmp_path, family):
    base_dir, fine_tune, base = family
    targets, config = VARIANTS["plain"]
    write_adapter(tmp_path / "a", base, targets, {**config, "base_model_name_or_path": str(fine_tune)}, seed=1)
    write_adapter(tmp_path / "b", base, targets, config, seed=2)
    done = run_cli("kinship", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(base_dir))
    assert done.returncode == 2, done.stderr
    assert str(fine_tune) in done.stderr and str(base_dir) in done.stderr and len(done.stderr.strip().splitlines()) == 1

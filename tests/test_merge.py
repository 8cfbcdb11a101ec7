"""Merges: every method against the independent float64 reference, the output layout and its
provenance, determinism, and bad recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import modelkin
from merge_reference import (
    breadcrumbs_mask,
    f32_delta,
    karcher,
    kth_magnitude_mask,
    model_stock,
    multislerp,
    nuslerp,
    read_safetensors,
    sce,
    slerp,
    task_vector_merge,
)
from modelkin.merge import planner
from modelkin.merge.merging import merge
from modelkin.merge.parameters import evaluate, gradient_position
from modelkin.testing import run_cli, tree_digest


@pytest.fixture
def fam(family_factory):
    return family_factory(n=3, dtype="BF16", shards=2)


def inputs(fam):
    """Stored values of base and fine-tunes, fine-tunes cut to the base's vocabulary."""
    base = fam.base_values
    models = [{k: v[: base[k].shape[0]] if v.ndim else v for k, v in m.items()} for m in fam.values[1:]]
    return base, models


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def check_close(out: dict, expected: dict) -> None:
    """Output (float32) equals the reference rounded to float32, up to 1 ulp on rare elements."""
    assert set(out) == set(expected)
    total = mismatched = 0
    for name, reference in expected.items():
        got = out[name].astype(np.float32)
        want = reference.astype(np.float32)
        assert got.shape == want.shape, name
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
        assert ulps.max() <= 1, f"{name}: {ulps.max()} ulps apart"
        mismatched += int((ulps > 0).sum())
        total += ulps.size
    assert mismatched <= total * 1e-3, f"{mismatched} of {total} elements differ by 1 ulp"


def run_recipe(tmp_path, fam, method, model_params, parameters=None, base=True, **kwargs):
    recipe = {
        "models": [{"model": str(m), "parameters": p} for m, p in zip(fam.models, model_params, strict=True)],
        "merge_method": method,
        "dtype": "float64",
        "out_dtype": "float32",
    }
    if base:
        recipe["base_model"] = str(fam.base)
    if parameters:
        recipe["parameters"] = parameters
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    result = merge(write_recipe(tmp_path, recipe), out, **kwargs)
    return result, read_safetensors(out)


WEIGHTS = [0.5, 0.3, 0.8]


def test_linear(tmp_path, fam):
    result, out = run_recipe(tmp_path, fam, "linear", [{"weight": w} for w in WEIGHTS], base=False)
    _, models = inputs(fam)
    expected = {k: sum(w * m[k] for w, m in zip(WEIGHTS, models, strict=True)) / sum(WEIGHTS) for k in models[0]}
    check_close(out, expected)
    assert result.kinship is None


def test_task_arithmetic_with_lambda(tmp_path, fam):
    _, out = run_recipe(tmp_path, fam, "task_arithmetic", [{"weight": w} for w in WEIGHTS], {"lambda": 0.7})
    base, models = inputs(fam)
    expected = {
        k: task_vector_merge(
            base[k], [m[k] for m in models], WEIGHTS, masks=None, consensus=False, normalize=False, lam=0.7
        )
        for k in base
    }
    check_close(out, expected)


@pytest.mark.parametrize("torch_ties", [True, False], ids=["torch-order", "streamed"])
def test_ties(tmp_path, fam, monkeypatch, torch_ties):
    if not torch_ties:
        monkeypatch.setattr(planner, "SORT_ORDER_BYTES", 0)
    densities = [0.5, 0.3, 0.9]
    params = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, densities, strict=True)]
    _, out = run_recipe(tmp_path, fam, "ties", params)
    base, models = inputs(fam)
    expected = {}
    for k in base:
        masks = [
            kth_magnitude_mask(f32_delta(m[k], base[k]), int(d * base[k].size), torch_ties)
            if d < 1
            else np.ones(base[k].shape, bool)
            for m, d in zip(models, densities, strict=True)
        ]
        expected[k] = task_vector_merge(
            base[k], [m[k] for m in models], WEIGHTS, masks=masks, consensus=True, normalize=True
        )
    check_close(out, expected)


@pytest.mark.parametrize("torch_ties", [True, False], ids=["torch-order", "streamed"])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(tmp_path, fam, monkeypatch, method, torch_ties):
    if not torch_ties:
        monkeypatch.setattr(planner, "SORT_ORDER_BYTES", 0)
    params = [{"weight": w, "density": 0.6, "gamma": 0.05} for w in WEIGHTS]
    _, out = run_recipe(tmp_path, fam, method, params)
    base, models = inputs(fam)
    expected = {}
    for k in base:
        masks = [breadcrumbs_mask(f32_delta(m[k], base[k]), 0.6, 0.05, torch_ties) for m in models]
        expected[k] = task_vector_merge(
            base[k],
            [m[k] for m in models],
            WEIGHTS,
            masks=masks,
            consensus=method == "breadcrumbs_ties",
            normalize=False,
        )
    check_close(out, expected)


def test_dare_at_density_one_is_task_arithmetic(tmp_path, fam):
    params = [{"weight": w, "density": 1.0} for w in WEIGHTS]
    _, dare = run_recipe(tmp_path / "a", fam, "dare_linear", params)
    _, plain = run_recipe(tmp_path / "b", fam, "task_arithmetic", [{"weight": w} for w in WEIGHTS])
    for k in dare:
        np.testing.assert_array_equal(dare[k], plain[k])


def test_dare_keeps_the_density_and_the_l1_norm(tmp_path):
    from modelkin.io.safetensors import save_file

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (256, 256))
    tuned = base + rng.normal(0, 0.01, base.shape)
    save_file(tmp_path / "base.safetensors", {"w": base}, "F32")
    save_file(tmp_path / "ft.safetensors", {"w": tuned}, "F32")
    recipe = {
        "models": [{"model": str(tmp_path / "ft.safetensors"), "parameters": {"weight": 1.0, "density": 0.5}}],
        "merge_method": "dare_linear",
        "base_model": str(tmp_path / "base.safetensors"),
        "out_dtype": "float32",
    }
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", seed=3)
    merged = read_safetensors(tmp_path / "out")["w"] - base.astype(np.float32)
    delta = tuned.astype(np.float32).astype(np.float64) - base.astype(np.float32)
    assert (merged != 0).mean() == pytest.approx(0.5, abs=0.01)
    assert np.abs(merged).sum() == pytest.approx(np.abs(delta).sum(), rel=1e-3)


def test_dare_ties_is_reproducible_and_independent_of_threads(tmp_path, fam):
    params = [{"weight": w, "density": 0.4} for w in WEIGHTS]
    recipe = {
        "models": [{"model": str(m), "parameters": p} for m, p in zip(fam.models, params, strict=True)],
        "merge_method": "dare_ties",
        "base_model": str(fam.base),
        "out_dtype": "bfloat16",
    }
    path = write_recipe(tmp_path, recipe)
    merge(path, tmp_path / "one", seed=7, threads=1)
    merge(path, tmp_path / "two", seed=7, threads=2)
    merge(path, tmp_path / "other", seed=8, threads=2)
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert one != (tmp_path / "other" / "model.safetensors").read_bytes()


def test_slerp_with_gradient(tmp_path, family_factory):
    fam = family_factory(n=1, dtype="BF16")
    recipe = {
        "models": [{"model": str(fam.base)}, {"model": str(fam.models[0])}],
        "merge_method": "slerp",
        "base_model": str(fam.base),
        "parameters": {"t": [0.0, 0.5, 1.0]},
        "out_dtype": "float32",
    }
    merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = read_safetensors(tmp_path / "out")
    base, other = fam.base_values, fam.values[1]
    for k in base:
        t = evaluate([0.0, 0.5, 1.0], k, gradient_position(k, 2))
        check_close({k: out[k]}, {k: slerp(t, base[k], other[k])})


def test_model_stock(tmp_path, fam):
    _, out = run_recipe(tmp_path, fam, "model_stock", [{}, {}, {}])
    base, models = inputs(fam)
    check_close(out, {k: model_stock(base[k], [m[k] for m in models]) for k in base})


def test_arcee_fusion(tmp_path, fam):
    """The other model's changes where their importance is an outlier, against the float64
    reference; some entries change and most do not."""
    from merge_reference import arcee_fusion

    recipe = {
        "models": [{"model": str(fam.models[0])}],
        "base_model": str(fam.base),
        "merge_method": "arcee_fusion",
        "out_dtype": "float32",
    }
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", precise=True)
    out = read_safetensors(tmp_path / "out")
    base, models = inputs(fam)
    expected = {k: arcee_fusion(base[k], models[0][k]) for k in base}
    check_close(out, expected)
    name = next(k for k in base if base[k].ndim == 2)
    changed = np.mean(out[name] != base[name].astype(np.float32))
    assert 0 < changed < 0.5, changed


@pytest.mark.parametrize("plus", [False, True])
def test_ram(tmp_path, fam, plus):
    """ram and ramplus_tl against the float64 reference; epsilon high enough that some entries are
    shared, some unique and some dropped."""
    from merge_reference import ram, ramplus_lambdas

    params = {"epsilon": 0.01, **({"r": 0.5, "alpha": 0.8} if plus else {})}
    _, out = run_recipe(tmp_path, fam, "ramplus_tl" if plus else "ram", [{}, {}, {}], params)
    base, models = inputs(fam)
    expected = {}
    for k in base:
        ms = [m[k] for m in models]
        lambdas = ramplus_lambdas(base[k], ms, 0.5, 0.8, 0.01) if plus else None
        expected[k] = ram(base[k], ms, 0.01, lambdas)
    check_close(out, expected)


def test_model_stock_filter_wise(tmp_path, fam):
    """One factor per row along the last axis; 1-D tensors (norms) keep one factor."""
    _, out = run_recipe(tmp_path, fam, "model_stock", [{}, {}, {}], {"filter_wise": True})
    base, models = inputs(fam)
    expected = {k: model_stock(base[k], [m[k] for m in models], filter_wise=True) for k in base}
    check_close(out, expected)
    name = next(k for k in base if base[k].ndim == 2)
    whole = model_stock(base[name], [m[name] for m in models])
    assert np.abs(expected[name] - whole).max() > 1e-4, "filter_wise changes the 2-D tensors"


@pytest.mark.parametrize("topk", [1.0, 0.5])
def test_sce(tmp_path, fam, topk):
    _, out = run_recipe(tmp_path, fam, "sce", [{}, {}, {}], {"select_topk": topk})
    base, models = inputs(fam)
    check_close(out, {k: sce(base[k], [m[k] for m in models], topk) for k in base})


def test_della_prunes_by_rank_within_rows(tmp_path):
    from modelkin.io.safetensors import save_file

    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (64, 512))
    tuned = base + rng.normal(0, 0.01, base.shape)
    save_file(tmp_path / "base.safetensors", {"w": base}, "F32")
    save_file(tmp_path / "ft.safetensors", {"w": tuned}, "F32")
    for method in ("della_linear", "della"):
        recipe = {
            "models": [
                {
                    "model": str(tmp_path / "ft.safetensors"),
                    "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
                }
            ],
            "merge_method": method,
            "base_model": str(tmp_path / "base.safetensors"),
            "out_dtype": "float32",
        }
        merge(write_recipe(tmp_path, recipe), tmp_path / method, seed=5)
        merged = read_safetensors(tmp_path / method)["w"] - base.astype(np.float32)
        delta = tuned.astype(np.float32).astype(np.float64) - base.astype(np.float32)
        kept = merged != 0
        assert kept.mean() == pytest.approx(0.5, abs=0.01)
        # keep probability rises from density - epsilon (smallest in a row) to density + epsilon
        ranks = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1)
        assert kept[ranks < 128].mean() == pytest.approx(0.35, abs=0.02)
        assert kept[ranks >= 384].mean() == pytest.approx(0.65, abs=0.02)
        assert np.abs(merged).sum() == pytest.approx(np.abs(delta).sum(), rel=1e-3)


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_spherical_interpolation(tmp_path, fam, method, with_base, precise):
    """nuslerp (two models, t from their weights) and multislerp (all three), on the models or,
    with a base, on their task vectors: exact with precise, and within float32 rounding when
    computed in mergekit's float32 steps (bit for bit with mergekit: test_mergekit_compat)."""
    weights = [0.3, 0.9] if method == "nuslerp" else WEIGHTS
    models_used = fam.models[: len(weights)]
    recipe = {
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models_used, weights, strict=True)],
        "merge_method": method,
        "out_dtype": "float32",
    }
    if with_base:
        recipe["base_model"] = str(fam.base)
    if not precise:
        recipe["dtype"] = "float32"
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", precise=precise)
    out = read_safetensors(tmp_path / "out")
    base, models = inputs(fam)
    expected = {}
    for k in base:
        z = base[k] if with_base else 0.0
        deltas = [m[k] - z for m in models[: len(weights)]]
        mixed = nuslerp(0.75, *deltas) if method == "nuslerp" else multislerp(deltas, WEIGHTS)
        expected[k] = z + mixed
    if precise:
        check_close(out, expected)
    else:
        for name, reference in expected.items():
            scale = np.abs(reference).max()
            np.testing.assert_allclose(out[name], reference, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_vector(tmp_path, fam, row_wise, with_base):
    """nuslerp_flatten: false interpolates each row (or, row-wise, each vector along the first
    axis) on its own."""
    recipe = {
        "models": [
            {"model": str(m), "parameters": {"weight": w}} for m, w in zip(fam.models[:2], [0.3, 0.9], strict=True)
        ],
        "merge_method": "nuslerp",
        "out_dtype": "float32",
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise},
    }
    if with_base:
        recipe["base_model"] = str(fam.base)
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", precise=True)
    out = read_safetensors(tmp_path / "out")
    base, models = inputs(fam)
    expected = {}
    for k in base:
        z = base[k] if with_base else 0.0
        expected[k] = z + nuslerp(0.75, models[0][k] - z, models[1][k] - z, flatten=False, row_wise=row_wise)
    check_close(out, expected)


def test_karcher(tmp_path, fam):
    recipe = {"models": [{"model": str(m)} for m in fam.models], "merge_method": "karcher", "out_dtype": "float32"}
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", precise=True)
    out = read_safetensors(tmp_path / "out")
    _, models = inputs(fam)
    check_close(out, {k: karcher([m[k] for m in models]) for k in models[0]})


def test_karcher_includes_the_base_model(tmp_path, fam):
    """mergekit 0.1.5 gathers base_model into karcher's mean like any other model."""
    recipe = {
        "models": [{"model": str(m)} for m in fam.models],
        "base_model": str(fam.base),
        "merge_method": "karcher",
        "out_dtype": "float32",
    }
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", precise=True)
    out = read_safetensors(tmp_path / "out")
    base, models = inputs(fam)
    check_close(out, {k: karcher([*(m[k] for m in models), base[k]]) for k in models[0]})


def test_passthrough_copies(tmp_path, family_factory):
    fam = family_factory(n=1, dtype="F32")
    recipe = {"models": [{"model": str(fam.models[0])}], "merge_method": "passthrough", "out_dtype": "float32"}
    merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = read_safetensors(tmp_path / "out")
    for k, v in fam.values[1].items():
        np.testing.assert_array_equal(out[k], v)


def test_filters_and_gradients_resolve_per_tensor():
    value = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.7}]

    def at(name: str) -> object:
        return evaluate(value, name, gradient_position(name, 3))

    assert at("model.layers.0.self_attn.q_proj.weight") == 0.0
    assert at("model.layers.1.self_attn.q_proj.weight") == 0.5
    assert at("model.layers.1.mlp.up_proj.weight") == 0.3
    assert at("model.norm.weight") == 0.7
    assert evaluate([0.2, 0.8], "lm_head.weight", gradient_position("lm_head.weight", 3)) == 0.2


def test_output_layout_and_provenance(tmp_path, fam):
    (fam.base / "tokenizer.json").write_text("{}")
    (fam.base / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "torch_dtype": "float32"}))
    params = [{"weight": w, "density": 0.5} for w in WEIGHTS]
    recipe = {
        "models": [{"model": str(m), "parameters": p} for m, p in zip(fam.models, params, strict=True)],
        "merge_method": "ties",
        "base_model": str(fam.base),
        "out_dtype": "bfloat16",
    }
    out = tmp_path / "merged"
    result = merge(write_recipe(tmp_path, recipe), out, out_shard_size=5_000)
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors.index.json",
        "config.json",
        "tokenizer.json",
        "mergekit_config.yml",
        "README.md",
        "modelkin.json",
    } <= files
    shards = sorted(p for p in files if p.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    provenance = json.loads((out / "modelkin.json").read_text())
    assert set(provenance) == {"parents", "base", "method", "parameters", "kinship", "ignored", "modelkin_version"}
    assert provenance["ignored"] == []
    assert provenance["parents"] == [str(m) for m in fam.models]
    expected = modelkin.kinship_matrix(fam.models, base=fam.base)
    for metric in ("pcc", "cs", "ed"):
        np.testing.assert_allclose(np.array(provenance["kinship"][metric]), expected[metric], rtol=1e-9)
    assert result.kinship is not None and result.kinship.to_dict()["metrics"] == provenance["kinship"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "| pcc |" in card and "merge_method: ties" in card
    # the merged model is itself a readable model
    assert modelkin.kinship(out, fam.models[0], base=fam.base).n > 0


def test_cli_merge_and_methods(tmp_path, fam):
    params = [{"weight": w} for w in WEIGHTS]
    recipe = {
        "models": [{"model": str(m), "parameters": p} for m, p in zip(fam.models, params, strict=True)],
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
    }
    path = write_recipe(tmp_path, recipe)
    before = tree_digest(fam.root)
    proc = run_cli("merge", str(path), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "out") in proc.stdout
    assert tree_digest(fam.root) == before
    again = run_cli("merge", str(path), str(tmp_path / "out"))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert run_cli("merge", str(path), str(tmp_path / "out"), "--overwrite").returncode == 0
    methods = run_cli("methods")
    assert methods.returncode == 0 and "dare_ties" in methods.stdout and "slerp" in methods.stdout


BAD_RECIPES = [
    ({"merge_method": "frobnicate"}, "supported: linear"),
    ({"merge_method": "slerp", "parameters": {"t": 0.5}}, "slerp merges exactly 1 model besides the base_model"),
    ({"merge_method": "model_stock", "models": "two"}, "model_stock merges at least 2 models besides the base_model"),
    ({"merge_method": "ties", "density": 1.5}, "outside [0, 1]"),
    ({"merge_method": "ties", "density": -0.1}, "outside [0, 1]"),
    ({"merge_method": "ties", "weight": []}, "empty list"),
    ({"merge_method": "della_linear", "density": 0.1}, "density ± epsilon"),
    ({"merge_method": "frankenmerge"}, "unknown merge_method"),
]


@pytest.mark.parametrize(("change", "needle"), BAD_RECIPES)
def test_bad_recipes(tmp_path, fam, change, needle):
    models = fam.models[:2] if change.get("models") == "two" else fam.models
    params: dict = {"weight": change.get("weight", 1.0)}
    if "density" in change:
        params["density"] = change["density"]
    recipe = {
        "models": [{"model": str(m), "parameters": params} for m in models],
        "merge_method": change["merge_method"],
        "base_model": str(fam.base),
        "parameters": change.get("parameters", {}),
    }
    if change["merge_method"] == "della_linear":
        for m in recipe["models"]:
            m["parameters"]["epsilon"] = 0.15
    if change["merge_method"] == "model_stock":
        recipe["models"] = [{"model": str(fam.base)}, {"model": str(models[0])}]
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("merge", str(path), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert needle in proc.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("models:\n  - model: a\nmerge_method: [ties\n")
    proc = run_cli("merge", str(path), str(tmp_path / "out"))
    assert proc.returncode == 2 and "line" in proc.stderr and "Traceback" not in proc.stderr


def test_output_inside_an_input_is_refused(tmp_path, fam):
    recipe = {
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fam.models],
        "merge_method": "linear",
    }
    proc = run_cli("merge", str(write_recipe(tmp_path, recipe)), str(fam.models[0] / "merged"))
    assert proc.returncode == 2 and "inside" in proc.stderr


def test_missing_tensor_and_shape_mismatch(tmp_path, family_factory):
    from modelkin.io.safetensors import save_file

    save_file(tmp_path / "base.safetensors", {"a": np.zeros((4, 4)), "b": np.zeros(4)}, "F32")
    save_file(tmp_path / "ft1.safetensors", {"a": np.ones((4, 4)), "b": np.ones(4)}, "F32")
    save_file(tmp_path / "ft2.safetensors", {"a": np.ones((4, 4))}, "F32")
    save_file(tmp_path / "ft3.safetensors", {"a": np.ones((4, 5)), "b": np.ones(4)}, "F32")
    for other, needle in (("ft2", "'b' is missing"), ("ft3", "shape")):
        recipe = {
            "models": [
                {"model": str(tmp_path / f"{m}.safetensors"), "parameters": {"weight": 1.0}} for m in ("ft1", other)
            ],
            "merge_method": "task_arithmetic",
            "base_model": str(tmp_path / "base.safetensors"),
        }
        proc = run_cli("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / f"out-{other}"))
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / f"out-{other}").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp dir left behind"


def test_a_full_disk_leaves_no_partial_output(tmp_path, fam):
    import resource
    import signal
    import subprocess
    import sys

    recipe = {
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fam.models],
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
    }
    path = write_recipe(tmp_path, recipe)

    def small_disk() -> None:
        # A file-size limit makes writes fail like a full disk (EFBIG instead of ENOSPC).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run(
        [sys.executable, "-c", "import modelkin.cli as m; m.main()", "merge", str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp dir left behind"


def test_slices_stack_layers_from_several_models(tmp_path, fam):
    """A passthrough frankenmerge: layers renumbered in slice order, embeddings from the first
    slice's model, final norm and head from the last, num_hidden_layers set."""
    (fam.base / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "model_type": "llama"}))
    recipe = {
        "slices": [
            {"sources": [{"model": str(fam.base), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(fam.models[0]), "layer_range": [1, 2]}]},
            {"sources": [{"model": str(fam.models[2]), "layer_range": [0, 1]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
        "out_dtype": "float32",
    }
    merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = read_safetensors(tmp_path / "out")
    base, ft0, ft2 = fam.values[0], fam.values[1], fam.values[3]
    layer = "self_attn.q_proj.weight"
    np.testing.assert_array_equal(out[f"model.layers.0.{layer}"], base[f"model.layers.0.{layer}"])
    np.testing.assert_array_equal(out[f"model.layers.1.{layer}"], base[f"model.layers.1.{layer}"])
    np.testing.assert_array_equal(out[f"model.layers.2.{layer}"], ft0[f"model.layers.1.{layer}"])
    np.testing.assert_array_equal(out[f"model.layers.3.{layer}"], ft2[f"model.layers.0.{layer}"])
    np.testing.assert_array_equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    np.testing.assert_array_equal(out["lm_head.weight"], ft2["lm_head.weight"][: base["lm_head.weight"].shape[0]])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    assert sum(1 for n in out if n.endswith(layer)) == 4


def test_slices_merge_layer_ranges_with_a_method(tmp_path, fam):
    recipe = {
        "slices": [
            {
                "sources": [
                    {"model": str(fam.base), "layer_range": [0, 2]},
                    {"model": str(fam.models[0]), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                    {"model": str(fam.models[1]), "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.8]}},
                ]
            }
        ],
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "dtype": "float64",
        "out_dtype": "float32",
    }
    merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = read_safetensors(tmp_path / "out")
    base, models = inputs(fam)
    expected = {}
    for k in base:
        t = gradient_position(k, 2)
        if t is not None:
            t = float(k.split(".")[2])  # two layers in the slice: positions 0 and 1
        w2 = evaluate([0.2, 0.8], k, t)
        expected[k] = task_vector_merge(
            base[k], [models[0][k], models[1][k]], [0.5, w2], masks=None, consensus=False, normalize=False
        )
    check_close(out, expected)


def test_hub_ids_and_revisions_resolve_for_merges(tmp_path, fam, monkeypatch):
    from test_cli import fake_hub_cache

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/base", fam.base)
    fake_hub_cache(cache, "org/ft-a", fam.models[0], revision="v2")
    fake_hub_cache(cache, "org/ft-b", fam.models[2])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    recipe = {
        "models": [
            {"model": "org/ft-a@v2", "parameters": {"weight": 0.5}},
            {"model": "org/ft-b", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "out_dtype": "float32",
    }
    result = merge(write_recipe(tmp_path, recipe), tmp_path / "out", offline=True, precise=True)
    assert result.parents == ("org/ft-a@v2", "org/ft-b")
    provenance = json.loads((tmp_path / "out" / "modelkin.json").read_text())
    assert provenance["parents"] == ["org/ft-a@v2", "org/ft-b"] and provenance["base"] == "org/base"
    local = read_safetensors(tmp_path / "out")
    base, models = inputs(fam)
    expected = {
        k: task_vector_merge(
            base[k], [models[0][k], models[2][k]], [0.5, 0.5], masks=None, consensus=False, normalize=False
        )
        for k in base
    }
    check_close(local, expected)


def test_output_equal_to_an_input_is_refused(tmp_path, fam):
    recipe = {
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fam.models],
        "merge_method": "linear",
    }
    before = tree_digest(fam.root)
    proc = run_cli("merge", str(write_recipe(tmp_path, recipe)), str(fam.models[1]), "--overwrite")
    assert proc.returncode == 2 and "input model" in proc.stderr
    assert tree_digest(fam.root) == before


def test_tie_rules_differ_on_the_family(fam):
    """The ties/breadcrumbs tests can tell the two tie rules apart: the family's bf16 deltas tie at
    the thresholds, and the two rules keep different entries there."""
    base, models = inputs(fam)
    differ = sum(
        int(
            (
                kth_magnitude_mask(f32_delta(m[k], base[k]), int(0.5 * base[k].size), True)
                != kth_magnitude_mask(f32_delta(m[k], base[k]), int(0.5 * base[k].size), False)
            ).sum()
        )
        for m in models
        for k in base
        if base[k].size > 1
    )
    assert differ > 0


@pytest.mark.parametrize("descending", [True, False])
def test_reference_sort_order_is_torchs(descending):
    """The reference's libstdc++ introsort transcription is the order torch's CPU sort leaves ties in."""
    torch = pytest.importorskip("torch", reason="torch anchors the reference's sort order")
    from merge_reference import libstdcxx_sort_order

    rng = np.random.default_rng(3)
    for n in (1, 17, 100, 5000, 40000):
        values = (rng.integers(0, 9, n) * 0.25).astype(np.float32)
        expected = torch.sort(torch.from_numpy(values), descending=descending).indices.numpy()
        assert libstdcxx_sort_order(values, descending) == expected.tolist()


@pytest.fixture
def wide_family(tmp_path):
    """bf16 base and three fine-tunes with a tensor large enough (76800 values) that torch splits
    its float32 sums over threads, and a small one."""
    from modelkin.io.safetensors import save_model

    rng = np.random.default_rng(5)
    shapes = {"w": (300, 256), "b": (9, 15)}
    base = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
    save_model(tmp_path / "base", base, "BF16")
    for i, scale in enumerate([0.002, 0.003, 0.004]):
        save_model(tmp_path / f"ft{i}", {n: v + rng.normal(0, scale, v.shape) for n, v in base.items()}, "BF16")
    return tmp_path


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_slerp_and_model_stock_follow_torchs_reductions(wide_family, monkeypatch, threads):
    """With dtype float32 the factors come from torch's float32 norm and sum orders, for the
    thread count torch would use (OMP_NUM_THREADS here): bit for bit against the reference."""
    from merge_reference import model_stock_float32, slerp_float32

    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    d = wide_family
    values = {name: read_safetensors(d / name) for name in ["base", "ft0", "ft1", "ft2"]}
    for method, models in [("slerp", ["ft0"]), ("model_stock", ["ft0", "ft1", "ft2"])]:
        recipe = {
            "models": [{"model": str(d / m)} for m in models]
            + ([{"model": str(d / "base")}] if method == "slerp" else []),
            "merge_method": method,
            "base_model": str(d / "base"),
            "dtype": "float32",
            "out_dtype": "float32",
            **({"parameters": {"t": 0.3}} if method == "slerp" else {}),
        }
        out_dir = d / f"out-{method}-{threads}"
        merge(write_recipe(d, recipe), out_dir)
        out = read_safetensors(out_dir)
        for name, z in values["base"].items():
            if method == "slerp":
                expected = slerp_float32(0.3, z, values["ft0"][name], threads)
            else:
                expected = model_stock_float32(z, [values[m][name] for m in models], threads)
            np.testing.assert_array_equal(out[name].astype(np.float32), expected, err_msg=f"{method} {name}")


@pytest.mark.parametrize("threads", [1, 2])
def test_reference_float32_sum_is_torchs(threads):
    """The reference's transcription of torch's float32 sum and norm, checked against torch."""
    torch = pytest.importorskip("torch", reason="torch anchors the reference's float32 reductions")
    from merge_reference import torch_f32_norm, torch_f32_sum

    torch.set_num_threads(threads)
    rng = np.random.default_rng(11)
    for n in (3, 17, 1000, 40000, 100003):
        values = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        t = torch.from_numpy(values).reshape(1, -1)
        assert torch_f32_sum(values, threads) == t.sum(dim=1).item()
        if n >= 64:  # torch takes another path for shorter runs (not a case LLM weights reach)
            assert torch_f32_norm(values) == np.float32(torch.linalg.vector_norm(t, dim=1).item())


@pytest.mark.parametrize(
    ("method", "dtype", "sort_bytes"),
    [("ties", "float32", None), ("ties", "float32", 0), ("slerp", "float32", None), ("model_stock", "float64", None)],
)
def test_merge_progress_ends_at_its_total(tmp_path, fam, monkeypatch, method, dtype, sort_bytes):
    if sort_bytes is not None:
        monkeypatch.setattr(planner, "SORT_ORDER_BYTES", sort_bytes)
    models = fam.models[:1] if method == "slerp" else fam.models
    params = {"ties": {"weight": 0.5, "density": 0.5}}.get(method, {})
    recipe = {
        "models": [{"model": str(m), "parameters": params} for m in models]
        + ([{"model": str(fam.base)}] if method == "slerp" else []),
        "merge_method": method,
        "base_model": str(fam.base),
        "dtype": dtype,
        **({"parameters": {"t": 0.3}} if method == "slerp" else {}),
    }
    calls: list[tuple[int, int]] = []
    merge(write_recipe(tmp_path, recipe), tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    done, total = calls[-1]
    assert total > 0 and done == total


def test_config_dtype_keys_agree_and_follow_the_inputs(family_factory, tmp_path):
    """config.json gets `dtype` and `torch_dtype` alike (transformers 5 reads `dtype`); with no dtype
    in the recipe the output keeps the inputs' stored dtype, as mergekit does."""
    from modelkin._core import open_model

    fam = family_factory(n=2, dtype="F32")
    (fam.base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    recipe = {"merge_method": "passthrough", "models": [{"model": str(fam.models[0])}]}
    merge(recipe, tmp_path / "kept")
    assert {d for _, _, d in open_model(tmp_path / "kept").tensors()} == {"F32"}
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (fam.base, *fam.models)],
        "dtype": "bfloat16",
    }
    merge(recipe, tmp_path / "bf16")
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    assert {d for _, _, d in open_model(tmp_path / "bf16").tensors()} == {"BF16"}


def test_a_different_vocabulary_size_is_refused(tmp_path, family_factory):
    """mergekit 0.1.5 refuses models whose embedding rows differ; cutting them would pair the rows of
    unrelated tokens, so modelkin refuses too, naming the file, the tensor and both shapes."""
    other = family_factory(n=2, dtype="BF16", extra_vocab=(0, 4))
    recipe = {
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in other.models],
        "merge_method": "task_arithmetic",
        "base_model": str(other.base),
    }
    with pytest.raises(modelkin.ShapeMismatchError, match=r"embed_tokens.weight' has shape \[68, 24\], the base"):
        merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_karcher_in_a_half_dtype_stays_near_the_exact_mean(tmp_path, fam, dtype):
    """karcher with a half dtype iterates as mergekit does, rounding every step to the dtype (its
    bits are checked against mergekit in test_mergekit_compat); it stays within a few of the
    dtype's ulps of the exact Karcher mean."""
    recipe = {"models": [{"model": str(m)} for m in fam.models], "merge_method": "karcher", "dtype": dtype}
    merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = read_safetensors(tmp_path / "out")
    _, models = inputs(fam)
    ulp = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    for k in models[0]:
        expected = karcher([m[k] for m in models])
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(out[k], expected, rtol=4 * ulp, atol=4 * ulp * scale, err_msg=k)


def test_mkl_library_follows_the_environment(monkeypatch, tmp_path):
    """MODELKIN_MKL names MKL's library (empty: none); unset, the `mkl` package's, if installed."""
    from modelkin.merge import mkl

    monkeypatch.setenv("MODELKIN_MKL", "")
    assert mkl.mkl_library() is None
    monkeypatch.setenv("MODELKIN_MKL", str(tmp_path / "libmkl_rt.so.2"))
    assert mkl.mkl_library() == str(tmp_path / "libmkl_rt.so.2")


def test_a_missing_mkl_library_is_refused_by_name(tmp_path, fam, monkeypatch):
    """A float32 merge with MODELKIN_MKL naming no library fails naming it, before writing."""
    missing = tmp_path / "nowhere" / "libmkl_rt.so.2"
    monkeypatch.setenv("MODELKIN_MKL", str(missing))
    recipe = {"models": [{"model": str(m)} for m in fam.models], "merge_method": "karcher", "dtype": "float32"}
    with pytest.raises(Exception, match=r"nowhere/libmkl_rt\.so\.2"):
        merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mkl", [False, True])
def test_karcher_in_float32_stays_near_the_exact_mean(tmp_path, fam, monkeypatch, mkl):
    """karcher in float32: with MKL, mergekit's steps in float32 (MKL's dots and angles); without
    it, the exact coefficients. Both are within float32 rounding of the float64 reference."""
    from modelkin.merge.mkl import mkl_library

    if mkl and mkl_library() is None:
        pytest.skip("MKL is not installed here (pip install 'modelkin[mkl]')")
    if not mkl:
        monkeypatch.setenv("MODELKIN_MKL", "")
    recipe = {"models": [{"model": str(m)} for m in fam.models], "merge_method": "karcher", "dtype": "float32"}
    merge(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = read_safetensors(tmp_path / "out")
    _, models = inputs(fam)
    for k in models[0]:
        expected = karcher([m[k] for m in models])
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(out[k], expected, rtol=1e-4, atol=1e-4 * scale, err_msg=k)


def test_a_model_in_several_slices_keeps_each_slices_parameters(tmp_path):
    """A model used by two slices with different parameters (a layer path, a frankenmerge with
    scales): each slice's own. Before this was fixed, the first slice's plain value was reused for
    every later slice of the same model, silently."""
    from evolve_support import small_family
    from modelkin.io.safetensors import load_model

    _, (a, b) = small_family(tmp_path / "fam", n=2)
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
            {"sources": [{"model": str(a), "layer_range": [0, 1], "parameters": {"scale": 3.0}}]},
            {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
        ],
    }
    merged = merge(recipe)
    ta, tb = load_model(a), load_model(b)
    name = "self_attn.q_proj.weight"
    expected = [ta[f"model.layers.0.{name}"], 0.5 * tb[f"model.layers.1.{name}"], 3.0 * ta[f"model.layers.0.{name}"]]
    expected.append(tb[f"model.layers.1.{name}"])
    for layer, want in enumerate(expected):
        assert np.array_equal(np.asarray(merged[f"model.layers.{layer}.{name}"]), want.astype(np.float32)), layer

"""Data-flow-space search: the layer-path genome, the scales folded into standard weights (checked
against a forward pass that applies them at run time), DFS and PS+DFS runs on the bundled family,
their resume, export and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import modelkin.evolve as evo
from evolve_support import one_line_error
from modelkin import merge
from modelkin.evolve.config import load_evolve_config
from modelkin.evolve.dfs_genome import DfsGenome, DfsSpec, Hop, folded
from modelkin.evolve.experiment import prepare_experiment
from modelkin.evolve.family import load, write_task_family
from modelkin.evolve.family.forward import LlamaModel
from modelkin.io.errors import RecipeError
from modelkin.io.safetensors import load_model
from modelkin.testing import run_cli

FAMILY_CACHE: dict[str, Path] = {}


@pytest.fixture
def fam(tmp_path: Path) -> Path:
    write_task_family(tmp_path / "fam")
    return tmp_path / "fam"


def genome(fam: Path, scaling: str = "matrix", scale: str = "residual", repeats: int = 2, **kw: Any) -> DfsGenome:
    spec = DfsSpec((str(fam / "ft-reverse"), str(fam / "ft-sort")), repeats, scaling, scale, kw.get("dtype"))  # type: ignore[arg-type]
    return DfsGenome(spec, list(spec.models), [2, 2], "llama")


def runtime_logits(models: list[LlamaModel], hops: list[Hop], meaning: str, ids: np.ndarray) -> np.ndarray:
    """The reference: the source models' own layers in path order, each hop's scale applied to its
    input as the run's meaning says (residual: the whole stream; delta: the previous MLP output)."""
    a = models[0]
    x = a.w["model.embed_tokens.weight"][ids]
    mlp = np.zeros_like(x)
    for t, hop in enumerate(hops):
        net, p = models[hop.model], f"model.layers.{hop.layer}."
        if t > 0:
            x = x * hop.scale if meaning == "residual" else x + (hop.scale - 1.0) * mlp
        x = x + net._attention(net._norm(x, p + "input_layernorm.weight"), p + "self_attn.")
        mlp = net._mlp(net._norm(x, p + "post_attention_layernorm.weight"), p + "mlp.")
        x = x + mlp
    out: np.ndarray = a._norm(x, "model.norm.weight") @ a.head.T
    return out


def some_path(g: DfsGenome, seed: int) -> np.ndarray:
    """A genotype with a long path and scales well away from 1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, g.size)
    x[: g.slots] = np.where(rng.random(g.slots) < 0.75, 1.0, -1.0)
    return x


IDS = np.random.default_rng(7).integers(1, 24, size=(3, 9))  # not <pad>, whose embedding is 0 (0/0 with eps 0)


@pytest.mark.parametrize("meaning", ["residual", "delta"])
@pytest.mark.parametrize("scaling", ["matrix", "slot"])
def test_folded_checkpoint_is_the_runtime_scaled_model(fam, meaning, scaling):
    """With the norms' eps at 0 the exported checkpoint's plain forward is the forward that scales
    at run time (float64, relative 1e-9 on the logits), for both meanings of a scale."""
    g = genome(fam, scaling, meaning, repeats=3, dtype="float64")
    for seed in range(3):
        x = some_path(g, seed)
        hops = g.path(x)
        assert len(hops) > 4 and any(abs(h.scale - 1.0) > 0.1 for h in hops)
        exported = merge(g.recipe(x))
        plain = LlamaModel(exported, exported.config or {})
        sources = [load(m) for m in g.models]
        for net in (plain, *sources):
            net.eps = 0.0
        assert plain.layers == len(hops)
        want = runtime_logits(sources, hops, meaning, IDS)
        got = plain.logits(IDS)
        assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want))


def plain_logits(net: LlamaModel, eps: list[float], final_eps: float, ids: np.ndarray) -> np.ndarray:
    """The exported model's forward with each layer's norms at its own eps."""
    x = net.w["model.embed_tokens.weight"][ids]
    for i in range(net.layers):
        net.eps = eps[i]
        p = f"model.layers.{i}."
        x = x + net._attention(net._norm(x, p + "input_layernorm.weight"), p + "self_attn.")
        x = x + net._mlp(net._norm(x, p + "post_attention_layernorm.weight"), p + "mlp.")
    net.eps = final_eps
    out: np.ndarray = net._norm(x, "model.norm.weight") @ net.head.T
    return out


def test_with_the_real_eps_only_the_eps_term_differs(fam):
    """residual: the runtime model's norm(c·x) uses eps/c² where the exported model uses eps. With
    each hop's eps set to eps/c_t² the exported model is the runtime one exactly, so the difference
    at the real eps is the eps term alone (on the bundled family: about 0.1% of the logits, see the
    README). delta is exact with any eps (the fold is linear in down_proj)."""
    g = genome(fam, "matrix", "residual", repeats=3, dtype="float64")
    x = some_path(g, 1)
    hops = g.path(x)
    exported = merge(g.recipe(x))
    plain = LlamaModel(exported, exported.config or {})
    eps = plain.eps
    sources = [load(m) for m in g.models]
    want = runtime_logits(sources, hops, "residual", IDS)
    running = np.cumprod([h.scale for h in hops])
    exact = plain_logits(plain, [eps / c**2 for c in running], eps / running[-1] ** 2, IDS)
    assert np.max(np.abs(exact - want)) <= 1e-9 * np.max(np.abs(want))
    relative = np.max(np.abs(plain_logits(plain, [eps] * len(hops), eps, IDS) - want)) / np.max(np.abs(want))
    assert 0 < relative < 1e-2
    delta = genome(fam, "matrix", "delta", repeats=3, dtype="float64")
    exported = merge(delta.recipe(x))
    plain = LlamaModel(exported, exported.config or {})
    want = runtime_logits(sources, delta.path(x), "delta", IDS)
    assert np.max(np.abs(plain.logits(IDS) - want)) <= 1e-9 * np.max(np.abs(want))


def test_start_is_exactly_model_a(fam):
    g = genome(fam)
    x0 = g.initial(1 / 6)
    assert [(h.model, h.layer, h.scale) for h in g.path(x0)] == [(0, 0, 1.0), (0, 1, 1.0)]
    merged = merge(g.recipe(x0))
    a = load_model(fam / "ft-reverse")
    assert set(merged) == set(a)
    for name in a:
        assert np.array_equal(np.asarray(merged[name]), a[name]), name


def test_path_always_runs_from_as_first_to_as_last_layer(fam):
    g = genome(fam, "none")
    nothing = np.full(g.size, -1.0)
    assert [(h.model, h.layer) for h in g.path(nothing)] == [(0, 0), (0, 1)]
    only_b = np.full(g.size, -1.0)
    only_b[2:4] = 1.0  # B's layers of the first repetition
    assert [(h.model, h.layer) for h in g.path(only_b)] == [(0, 0), (1, 0), (1, 1), (0, 1)]


def test_fold_factors():
    hops = [Hop(0, 0, 1.0), Hop(1, 0, 2.0), Hop(0, 1, 0.5)]
    assert folded(hops, "residual") == [(1.0, 1.0), (0.5, 0.5), (1.0, 1.0)]
    assert folded(hops, "delta") == [(1.0, 2.0), (1.0, 0.5), (1.0, 1.0)]


def dfs_config(fam: Path, **dfs: Any) -> dict[str, Any]:
    return {
        "strategy": "dfs",
        "base_model": str(fam / "base"),
        "dfs": {"models": [str(fam / "ft-reverse"), str(fam / "ft-sort")], "repeats": 2, **dfs},
        "cmaes": {"max_evals": 24, "seed": 0},
        "evaluator": {"python": "modelkin.evolve.family:evaluate", "resident": True},
    }


def test_dfs_run_reports_paths_and_exports_a_checkpoint(fam, tmp_path):
    run = evo.evolve(dfs_config(fam), tmp_path / "run")
    dfs = [c for c in run.candidates if c.role == "dfs"]
    assert len(dfs) == 1 + 24 // 13 * 13 and all(c.hops for c in dfs)
    start = next(c for c in dfs if c.key == "dfs:start")
    a = next(c for c in run.candidates if c.reference == str(fam / "ft-reverse"))
    assert start.objective_search == a.objective_search  # the A-only path is model A
    best = run.best
    assert best is not None and best.objective_search is not None and best.objective_test is not None
    assert best.objective_search >= a.objective_search
    shown = run_cli("runs", "show", str(tmp_path / "run"), "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {c["id"]: c for c in json.loads(shown.stdout)["candidates"]}
    assert rows[best.id]["path"] == [dict(h) for h in best.hops or ()]
    out = tmp_path / "best"
    done = run_cli("runs", "best", str(tmp_path / "run"), str(out))
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(best.hops or ())
    # The recipe beside the checkpoint re-makes it, bit for bit.
    again = tmp_path / "again"
    done = run_cli("merge", str(out / "mergekit_config.yml"), str(again))
    assert done.returncode == 0, done.stderr
    made, exported = load_model(again), load_model(out)
    assert set(made) == set(exported) and all(np.array_equal(made[n], exported[n]) for n in made)


def test_ps_dfs_runs_both_phases_in_one_store(fam, tmp_path):
    config = {
        "strategy": "ps+dfs",
        "genome": {
            "models": [str(fam / m) for m in ("ft-reverse", "ft-sort")],
            "base_model": str(fam / "base"),
            "merge_method": "task_arithmetic",
            "layer_granularity": 1,
            "dtype": "float32",
        },
        "dfs": {"models": ["ps", str(fam / "ft-shift")], "repeats": 2, "scaling": "slot"},
        "cmaes": {"max_evals": 9, "dfs_max_evals": 12, "seed": 0},
        "evaluator": {"python": "modelkin.evolve.family:evaluate", "resident": True},
    }
    run = evo.evolve(config, tmp_path / "run")
    ps = [c for c in run.candidates if c.role == "search"]
    dfs = [c for c in run.candidates if c.role == "dfs"]
    assert len(ps) == 9 and len(dfs) == 1 + 12
    ps_best = max((c for c in ps if c.status == "done"), key=lambda c: (c.objective_search or 0.0, -c.id))
    start = next(c for c in dfs if c.key == "dfs:start")
    assert start.objective_search == ps_best.objective_search  # DFS starts from the PS phase's model
    assert min(c.generation for c in dfs) == max(c.generation for c in ps)
    best = run.best
    assert best is not None and (best.objective_search or 0.0) >= (ps_best.objective_search or 0.0)
    assert any(c.reference and c.reference.endswith("ft-shift") for c in run.candidates)  # DFS's B is in the pool
    shown = run_cli("runs", "show", str(tmp_path / "run"))
    assert shown.returncode == 0 and "PS phase best" in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dfs": {"models": ["ps", "x"]}}, "dfs.models: ps names the PS phase's best model"),
        ({"dfs": {"models": ["a"], "scaling": "full"}}, "dfs.scaling"),
        ({"dfs": {"models": ["a"], "scale": "both"}}, "dfs.scale"),
        ({"dfs": {"models": ["a"], "repeats": 0}}, "dfs.repeats"),
        ({"dfs": {"models": ["a"], "order": 1}}, "dfs.order"),
        ({"cmaes": {"dfs_max_evals": 10}}, "cmaes.dfs_max_evals: is the DFS phase's budget of strategy ps+dfs"),
        ({"pool": ["a", "b"]}, "strategy dfs takes its models from dfs:, not pool:"),
    ],
)
def test_dfs_config_refusals(change, message):
    config: dict[str, Any] = {
        "strategy": "dfs",
        "dfs": {"models": ["a", "b"]},
        "evaluator": {"command": "x {model}"},
        **change,
    }
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_evolve_config(config)


def test_dfs_section_outside_dfs_strategies_is_refused():
    with pytest.raises(RecipeError, match="dfs: is for strategies dfs and ps\\+dfs"):
        load_evolve_config(
            {"pool": ["a", "b"], "base_model": "z", "dfs": {"models": ["a"]}, "evaluator": {"command": "x {model}"}}
        )


def test_models_of_another_shape_are_refused_by_name(fam, tmp_path):
    other = tmp_path / "other"
    write_task_family(tmp_path / "o")
    tensors = load_model(tmp_path / "o" / "ft-sort")
    from modelkin.io.safetensors import save_model

    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((7, tensors["model.norm.weight"].shape[0]), np.float32)
    save_model(other, tensors)
    (other / "config.json").write_text((fam / "ft-sort" / "config.json").read_text())
    config = dfs_config(fam)
    config["dfs"]["models"] = [str(fam / "ft-reverse"), str(other)]
    with pytest.raises(
        RecipeError, match=r"dfs.models: .*other and .*ft-reverse differ in tensor model.layers.N.mlp.up_proj"
    ):
        prepare_experiment(load_evolve_config(config))
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(
        json.dumps({**json.loads((fam / "ft-sort" / "config.json").read_text()), "model_type": "gemma2"})
    )
    for f in (fam / "ft-sort").glob("*.safetensors"):
        (gemma / f.name).write_bytes(f.read_bytes())
    config["dfs"]["models"] = [str(gemma), str(fam / "ft-reverse")]
    with pytest.raises(RecipeError, match="is a gemma2: DFS folds its scales into pre-norm layers of llama"):
        prepare_experiment(load_evolve_config(config))


def test_bad_dfs_config_from_the_cli_is_one_line(fam, tmp_path):
    config = dfs_config(fam)
    config["dfs"]["models"] = ["ps", str(fam / "ft-sort")]
    path = tmp_path / "dfs.yml"
    path.write_text(yaml.safe_dump(config))
    done = run_cli("evolve", str(path), str(tmp_path / "run"))
    one_line_error(done, "dfs.models", "ps names the PS phase's best model")
    assert not (tmp_path / "run").exists()


def test_ps_dfs_killed_with_sigkill_resumes_to_the_same_run(tmp_path):
    """Both phases resume from wherever a SIGKILL leaves them, to the uninterrupted run."""
    import random
    import signal
    import time

    from test_evolve_resume import comparable, evolve_process

    from evolve_support import command_evaluator, runs_json, search_config, small_family, stored_scores, write_config

    base, pool = small_family(tmp_path / "fam", n=2)
    evaluator = {"command": command_evaluator("--sleep 0.1")}
    config = {
        **search_config(base, pool, evaluator, max_evals=9, dfs_max_evals=13, seed=0),
        "strategy": "ps+dfs",
        "dfs": {"models": ["ps", str(pool[1])], "repeats": 2, "scaling": "matrix"},
    }
    path = write_config(tmp_path / "evolve.yml", **config)
    reference = evolve_process(path, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read() if reference.stderr else ""
    total = stored_scores(tmp_path / "reference")
    rng = random.Random(7)
    run_dir = tmp_path / "killed"
    for target in sorted(rng.sample(range(1, total), 3)):
        proc = evolve_process(path, run_dir)
        while proc.poll() is None and stored_scores(run_dir) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        assert proc.poll() is None, "the run finished before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = evolve_process(path, run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    assert comparable(run_dir) == comparable(tmp_path / "reference")

    def paths(run: Path) -> list[str]:
        # A (the PS phase's best) is a model of the run's own directory.
        return [json.dumps(c.get("path")).replace(str(run), "RUN") for c in runs_json(run)["candidates"]]

    assert paths(run_dir) == paths(tmp_path / "reference")
    assert sum(p != "null" for p in paths(run_dir)) == 1 + 13


MERGEKIT = os.environ.get("MODELKIN_MERGEKIT") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (install mergekit==0.1.5 in a separate venv)")
@pytest.mark.parametrize(("meaning", "dtype"), [("residual", "float32"), ("delta", "bfloat16")])
def test_mergekit_makes_the_same_checkpoint_from_a_path_recipe(fam, tmp_path, meaning, dtype):
    """A DFS candidate's recipe (one-layer slices, scales filtered to the output projections) is a
    plain mergekit recipe: mergekit 0.1.5 makes the same tensors, bit for bit."""
    assert MERGEKIT is not None
    g = genome(fam, "matrix", meaning, repeats=3, dtype=dtype)
    x = some_path(g, 2)
    recipe = tmp_path / "path.yml"
    recipe.write_text(yaml.safe_dump(g.recipe(x)))
    done = run_cli("merge", str(recipe), str(tmp_path / "ours"))
    assert done.returncode == 0, done.stderr
    theirs = subprocess.run(
        [MERGEKIT, str(recipe), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours, other = load_model(tmp_path / "ours"), load_model(tmp_path / "theirs")
    assert set(ours) == set(other)
    for name in ours:
        assert np.array_equal(ours[name], other[name]), name
    layers = json.loads((tmp_path / "theirs" / "config.json").read_text())["num_hidden_layers"]
    assert layers == len(g.path(x))


def test_transformers_loads_a_path_checkpoint_with_no_custom_code(fam, tmp_path):
    """The exported path is a plain LlamaForCausalLM: transformers gives the numpy forward's logits,
    and greedy generation with the KV cache on equals generation with it off."""
    from test_task_family import peer_env, peer_python

    python = peer_python()
    if python is None:
        pytest.skip("no Python with torch and transformers (set MODELKIN_PEER_PYTHON or make .venv-peers)")
    g = genome(fam, "matrix", "residual", repeats=3, dtype="float32")
    x = some_path(g, 0)
    out = merge(g.recipe(x)).save(tmp_path / "path-model")
    np.save(tmp_path / "ids.npy", IDS)
    script = f"""
import json, numpy as np, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(np.load({str(tmp_path / "ids.npy")!r}))
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, torch_dtype=torch.float64).eval()
with torch.no_grad():
    np.save({str(tmp_path / "logits.npy")!r}, model(input_ids=ids).logits.numpy())
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
new = cached[:, ids.shape[1]:].tolist()
print(json.dumps({{"class": type(model).__name__, "same": bool((cached == plain).all()), "new": new}}))
"""
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300, env=peer_env())
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == "LlamaForCausalLM" and result["same"]
    ours = load(out)
    assert ours.layers == len(g.path(x)) > 2
    # transformers keeps rotary tables and RMSNorm in float32 (see test_task_family).
    np.testing.assert_allclose(ours.logits(IDS), np.load(tmp_path / "logits.npy"), rtol=0, atol=2e-5)
    assert ours.generate(IDS, 6).tolist() == result["new"]


def test_dfs_on_two_workers_is_the_same_run_and_plots_its_path(fam, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the plot extra)")
    config = {**dfs_config(fam), "cmaes": {"max_evals": 13, "seed": 1}}
    one = evo.evolve(config, tmp_path / "one")
    two = evo.evolve(config, tmp_path / "two", workers=2)

    def rows(run: evo.Run) -> list[tuple[Any, ...]]:
        return [(c.id, c.role, c.hops, c.scores, c.objective_search) for c in run.candidates]

    assert rows(one) == rows(two)
    done = run_cli("runs", "show", str(tmp_path / "two"), "--plot", str(tmp_path / "path.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "path.png").stat().st_size > 1000

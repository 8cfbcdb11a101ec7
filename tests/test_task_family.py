"""The bundled task family: its tasks, its shipped weights, and the numpy forward pass against
transformers' own LlamaForCausalLM (where a peer Python with torch and transformers is available);
the family as a complete Hugging Face model (tokenizer and generation config: transformers' generate
answers as the numpy evaluator does) and as lm-eval tasks (scored as the numpy evaluator scores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from modelkin.evolve.family import MODELS, WEIGHTS, evaluate, load
from modelkin.evolve.family.hf import FILES as HF_FILES
from modelkin.evolve.family.hf import hf_files
from modelkin.evolve.family.tasks import ANSWER_LEN, TASKS, TOKEN_ID, TOKENS, decode, examples, split_of
from modelkin.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]
NO_TRANSFORMERS = "no Python with torch and transformers (set MODELKIN_PEER_PYTHON or make .venv-peers)"


def peer_python(*modules: str) -> str | None:
    """A Python with torch and transformers (or ``modules``): MODELKIN_PEER_PYTHON, else the repo's
    .venv-peers; this Python itself when it has them."""
    wanted = modules or ("torch", "transformers")
    probe_line = "import " + ", ".join(wanted)
    if subprocess.run([sys.executable, "-c", probe_line], capture_output=True).returncode == 0:
        return sys.executable
    candidate = os.environ.get("MODELKIN_PEER_PYTHON") or str(ROOT / ".venv-peers" / "bin" / "python")
    if not shutil.which(candidate) and not Path(candidate).is_file():
        return None
    probe = subprocess.run([candidate, "-c", probe_line], capture_output=True)
    return candidate if probe.returncode == 0 else None


def peer_env() -> dict[str, str]:
    """The environment of a peer Python that imports modelkin: this checkout's python/ (and its built
    extension) first on the path, and no network."""
    path = os.pathsep.join(p for p in (str(ROOT / "python"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def merge_two(family: Path, out: Path) -> Path:
    """``modelkin merge`` of two family models (slerp of ft-reverse and ft-sort), as a user runs it."""
    recipe = out.parent / f"{out.name}.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": str(family / "ft-reverse"),
                "models": [{"model": str(family / "ft-reverse")}, {"model": str(family / "ft-sort")}],
                "parameters": {"t": 0.5},
                "dtype": "float32",
            }
        )
    )
    done = run_cli("merge", str(recipe), str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_tasks_are_what_they_say():
    for task, (marker, _, answer) in TASKS.items():
        prompts, answers = examples(task, "test")
        assert len(prompts) > 100
        for p, a in zip(prompts[:20], answers[:20], strict=True):
            text = decode(p)
            assert text[0] == marker and text[-1] == "="
            assert decode(a) == answer(text[1:-1])
    assert decode(examples("reverse", "search")[0][0]) != decode(examples("reverse", "test")[0][0])
    assert TOKEN_ID["="] == 1


def test_splits_are_disjoint():
    for task in TASKS:
        seen = {split: {tuple(p) for p in examples(task, split)[0]} for split in ("search", "test", "train")}
        assert not (seen["search"] & seen["test"]) and not (seen["train"] & (seen["search"] | seen["test"]))
    assert {split_of(i) for i in range(100)} == {"search", "test", "train"}


def test_shipped_family_shows_what_merging_needs():
    scores = {name: evaluate(WEIGHTS / name, "test") for name in MODELS}
    for name in MODELS[1:]:
        task = name.removeprefix("ft-")
        assert scores[name][task] >= 0.95, (name, scores[name])
        others = [v for t, v in scores[name].items() if t != task]
        assert min(others) < 0.7, "each fine-tune has lost part of the other tasks"
    base_mean = np.mean(list(scores["base"].values()))
    assert all(np.mean(list(scores[n].values())) < base_mean for n in MODELS[1:])
    assert 0.0 < min(scores["base"].values()) < 0.8


def test_numpy_forward_matches_transformers(tmp_path):
    python = peer_python()
    if python is None:
        pytest.skip(NO_TRANSFORMERS)
    prompts = np.concatenate([examples(t, "test")[0][:16] for t in TASKS])
    ids = np.concatenate([prompts, examples("sort", "test")[1][:1].repeat(len(prompts), 0)], axis=1)
    np.save(tmp_path / "ids.npy", ids)
    script = f"""
import numpy as np, torch
from transformers import LlamaForCausalLM
ids = torch.tensor(np.load({str(tmp_path / "ids.npy")!r}))
for name in {list(MODELS)!r}:
    model = LlamaForCausalLM.from_pretrained({str(WEIGHTS)!r} + "/" + name, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        np.save({str(tmp_path)!r} + f"/{{name}}.npy", model(input_ids=ids).logits.numpy())
"""
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in MODELS:
        theirs = np.load(tmp_path / f"{name}.npy")
        ours = load(WEIGHTS / name).logits(ids)
        # transformers keeps its rotary tables and RMSNorm in float32 even for a float64 model,
        # so the two agree to float32 precision; a wrong layout or rotary convention is off by 0.1.
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
        top2 = np.sort(theirs, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-3
        assert (ours.argmax(-1) == theirs.argmax(-1))[clear].all()


def test_configs_shipped_with_the_family(tmp_path):
    from modelkin.evolve.config import load_evolve_config
    from modelkin.evolve.family import write_task_family

    written = write_task_family(tmp_path / "fam")
    for name in ("evolve.yml", "soup.yml"):
        config = load_evolve_config(written[name])
        assert config.evaluator.python == "modelkin.evolve.family:evaluate"
        assert all(Path(config.model_path(p)).is_dir() for p in config.pool)
    config = json.loads((tmp_path / "fam" / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    for name in MODELS:  # every model written is a complete Hugging Face model
        assert {p.name for p in written[name].iterdir()} == {"config.json", "model.safetensors", *HF_FILES}


def test_lm_eval_config_runs_the_same_search(tmp_path):
    """evolve-lmeval.yml: the search of evolve.yml, scored by the lm_eval evaluator on the task YAMLs
    written beside it (include_path), tasks: on the search split and test_tasks: on the test split."""
    from modelkin.evolve.config import load_evolve_config
    from modelkin.evolve.family import write_task_family

    written = write_task_family(tmp_path / "fam")
    numpy_config = load_evolve_config(written["evolve.yml"])
    config = load_evolve_config(written["evolve-lmeval.yml"])
    for field in ("pool", "base_model", "strategy", "topk", "merge", "weights", "seed", "keep"):
        assert getattr(config, field) == getattr(numpy_config, field), field
    assert [config.model_path(p) for p in config.pool] == [numpy_config.model_path(p) for p in numpy_config.pool]
    settings = config.evaluator.lm_eval
    assert config.evaluator.kind == "lm_eval"
    assert settings["include_path"] == [str(written["lm_eval_tasks"].resolve())]
    assert settings["tasks"] == [f"family_{t}_search" for t in TASKS]
    assert settings["test_tasks"] == [f"family_{t}_test" for t in TASKS]
    for split, key in (("search", "tasks"), ("test", "test_tasks")):
        for task, name in zip(TASKS, settings[key], strict=True):
            spec = yaml.safe_load((written["lm_eval_tasks"] / f"{name}.yaml").read_text())
            assert spec["task"] == name and spec["test_split"] == split
            assert spec["output_type"] == "generate_until"
            assert [m["metric"] for m in spec["metric_list"]] == ["exact_match"]
            assert spec["generation_kwargs"]["max_gen_toks"] == ANSWER_LEN
            assert spec["generation_kwargs"]["until"] == ["<pad>"]  # the tokenizer's eos: never answered
            (data,) = spec["dataset_kwargs"]["data_files"].values()
            assert list(spec["dataset_kwargs"]["data_files"]) == [split]
            rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
            prompts, answers = examples(task, split)  # the numpy evaluator's prompts, in its order
            assert rows == [{"prompt": decode(p), "answer": decode(a)} for p, a in zip(prompts, answers, strict=True)]


def test_shipped_family_is_a_complete_hf_model():
    """Beside every shipped checkpoint: a character-level tokenizer over exactly the family's tokens
    (ids as TOKEN_ID), <pad> as its pad and eos, and a greedy generation config."""
    for name in MODELS:
        model = WEIGHTS / name
        config = json.loads((model / "config.json").read_text())
        expected = hf_files(TOKENS, config["max_position_embeddings"])
        for file in HF_FILES:
            assert (model / file).read_text() == expected[file], f"{name}/{file}: rerun hf.write_hf_files"
        tokenizer = json.loads((model / "tokenizer.json").read_text())
        assert tokenizer["model"]["type"] == "WordLevel" and tokenizer["model"]["vocab"] == TOKEN_ID
        assert max(TOKEN_ID.values()) < config["vocab_size"]
        assert tokenizer["added_tokens"][0]["content"] == "<pad>" and tokenizer["added_tokens"][0]["id"] == 0
        settings = json.loads((model / "tokenizer_config.json").read_text())
        assert settings["pad_token"] == settings["eos_token"] == "<pad>" and "bos_token" not in settings
        generation = json.loads((model / "generation_config.json").read_text())
        assert generation == {"do_sample": False, "pad_token_id": 0, "eos_token_id": 0}
        assert config["pad_token_id"] == TOKEN_ID["<pad>"]


def test_merge_keeps_the_tokenizer_files(tmp_path):
    from modelkin.evolve.family import write_task_family

    written = write_task_family(tmp_path / "fam")
    merged = merge_two(tmp_path / "fam", tmp_path / "merged")
    for file in HF_FILES:
        assert (merged / file).read_bytes() == (written["ft-reverse"] / file).read_bytes(), file
    assert set(evaluate(merged, "test")) == set(TASKS)


HF_GENERATE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.load(open(sys.argv[1]))
out = {}
for name, path in spec["models"].items():
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    gen = model.generation_config
    out[name] = {
        "special": [tokenizer.pad_token, tokenizer.eos_token, tokenizer.pad_token_id, tokenizer.eos_token_id],
        "generation": [gen.do_sample, gen.pad_token_id, gen.eos_token_id],
        "tasks": {},
    }
    for task, prompts in spec["prompts"].items():
        enc = tokenizer(prompts, return_tensors="pt")
        with torch.no_grad():  # greedy from generation_config.json
            ids = model.generate(**enc, max_new_tokens=spec["steps"])
        new = ids[:, enc["input_ids"].shape[1]:]
        out[name]["tasks"][task] = {
            "ids": enc["input_ids"].tolist(),
            "new": new.tolist(),
            "text": tokenizer.batch_decode(new, skip_special_tokens=True),
        }
json.dump(out, open(sys.argv[2], "w"))
"""


def test_transformers_generate_reproduces_the_numpy_answers(tmp_path):
    """AutoTokenizer + AutoModelForCausalLM + generate (greedy, ANSWER_LEN new tokens) on every test
    prompt of every task: the prompts encode to the numpy evaluator's ids, and every model of the
    family, and a merge of two, answers exactly as the numpy forward pass does."""
    python = peer_python()
    if python is None:
        pytest.skip(NO_TRANSFORMERS)
    from modelkin.evolve.family import write_task_family

    written = write_task_family(tmp_path / "fam")
    models = {name: written[name] for name in MODELS}
    models["merge"] = merge_two(tmp_path / "fam", tmp_path / "merged")
    prompts = {task: examples(task, "test")[0] for task in TASKS}
    spec = {
        "models": {name: str(path) for name, path in models.items()},
        "prompts": {task: [decode(p) for p in rows] for task, rows in prompts.items()},
        "steps": ANSWER_LEN,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [python, "-c", HF_GENERATE, str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=peer_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    for name, path in models.items():
        assert theirs[name]["special"] == ["<pad>", "<pad>", 0, 0], name
        assert theirs[name]["generation"] == [False, 0, 0], name
        net = load(path)
        for task, rows in prompts.items():
            got = theirs[name]["tasks"][task]
            assert got["ids"] == rows.tolist(), (name, task)
            ours = net.generate(rows, ANSWER_LEN)
            assert got["new"] == ours.tolist(), (name, task)
            assert got["text"] == [decode(r) for r in ours], (name, task)


LM_EVAL_SCORES = """
import json, sys
from lm_eval.tasks import TaskManager
from modelkin.evolve.config import load_evolve_config
from modelkin.evolve.evaluator_registry import make_evaluator

config_path, model = sys.argv[1], sys.argv[2]
config = load_evolve_config(config_path)
found = TaskManager(include_path=config.evaluator.lm_eval["include_path"]).all_tasks
evaluate = make_evaluator(config.evaluator)
print(json.dumps({
    "found": sorted(t for t in found if t.startswith("family_")),
    "scores": {split: evaluate(model, split) for split in ("search", "test")},
}))
"""


def test_lm_eval_tasks_score_as_the_numpy_evaluator(tmp_path):
    """evolve-lmeval.yml's evaluator (lm-eval, the task YAMLs through include_path, the shipped
    tokenizer): every task on both splits scores exactly what the numpy evaluator scores."""
    python = peer_python("lm_eval", "torch", "transformers")
    if python is None:
        pytest.skip("no Python with lm_eval, torch and transformers (set MODELKIN_PEER_PYTHON or make .venv-peers)")
    from modelkin.evolve.family import write_task_family

    written = write_task_family(tmp_path / "fam")
    done = subprocess.run(
        [python, "-c", LM_EVAL_SCORES, str(written["evolve-lmeval.yml"]), str(written["base"])],
        capture_output=True,
        text=True,
        timeout=600,
        env=peer_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["found"] == sorted(f"family_{t}_{s}" for t in TASKS for s in ("search", "test"))
    for split in ("search", "test"):
        ours = evaluate(written["base"], split)
        assert result["scores"][split] == {f"family_{t}_{split}": v for t, v in ours.items()}

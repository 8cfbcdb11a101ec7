"""mergekit 0.1.5's tokenizer and chat-template tests (tests/test_tokenizer.py,
tests/test_chat_template.py), transcribed: picollama models with 64- and 66-row vocabularies and
BPE tokenizers written as tokenizers' JSON, the same recipes and checks. Where mergekit is installed,
the recipes also run through it and the vocabularies and tensors must agree."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from peer import check_loads, load_in_transformers, peer_python
from test_mergekit_suite import MERGEKIT, picollama

from merge_reference import read_safetensors
from modelkin.merge.merging import merge
from modelkin.merge.recipe import RecipeError, load_config
from modelkin.merge.vocabulary import _vocab_of

PEER = peer_python(MERGEKIT)

SPECIAL = ["<unk>", "<s>", "</s>"]


def make_tokenizer(directory: Path, vocab_size: int, added_tokens: list[str]) -> None:
    """The suite's make_tokenizer: a BPE vocabulary `<unk> <s> </s> _tok_3 …`, saved as
    LlamaTokenizerFast saves it (its three special tokens and `added_tokens` as added tokens)."""
    tokens = (SPECIAL + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]

    def added(token: str, index: int, special: bool) -> dict:
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": not special}
        return {"id": index, "content": token, **flags, "special": special}

    entries = [added(t, i, True) for i, t in enumerate(SPECIAL)]
    entries += [added(t, vocab_size + i, False) for i, t in enumerate(added_tokens)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": entries,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [],
        },
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    decoder = {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "added_tokens_decoder": decoder,
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_suite")
    base = Path(picollama(root / "model_base", 21, vocab=64))
    make_tokenizer(base, 64, [])
    chatml = Path(picollama(root / "model_chatml", 22, vocab=66))
    make_tokenizer(chatml, 64, ["<|im_start|>", "<|im_end|>"])
    padded = Path(picollama(root / "model_padded", 23, vocab=64))
    make_tokenizer(padded, 64, [f"<UNUSED_{i}>" for i in range(4)])
    plain = Path(picollama(root / "model_b", 24, vocab=64))  # no tokenizer (test_chat_template's model_b)
    return {"base": str(base), "chatml": str(chatml), "padded": str(padded), "b": str(plain)}


def make_config(models: list[str], base: str | None, method: str = "linear", **extra: object) -> dict:
    config: dict = {
        "merge_method": method,
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        "dtype": "float32",
    }
    if base is not None:
        config["base_model"] = base
    config.update({k: v for k, v in extra.items() if v is not None})
    return config


def run(tmp_path: Path, config: dict, compare: bool = True, exact: bool = True) -> Path:
    """Merges; where mergekit is installed, its output must have the same vocabulary and the same
    tensors (bit for bit when ``exact``)."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    merge(recipe, out, overwrite=True)
    tensors = read_safetensors(out)
    rows = json.loads((out / "config.json").read_text())["vocab_size"]
    assert all(tensors[n].shape[0] == rows for n in ("model.embed_tokens.weight", "lm_head.weight"))
    if PEER is not None:
        check_loads(PEER, out)
    if MERGEKIT is not None and compare:
        theirs = tmp_path / "theirs"
        subprocess.run([MERGEKIT, str(recipe), str(theirs)], check=True, capture_output=True, timeout=600)
        assert vocab(out) == vocab(theirs)
        for name, value in read_safetensors(theirs).items():
            if exact:
                np.testing.assert_array_equal(tensors[name], value, err_msg=name)
            else:
                np.testing.assert_allclose(tensors[name], value, rtol=1e-5, atol=1e-8, err_msg=name)
    return out


def vocab(model: Path) -> dict[str, int]:
    return _vocab_of(json.loads((model / "tokenizer.json").read_text()))


def added_count(model: Path) -> int:
    return len(json.loads((model / "tokenizer.json").read_text())["added_tokens"])


def check_tokenizer(model: Path, size: int, added: int | None = None, has=(), lacks=()) -> None:
    v = vocab(model)
    assert len(v) == size
    if added is not None:
        assert added_count(model) == added
    assert all(t in v for t in has) and not any(t in v for t in lacks)
    config = json.loads((model / "tokenizer_config.json").read_text())
    assert {int(k) for k in config["added_tokens_decoder"]} == {
        e["id"] for e in json.loads((model / "tokenizer.json").read_text())["added_tokens"]
    }


def embedding(model: str | Path, token: str) -> np.ndarray:
    return read_safetensors(Path(model))["model.embed_tokens.weight"][vocab(Path(model))[token]]


def test_legacy_mode_refuses_mismatched_vocabularies(tmp_path, tok_models):
    """No tokenizer request: the base's tokenizer, and the tensors must agree (0.1.5 refuses
    66 rows against 64, naming the tensor)."""
    config = make_config([tok_models["base"], tok_models["padded"], tok_models["chatml"]], tok_models["base"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match="embed_tokens"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_base(tmp_path, tok_models):
    models = [tok_models["base"], tok_models["padded"], tok_models["chatml"]]
    out = run(tmp_path, make_config(models, tok_models["base"], tokenizer_source="base"))
    check_tokenizer(out, 64, added=3)


def test_source_union(tmp_path, tok_models):
    models = [tok_models["base"], tok_models["padded"], tok_models["chatml"]]
    out = run(tmp_path, make_config(models, tok_models["base"], tokenizer_source="union"))
    check_tokenizer(out, 66, added=5, has=["<|im_start|>", "<|im_end|>"], lacks=[f"<UNUSED_{i}>" for i in range(4)])
    for token in ("<|im_start|>", "<|im_end|>"):
        # Only chatml has the token: every model's row is chatml's, so the linear merge returns it.
        np.testing.assert_allclose(embedding(out, token), embedding(tok_models["chatml"], token), rtol=1e-6)
    # A token every model has is the weighted merge of their rows.
    rows = [embedding(m, "_tok_7") for m in models]
    np.testing.assert_allclose(embedding(out, "_tok_7"), np.mean(rows, axis=0), rtol=1e-5, atol=1e-7)


def test_source_model(tmp_path, tok_models):
    models = [tok_models["base"], tok_models["padded"], tok_models["chatml"]]
    out = run(tmp_path, make_config(models, tok_models["base"], tokenizer_source=tok_models["chatml"]))
    check_tokenizer(out, 66, has=["<|im_start|>", "<|im_end|>"])
    assert (out / "tokenizer.json").read_bytes() == (Path(tok_models["chatml"]) / "tokenizer.json").read_bytes()


def test_slerp_union(tmp_path, tok_models):
    config = make_config(
        [tok_models["base"], tok_models["chatml"]], tok_models["base"], "slerp", tokenizer_source="union"
    )
    config["parameters"] = {"t": 0.5}
    # float32 slerp is within an ulp of mergekit's, not identical: mergekit batches same-shape
    # tensors into one [B, n] norm, whose float order modelkin does not follow yet.
    out = run(tmp_path, config, exact=False)
    check_tokenizer(out, 66, has=["<|im_start|>", "<|im_end|>"])


def test_force_token(tmp_path, tok_models):
    tokens = {"_tok_10": {"source": tok_models["chatml"], "force": True}}
    tokens["_tok_11"] = {"source": tok_models["base"], "force": True}
    config = make_config(
        [tok_models["base"], tok_models["chatml"]], tok_models["base"], tokenizer={"source": "union", "tokens": tokens}
    )
    out = run(tmp_path, config)
    check_tokenizer(out, 66, has=["<|im_start|>", "<|im_end|>"])
    np.testing.assert_array_equal(embedding(out, "_tok_10"), embedding(tok_models["chatml"], "_tok_10"))
    np.testing.assert_array_equal(embedding(out, "_tok_11"), embedding(tok_models["base"], "_tok_11"))


def test_model_token_id(tmp_path, tok_models):
    tokens = {
        "_tok_20": {"source": {"kind": "model_token", "model": tok_models["chatml"], "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": tok_models["base"], "token": "<s>"}, "force": True},
    }
    config = make_config(
        [tok_models["base"], tok_models["chatml"]], tok_models["base"], tokenizer={"source": "base", "tokens": tokens}
    )
    out = run(tmp_path, config)
    check_tokenizer(out, 64, has=["_tok_10"])
    chatml_rows = read_safetensors(Path(tok_models["chatml"]))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(embedding(out, "_tok_20"), chatml_rows[64])
    np.testing.assert_array_equal(embedding(out, "_tok_21"), embedding(tok_models["base"], "<s>"))


def test_pad_to_multiple_of(tmp_path, tok_models):
    config = make_config(
        [tok_models["chatml"]], tok_models["chatml"], tokenizer={"source": "base", "pad_to_multiple_of": 16}
    )
    out = run(tmp_path, config)
    padded = (66 // 16 + 1) * 16
    assert json.loads((out / "config.json").read_text())["vocab_size"] == padded
    check_tokenizer(out, 66, has=["<|im_start|>", "<|im_end|>"])
    rows = read_safetensors(out)["model.embed_tokens.weight"]
    assert rows.shape[0] == padded
    np.testing.assert_allclose(rows[66], rows[:66].mean(axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ({"source": "union", "extra": 1}, "tokenizer.extra"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"tokens": {"x": {"source": {"kind": "model_token", "model": "nowhere", "token_id": 1}}}}, "source.model"),
        (
            {"tokens": {"x": {"source": {"kind": "model_token", "model": "M", "token_id": 1, "token": "a"}}}},
            "exactly one",
        ),
        ({"tokens": {"x": {"source": {"kind": "other"}}}}, "kind"),
        ({"tokens": {"x": {"force": "yes"}}}, "force"),
    ],
)
def test_bad_tokenizer_sections_are_refused(tmp_path, tok_models, tokenizer, message):
    text = json.dumps(tokenizer).replace('"M"', json.dumps(tok_models["base"]))
    config = make_config([tok_models["base"]], tok_models["base"], tokenizer=json.loads(text))
    with pytest.raises(RecipeError, match=message):
        load_config(config)


def test_both_tokenizer_keys_are_refused(tok_models):
    config = make_config([tok_models["base"]], None, tokenizer_source="base", tokenizer={"source": "base"})
    with pytest.raises(RecipeError, match="cannot both"):
        load_config(config)


def chat_config(tok_models: dict, template: str) -> dict:
    config = make_config([tok_models["base"], tok_models["b"]], tok_models["base"], chat_template=template)
    config["dtype"] = "bfloat16"
    config["models"] = [{"model": m, "parameters": {"weight": 0.5}} for m in (tok_models["base"], tok_models["b"])]
    return config


def template_of(model: Path) -> str:
    """The written template; transformers (where installed) must read the same one."""
    text = (model / "chat_template.jinja").read_text()
    assert json.loads((model / "tokenizer_config.json").read_text())["chat_template"] == text
    if PEER is not None:
        assert load_in_transformers(PEER, model)["template"] == text
    return text


def test_template_chatml(tmp_path, tok_models):
    out = run(tmp_path, chat_config(tok_models, "chatml"), compare=False)
    assert "<|im_start|>" in template_of(out)


def test_template_literal_jinja(tmp_path, tok_models):
    out = run(tmp_path, chat_config(tok_models, "{{messages[0]['content']}}"), compare=False)
    assert template_of(out) == "{{messages[0]['content']}}"


def test_template_auto_takes_the_models_template(tmp_path, tok_models):
    source = tmp_path / "with_template"
    source.mkdir()
    for file in Path(tok_models["base"]).iterdir():
        (source / file.name).symlink_to(file)
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config = chat_config({**tok_models, "base": str(source)}, "auto")
    out = run(tmp_path, config, compare=False)
    assert template_of(out).startswith("{% for m in messages %}")


def test_template_without_template_or_name_is_refused(tmp_path, tok_models):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(chat_config(tok_models, "nosuchname")))
    with pytest.raises(RecipeError, match="chat_template"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()

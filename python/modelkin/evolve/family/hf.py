r"""The files beside the weights that make each model of the bundled task family a complete Hugging
Face model: ``tokenizer.json`` (character level, exactly the family's tokens), ``tokenizer_config.json``
and ``generation_config.json``. transformers' ``AutoTokenizer`` and ``AutoModelForCausalLM`` then load a
family model (or a merge of them: merges copy these files) and ``generate`` its answers, which are
the numpy evaluator's.

The tokenizer is written here by hand in the ``tokenizers`` format, so the package needs neither
``tokenizers`` nor transformers: a ``WordLevel`` model over the family's tokens (ids as
``tasks.TOKEN_ID``) behind a pre-tokenizer that splits the text into single characters (newlines
included: the pattern is ``[\s\S]``, not ``.``), and a
``Fuse`` decoder that joins tokens with nothing between them. ``<pad>`` (id 0, a token the models
never produce) is the pad, eos and unknown token: the family has no end-of-text token (every answer
is ``ANSWER_LEN`` tokens), and characters outside the vocabulary (a newline in a stop sequence)
become ``<pad>`` instead of an error.

This module takes the tokens as arguments and imports nothing of the package, so the training
script can load it by path and write the files beside the weights it trains."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAD = "<pad>"
FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tokenizer_json(tokens: Sequence[str]) -> dict[str, Any]:
    """The ``tokenizers`` serialization of the character-level tokenizer of ``tokens``; the token at
    index i gets id i, and ``tokens[0]`` must be the pad token."""
    if not tokens or tokens[0] != PAD:
        raise ValueError(f"the first token must be {PAD!r}")
    if any(len(t) != 1 for t in tokens[1:]) or len(set(tokens)) != len(tokens):
        raise ValueError("the tokens after the pad token must be distinct single characters")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": 0,
                "content": PAD,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": PAD},
    }


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """transformers' tokenizer settings: the fast tokenizer of tokenizer.json, with ``<pad>`` as its
    pad, eos and unknown token, no BOS, and left padding (the side a decoder-only model generates
    from)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "eos_token": PAD,
        "unk_token": PAD,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            "0": {
                "content": PAD,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }


def generation_config() -> dict[str, Any]:
    """Greedy decoding with the pad/eos token of tokenizer_config.json. No length is set: lm-eval
    passes ``max_length`` and callers ``max_new_tokens`` (the family's answers are ANSWER_LEN
    tokens), and a length set here would make transformers warn that both are set."""
    return {"do_sample": False, "pad_token_id": 0, "eos_token_id": 0}


def hf_files(tokens: Sequence[str], model_max_length: int) -> dict[str, str]:
    """The three files' names and texts, as shipped beside every model of the family."""
    contents = {
        "tokenizer.json": tokenizer_json(tokens),
        "tokenizer_config.json": tokenizer_config(model_max_length),
        "generation_config.json": generation_config(),
    }
    return {name: json.dumps(content, indent=2, ensure_ascii=False) + "\n" for name, content in contents.items()}


def write_hf_files(directory: str | Path, tokens: Sequence[str], model_max_length: int) -> list[Path]:
    """Writes the three files into a model directory; returns their paths."""
    written = []
    for name, text in hf_files(tokens, model_max_length).items():
        path = Path(directory) / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written

"""The output tokenizer and the embedding rows that follow it (mergekit's ``tokenizer_source`` and
``tokenizer:`` section).

mergekit builds the output vocabulary (a model's, the base's, or the union of every model's), maps
each output token to its row in every model, and lays each model's embedding and head out in the
output order before merging: a token a model lacks takes the row of the only model that has it,
else the base's, else the average of the models that have it; ``tokens:`` forces a source per token;
``pad_to_multiple_of`` pads with the average row. modelkin does the same from ``tokenizer.json`` (no
transformers needed), writes each model's laid-out tensors to a scratch safetensors file, and points
the merge at them; everything else streams from the models as before.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.errors import RecipeError
from ..io.safetensors import Dtype, save_file, stored_values

# Tensors indexed by token (mergekit's `vocabulary_axis: 0` weights, across its architectures).
VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|output)"
    r"(?:\.linear)?\.(?:weight|bias)$"
)
# The tokenizer files a tokenizer directory may hold; the output's come from one source.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TokenSource:
    """Where one output token's row comes from (a `tokens:` entry)."""

    model: str | None  # None: a zero row
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The recipe's tokenizer request: ``tokenizer_source`` or the ``tokenizer:`` section."""

    source: str  # "base", "union" or a model reference
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class ModelVocab:
    """One model's tokenizer as mergekit sees it: token → id (added tokens included), the rows its
    weights have (config ``vocab_size``) and its tokenizer.json."""

    ref: str
    vocab: dict[str, int]
    size: int
    tokenizer: dict[str, Any] | None
    directory: Path


@dataclass
class OutputVocabulary:
    """The output tokenizer and, per model, the output token → row maps."""

    vocab: dict[str, int]
    rows: int  # padded
    tokenizer_json: dict[str, Any]
    tokenizer_config: dict[str, Any] | None
    copy_from: Path
    permutations: dict[str, np.ndarray]  # model ref → row per output id (-1: absent)
    models: dict[str, ModelVocab]
    # tokenizer.json differs from copy_from's (a union, or the base stripped of unused tokens): the
    # slow-tokenizer files there (tokenizer.model, vocab, merges) would contradict it.
    rewritten: bool


def parse_spec(raw: Mapping[str, Any], known: set[str]) -> TokenizerSpec | None:
    """The tokenizer request of a recipe (keys already checked to be known), or None for none."""
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise RecipeError("tokenizer_source and tokenizer: cannot both be given (mergekit refuses it too)")
    source = raw.get("tokenizer_source")
    if source is not None:
        return TokenizerSpec(_source(source, "tokenizer_source", known))
    section = raw.get("tokenizer")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise RecipeError("tokenizer: must be a mapping with source, tokens, pad_to_multiple_of")
    unknown = set(section) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise RecipeError(f"tokenizer.{sorted(unknown)[0]}: unknown key (known: source, tokens, pad_to_multiple_of)")
    pad = section.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0):
        raise RecipeError(f"tokenizer.pad_to_multiple_of must be a positive integer, not {pad!r}")
    tokens: dict[str, TokenSource] = {}
    for token, entry in (section.get("tokens") or {}).items():
        tokens[str(token)] = _token_source(str(token), entry, known)
    return TokenizerSpec(_source(section.get("source", "union"), "tokenizer.source", known), tokens, pad)


def _source(value: Any, key: str, known: set[str]) -> str:
    # Any model reference may give the tokenizer (mergekit loads it from its path), not only one
    # the recipe merges.
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{key}: {value!r} is not base, union or a model reference")
    return value


def _token_source(token: str, entry: Any, known: set[str]) -> TokenSource:
    where = f"tokenizer.tokens.{token}"
    if not isinstance(entry, Mapping):
        raise RecipeError(f"{where}: must be a mapping with source and force")
    unknown = set(entry) - {"source", "force"}
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}: unknown key (known: source, force)")
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force must be true or false")
    source = entry.get("source")
    if isinstance(source, Mapping):
        kind = source.get("kind")
        if kind == "zero":
            if set(source) != {"kind"}:
                raise RecipeError(f"{where}.source: kind zero takes no other key")
            return TokenSource(None, force=force)
        if kind != "model_token":
            raise RecipeError(f"{where}.source.kind: {kind!r} is not model_token or zero")
        unknown = set(source) - {"kind", "model", "token_id", "token"}
        if unknown:
            raise RecipeError(f"{where}.source.{sorted(unknown)[0]}: unknown key")
        model = _model(source.get("model"), f"{where}.source.model", known)
        token_id, name = source.get("token_id"), source.get("token")
        if (token_id is None) == (name is None):
            raise RecipeError(f"{where}.source: give exactly one of token_id and token")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise RecipeError(f"{where}.source.token_id must be an integer")
        return TokenSource(model, token_id, None if name is None else str(name), force)
    if source is None:
        # mergekit accepts a bare `force`; with no source the usual assignment applies.
        return TokenSource("", force=force)
    return TokenSource(_model(source, f"{where}.source", known), force=force)


def _model(value: Any, key: str, known: set[str]) -> str:
    if value is None or str(value) not in known:
        raise RecipeError(f"{key}: {value!r} is not a model of the recipe")
    return str(value)


def read_vocab(ref: str, path: Path, base: ModelVocab | None) -> ModelVocab:
    """A model's vocabulary from its tokenizer.json (a model without one shares the base's, as
    mergekit assumes) and its row count from config.json's ``vocab_size``."""
    directory = path if path.is_dir() else path.parent
    tokenizer_path = directory / "tokenizer.json"
    config = _json(directory / "config.json")
    size = config.get("vocab_size") if config else None
    if not tokenizer_path.exists():
        if base is None:
            raise RecipeError(f"{tokenizer_path}: missing; merging tokenizers needs the base's tokenizer.json")
        return ModelVocab(ref, dict(base.vocab), size if isinstance(size, int) else base.size, None, directory)
    tokenizer = _json(tokenizer_path)
    if tokenizer is None or not isinstance(tokenizer.get("model"), dict):
        raise RecipeError(f"{tokenizer_path}: not a tokenizers JSON file")
    model = tokenizer["model"]
    entries = model.get("vocab")
    if isinstance(entries, dict):
        vocab = {str(k): int(v) for k, v in entries.items()}
    elif isinstance(entries, list):  # Unigram: [piece, score] in id order
        vocab = {str(e[0]): i for i, e in enumerate(entries)}
    else:
        raise RecipeError(f"{tokenizer_path}: model.vocab is missing")
    for added in tokenizer.get("added_tokens") or []:
        vocab[str(added["content"])] = int(added["id"])
    return ModelVocab(ref, vocab, size if isinstance(size, int) else len(vocab), tokenizer, directory)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build(spec: TokenizerSpec, base_ref: str, refs: list[str], paths: Mapping[str, Path]) -> OutputVocabulary:
    """The output tokenizer and every model's row map, as mergekit's build_tokenizer makes them."""
    base = read_vocab(base_ref, paths[base_ref], None)
    if base.tokenizer is None:
        raise RecipeError(f"{base.directory}: merging tokenizers needs the base's tokenizer.json")
    models = {base_ref: base}
    for ref in refs:
        if ref != base_ref:
            models[ref] = read_vocab(ref, paths[ref], base)
    base_json = _stripped(base)
    if spec.source == "union":
        out_json = _union(base_json, base, [models[r] for r in refs if r in models])
        copy_from = base.directory
    elif spec.source == "base":
        out_json, copy_from = base_json, base.directory
    else:
        chosen = models.get(spec.source) or read_vocab(spec.source, paths[spec.source], base)
        if chosen.tokenizer is None:
            raise RecipeError(f"{chosen.directory}: tokenizer_source {spec.source} has no tokenizer.json")
        out_json, copy_from = json.loads(json.dumps(chosen.tokenizer)), chosen.directory
    # Tokens the `tokens:` section names join the vocabulary when it lacks them (as in mergekit).
    _append_added(out_json, [_plain_added(t) for t in spec.tokens])
    vocab = _vocab_of(out_json)
    rows = len(vocab)
    pad = spec.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    permutations = {}
    for ref, model in models.items():
        p = np.full(rows, -1, dtype=np.int64)
        for token, new in vocab.items():
            old = model.vocab.get(token)
            if old is not None and old < model.size:
                p[new] = old
        permutations[ref] = p
    config = _json(copy_from / "tokenizer_config.json")
    rewritten = out_json != _json(copy_from / "tokenizer.json")
    if rewritten and config is not None:
        config = _with_added_decoder(config, out_json)
    return OutputVocabulary(vocab, rows, out_json, config, copy_from, permutations, models, rewritten)


def _vocab_of(tokenizer: dict[str, Any]) -> dict[str, int]:
    entries = tokenizer["model"]["vocab"]
    vocab = (
        {str(k): int(v) for k, v in entries.items()}
        if isinstance(entries, dict)
        else {str(e[0]): i for i, e in enumerate(entries)}
    )
    for added in tokenizer.get("added_tokens") or []:
        vocab[str(added["content"])] = int(added["id"])
    return vocab


def _stripped(model: ModelVocab) -> dict[str, Any]:
    """The base tokenizer without the tokens its weights have no row for (mergekit's
    get_stripped_tokenizer; BPE only, as there)."""
    assert model.tokenizer is not None
    unused = {t for t, i in model.vocab.items() if i >= model.size}
    data: dict[str, Any] = json.loads(json.dumps(model.tokenizer))
    if not unused:
        return data
    if data["model"].get("type") != "BPE":
        raise RecipeError(
            f"{model.directory}: tokenizer has tokens past vocab_size {model.size} and is "
            f"{data['model'].get('type')}; only BPE can be stripped (as in mergekit)"
        )
    data["added_tokens"] = [e for e in data.get("added_tokens") or [] if int(e["id"]) < model.size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges") or [] if keep(m)]
    return data


def _union(base_json: dict[str, Any], base: ModelVocab, models: list[ModelVocab]) -> dict[str, Any]:
    """mergekit's build_union_tokenizer: the base tokenizer plus, as added tokens, every other
    model's plain tokens it lacks (model order) and then every model's added tokens (first
    settings win)."""
    plain: dict[str, None] = {}
    added: dict[str, dict[str, Any]] = {}
    for model in [base, *[m for m in models if m is not base]]:
        tokenizer = model.tokenizer if model.tokenizer is not None else base.tokenizer
        assert tokenizer is not None
        added_here = {str(e["content"]): e for e in tokenizer.get("added_tokens") or []}
        for token, index in model.vocab.items():
            if index < model.size and token not in added_here:
                plain.setdefault(token)
        for token, entry in added_here.items():
            if int(entry["id"]) < model.size:
                added.setdefault(token, entry)
    out: dict[str, Any] = json.loads(json.dumps(base_json))
    fresh = [_plain_added(t) for t in plain]
    fresh += [{k: v for k, v in e.items() if k != "id"} for e in added.values()]
    _append_added(out, fresh)
    return out


def _plain_added(token: str) -> dict[str, Any]:
    """A token added as transformers' ``add_tokens(str)`` adds it."""
    return {
        "content": token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": False,
    }


def _append_added(tokenizer: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Appends the entries the vocabulary lacks as added tokens with the next free ids."""
    seen = set(_vocab_of(tokenizer))
    next_id = max(_vocab_of(tokenizer).values(), default=-1) + 1
    added = tokenizer.setdefault("added_tokens", [])
    for entry in entries:
        if entry["content"] in seen:
            continue
        seen.add(str(entry["content"]))
        added.append({"id": next_id, **entry})
        next_id += 1


def _with_added_decoder(config: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json's ``added_tokens_decoder`` listing the tokenizer's added tokens."""
    decoder = {
        str(e["id"]): {k: v for k, v in e.items() if k not in ("id",)} for e in tokenizer.get("added_tokens") or []
    }
    return {**config, "added_tokens_decoder": decoder}


def is_vocab_tensor(name: str, shape: tuple[int, ...], rows: int) -> bool:
    """Whether a tensor is indexed by token along its first axis."""
    return bool(VOCAB_TENSOR.search(name)) and len(shape) >= 1 and shape[0] == rows


def aligned_rows(
    out: OutputVocabulary,
    spec: TokenizerSpec,
    base_ref: str,
    tensors: Mapping[str, np.ndarray],
    rounding: Callable[[np.ndarray], np.ndarray] = lambda v: v,
) -> dict[str, np.ndarray]:
    """Each model's tensor laid out in the output vocabulary (mergekit's PermutedVocabulary). The
    arrays hold the stored values exactly (float32, or float64 for F64 weights); ``rounding`` rounds a
    result to the stored dtype, so averages follow torch's steps in that dtype."""
    models = list(tensors)
    shape = next(iter(tensors.values())).shape[1:]
    configs: dict[str, TokenSource] = dict(spec.tokens)
    # Vectorised over the vocabulary (hundreds of thousands of tokens): only the tokens some model
    # lacks, and the forced ones, are visited one by one.
    tokens = list(out.vocab)
    news = np.fromiter(out.vocab.values(), dtype=np.int64, count=len(tokens))
    complete = np.ones(len(tokens), dtype=bool)
    for m in models:
        complete &= out.permutations[m][news] >= 0
    forced = np.zeros(len(tokens), dtype=bool)
    position = {token: i for i, token in enumerate(tokens)} if spec.tokens else {}
    for token, source in spec.tokens.items():
        if source.force and token in position:
            forced[position[token]] = True
    visit = [int(i) for i in np.nonzero(~complete | forced)[0]]
    to_average: set[str] = set()
    for i in visit:
        token, new = tokens[i], int(news[i])
        if token in configs or complete[i]:
            continue
        present = [m for m in models if out.permutations[m][new] >= 0]
        if len(present) == 1:
            configs[token] = TokenSource(present[0])
        elif not present:
            configs[token] = TokenSource(None)
        elif base_ref in models and out.permutations[base_ref][new] >= 0:
            configs[token] = TokenSource(base_ref)
        else:
            to_average.add(token)
    defaults: dict[str, np.ndarray] = {}
    for i in visit:
        token, new = tokens[i], int(news[i])
        cfg = configs.get(token)
        if token in to_average:
            # torch: embed = embed + row for each model that has it, then embed /= count, each
            # step in the tensor's dtype.
            present = [m for m in models if out.permutations[m][new] >= 0]
            total = np.zeros(shape, dtype=tensors[models[0]].dtype)
            for m in present:
                total = rounding(total + tensors[m][out.permutations[m][new]])
            defaults[token] = rounding(total / total.dtype.type(len(present)))
        elif cfg is not None:
            defaults[token] = _default_row(out, tensors, token, new, cfg, shape)
    result = {}
    for model in models:
        p = out.permutations[model]
        table = np.zeros((out.rows, *shape), dtype=tensors[model].dtype)
        rows = p[news]
        take = (rows >= 0) & ~forced
        table[news[take]] = tensors[model][rows[take]]
        for missing in np.nonzero(~take)[0]:
            token = tokens[missing]
            if token not in defaults:
                raise RecipeError(f"no embedding row for token {token!r} in {model}")
            table[news[missing]] = defaults[token]
        if out.rows > len(out.vocab):
            # Padding rows: the average of the real ones (as mergekit pads).
            real = table[: len(out.vocab)]
            table[len(out.vocab) :] = rounding(rounding(torch_outer_sum(real)) / real.dtype.type(len(real)))
        result[model] = table
    return result


def torch_outer_sum(values: np.ndarray) -> np.ndarray:
    """torch's sum over the first axis of a contiguous tensor on the CPU (``vectorized_outer_sum``):
    per column, runs of 2^p rows added one by one, the runs cascaded through four levels of
    accumulators, the leftover rows into the first level, then the levels folded in order."""
    n = values.shape[0]
    ceil_log2 = 1 if n <= 2 else (n - 1).bit_length()
    power = max(4, ceil_log2 // 4)
    step, mask = 1 << power, (1 << power) - 1
    runs = n // step
    # Each run of `step` rows is summed one row after another from zero; np.add.accumulate adds in
    # exactly that order (in the array's dtype), for every run at once.
    run_sums = np.add.accumulate(values[: runs * step].reshape(runs, step, *values.shape[1:]), axis=1)[:, -1]
    levels = [np.zeros(values.shape[1:], dtype=values.dtype) for _ in range(4)]
    for r in range(runs):
        levels[1] += run_sums[r]
        i = (r + 1) * step
        for j in range(2, 4):
            if i & (mask << ((j - 1) * power)):
                break
            levels[j] += levels[j - 1]
            levels[j - 1][...] = 0
    for row in values[runs * step :]:
        levels[0] += row
    for j in range(1, 4):
        levels[0] += levels[j]
    return levels[0]


def dtype_rounding(dtype: Dtype) -> Callable[[np.ndarray], np.ndarray]:
    """Rounds float32 results to a stored half dtype (held as float32); identity otherwise."""
    if dtype == "BF16":
        return lambda v: stored_values(v, "BF16").astype(np.float32)
    if dtype == "F16":
        return lambda v: np.asarray(v, dtype=np.float32).astype(np.float16).astype(np.float32)
    return lambda v: v


def _default_row(
    out: OutputVocabulary,
    tensors: Mapping[str, np.ndarray],
    token: str,
    new: int,
    cfg: TokenSource,
    shape: tuple[int, ...],
) -> np.ndarray:
    if cfg.model is None:
        return np.zeros(shape)
    model = cfg.model or next(iter(tensors))
    if model not in tensors:
        raise RecipeError(f"token {token!r} takes its row from {model}, which does not take part in this tensor")
    if cfg.token_id is not None or cfg.token is not None:
        index = cfg.token_id if cfg.token_id is not None else out.models[model].vocab.get(cfg.token or "")
        if index is None:
            raise RecipeError(f"tokenizer.tokens.{token}: token {cfg.token!r} is not in {model}'s tokenizer")
        if not 0 <= index < tensors[model].shape[0]:
            raise RecipeError(f"tokenizer.tokens.{token}: token_id {index} is out of range for {model}")
        return np.asarray(tensors[model][index])
    row = out.permutations[model][new]
    if row < 0:
        raise RecipeError(f"tokenizer.tokens.{token}: {model} has no token {token!r}")
    return np.asarray(tensors[model][row])


def write_tokenizer(out: OutputVocabulary, staging: Path, files: re.Pattern[str]) -> None:
    """The output tokenizer files: the source's (those ``files`` matches), with tokenizer.json
    (and the added tokens of tokenizer_config.json) rewritten when the vocabulary was built."""
    slow = re.compile(r"^(tokenizer\.model|added_tokens\.json|vocab\..*|merges\.txt|.*\.model)$")
    for file in out.copy_from.iterdir():
        if file.is_file() and files.match(file.name) and not (out.rewritten and slow.match(file.name)):
            shutil.copyfile(file, staging / file.name)
    if not out.rewritten:
        return
    (staging / "tokenizer.json").write_text(json.dumps(out.tokenizer_json, indent=2, ensure_ascii=False))
    if out.tokenizer_config is not None:
        (staging / "tokenizer_config.json").write_text(json.dumps(out.tokenizer_config, indent=2, ensure_ascii=False))


def lay_out(
    out: OutputVocabulary,
    spec: TokenizerSpec,
    token_base: str,
    tensors: Mapping[str, list[tuple[str, str]]],
    read: Callable[[str, str], tuple[np.ndarray, Dtype]],
    scratch: Path,
) -> dict[tuple[str, str], Path]:
    """Lays out every token-indexed tensor of the merge in the output vocabulary: ``tensors`` maps
    each one to the (model, tensor name) pairs that feed it; ``read`` reads one (an adapted model's
    with its adapter applied). Returns the scratch file holding each
    (model, tensor name) laid out, under the same name; the merge reads those instead.

    One tensor at a time, in float32 (float64 for F64 weights): copies are exact, and memory is that
    tensor's size times twice the number of models."""
    scratch.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[str, str], Path] = {}
    for sources in tensors.values():
        loaded: dict[str, np.ndarray] = {}
        dtypes: dict[str, Dtype] = {}
        names: dict[str, str] = {}
        for ref, name in sources:
            values, dtype = read(ref, name)
            rows = values.shape[0]
            # A token past the tensor's rows (a tokenizer larger than the weights) has no row.
            out.permutations[ref] = np.where(out.permutations[ref] < rows, out.permutations[ref], -1)
            loaded[ref] = values if dtype == "F64" else values.astype(np.float32)
            dtypes[ref], names[ref] = dtype, name
        # mergekit promotes the models' dtypes of a tensor and computes in that dtype.
        kinds = set(dtypes.values())
        working: Dtype = kinds.pop() if len(kinds) == 1 else ("F64" if "F64" in kinds else "F32")
        for ref, table in aligned_rows(out, spec, token_base, loaded, dtype_rounding(working)).items():
            file = scratch / f"{len(files)}.safetensors"
            save_file(file, {names[ref]: table}, dtypes[ref])
            files[(ref, names[ref])] = file
    return files

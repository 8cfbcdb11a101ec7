"""Merging models from a mergekit recipe: the Rust engine writes the tensors, this module resolves
the recipe and lays out the output directory (atomically: a temp directory renamed into place)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from ._core import model_tensors, run_merge
from .architecture import COUNT_KEYS, LayerNaming, layer_naming
from .chat_template import resolve_template, write_template
from .merge_config import (
    METHODS,
    MergeConfig,
    ModelEntry,
    RecipeError,
    gradient_position,
    layer_of,
    load_config,
    lookup,
    out_dtype_name,
)
from .resolve import resolve
from .vocabulary import VOCAB_TENSOR, OutputVocabulary, lay_out, write_tokenizer
from .vocabulary import build as build_vocabulary

TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|"
    r"chat_template.*|generation_config\.json)$"
)
# Memory magnitude pruning (ties, breadcrumbs) may use per tensor to split ties at its threshold
# exactly as torch's sort does: 8 bytes per element. Larger tensors fall back to the streamed rule
# (ties go all in or all out), so memory stays bounded whatever the model size.
SORT_ORDER_BYTES = 512 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MergeResult:
    """Where a merge was written and the provenance recorded beside it."""

    path: Path
    method: str
    parents: tuple[str, ...]
    base: str | None
    kinship: dict[str, list[list[float | None]]] | None
    bytes_written: int


def parse_size(text: str | int) -> int:
    """'2GB', '500M', '1.5G' or a byte count."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r} (examples: 2GB, 500MB)")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match[2].upper()]
    return int(float(match[1]) * scale)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    target = out.resolve()
    for path in inputs:
        model = path.resolve()
        if target == model or (model.is_dir() and model in target.parents):
            raise RecipeError(f"{out}: the output must not be (inside) an input model {model}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RecipeError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


# One output tensor: its name, the (entry, tensor name) of each merged input, the base's tensor
# name, and the tensor's position along parameter gradients.
PlannedOutput = tuple[str, list[tuple[ModelEntry, str]], str | None, float | None]


def _plan_models(
    tensors: list[str], base_ref: str | None, inputs: list[ModelEntry], layers: int
) -> list[PlannedOutput]:
    """`models:` recipes: every tensor of the base (or first model) merged from all inputs."""
    return [
        (name, [(entry, name) for entry in inputs], name if base_ref else None, gradient_position(name, layers))
        for name in tensors
    ]


def _plan_slices(
    config: MergeConfig, tensors: list[str], base_ref: str | None, naming: LayerNaming
) -> list[PlannedOutput]:
    """`slices:` recipes (frankenmerges): output layers numbered in slice order under the
    architecture's layer prefix; the tensors before the first layer (embeddings) come from the
    first slice's sources and those after the last (final norm, head) from the last slice's, as in
    mergekit."""
    slices = config.slices or ()
    prefix = naming.prefix
    by_layer = [n for n in tensors if naming.layer_of(n) is not None]
    layer_suffixes = list(
        dict.fromkeys(n[len(prefix) :].partition(".")[2] for n in by_layer if naming.layer_of(n) == 0)
    )
    outputs: list[PlannedOutput] = []
    # Stored order puts embeddings first in most files, not all: GPT-2 stores `wte`/`wpe` beside
    # `ln_f`, so "embed"-like names (wte, wpe, embed_*) go first and the rest last.
    non_layer = [n for n in tensors if naming.layer_of(n) is None]
    pre = [n for n in non_layer if re.search(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.", n)]
    post = [n for n in non_layer if n not in pre]

    def sources(slice_sources: tuple[ModelEntry, ...], name: str) -> tuple[list[tuple[ModelEntry, str]], str | None]:
        inputs = [(e, name) for e in slice_sources if e.model != base_ref]
        return inputs, (name if base_ref else None)

    for name in pre:
        inputs, base = sources(slices[0], name)
        outputs.append((name, inputs, base, None))
    out_layer = 0
    for slice_sources in slices:
        assert slice_sources[0].layer_range is not None
        span = slice_sources[0].layer_range[1] - slice_sources[0].layer_range[0]
        for offset in range(span):
            t = offset / (span - 1) if span > 1 else 1.0
            for suffix in layer_suffixes:
                out_name = f"{prefix}{out_layer}.{suffix}"
                named = [(e, f"{prefix}{(e.layer_range or (0, 0))[0] + offset}.{suffix}") for e in slice_sources]
                inputs = [(e, n) for e, n in named if e.model != base_ref]
                base = next((n for e, n in named if e.model == base_ref), inputs[0][1] if base_ref else None)
                outputs.append((out_name, inputs, base, t))
            out_layer += 1
    for name in post:
        inputs, base = sources(slices[-1], name)
        outputs.append((name, inputs, base, None))
    return outputs


def _recipes(
    config: MergeConfig,
    paths: dict[str, Path],
    plan: list[PlannedOutput],
    base_ref: str | None,
    redirect: Mapping[tuple[str, str], int],
) -> list[dict[str, Any]]:
    """The engine's tensor recipes; ``redirect`` sends a (model, tensor) to another file of the
    job (its vocabulary laid out in the output tokenizer's order)."""
    index = {ref: i for i, ref in enumerate(paths)}
    method = config.method
    tensors = []
    for name, inputs, base_tensor, t in plan:
        entries = []
        for entry, source_name in inputs:
            density = float(lookup(config, entry, "density", name, t, method.tensor_defaults.get("density", 1.0)))
            if not 0 <= density <= 1:
                raise RecipeError(f"density {density} for {entry.model} at tensor {name} is outside [0, 1]")
            epsilon = float(lookup(config, entry, "epsilon", name, t, method.tensor_defaults.get("epsilon", 0.0)))
            della = method.name.startswith("della") and 0 < density < 1
            if della and not (density - epsilon > 0 and density + epsilon < 1):
                raise RecipeError(
                    f"della needs density ± epsilon inside (0, 1): {density} ± {epsilon} for {entry.model} at {name}"
                )
            entries.append(
                {
                    "model": redirect.get((entry.model, source_name), index[entry.model]),
                    "tensor": source_name,
                    # passthrough's `scale` travels as the input's weight (the factor it is multiplied by).
                    "weight": float(
                        lookup(config, entry, "scale" if method.name == "passthrough" else "weight", name, t, 1.0)
                    ),
                    "density": density,
                    "gamma": float(lookup(config, entry, "gamma", name, t, method.tensor_defaults.get("gamma", 0.0))),
                    "epsilon": epsilon,
                }
            )
        tensors.append(
            {
                "name": name,
                "base_tensor": base_tensor,
                "base_model": redirect.get((base_ref, base_tensor)) if base_ref and base_tensor else None,
                "inputs": entries,
                "t": float(lookup(config, None, "t", name, t, 0.0)),
                "select_topk": float(lookup(config, None, "select_topk", name, t, 1.0)),
            }
        )
    return tensors


def merge(
    recipe: str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    seed: int = 0,
    threads: int = 0,
    out_shard_size: str | int = "5GB",
    offline: bool = False,
    precise: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> MergeResult:
    """Runs a mergekit recipe (a YAML path or a dict with the same keys) into directory ``out``.

    By default the arithmetic is mergekit's: in the recipe's ``dtype`` (else the inputs' stored
    dtype), rounded after each operation as torch rounds it, so the output has mergekit's bits.
    ``precise=True`` computes exactly in float64 and rounds once to the output dtype."""
    config = load_config(recipe if isinstance(recipe, Mapping) else Path(recipe))
    for message in config.ignored:
        print(f"warning: {message}", file=sys.stderr)
    out_path = Path(out)
    refs = list(dict.fromkeys([*(m.model for m in config.models), *([config.base_model] if config.base_model else [])]))
    paths = {ref: resolve(ref, offline=offline) for ref in refs}
    _check_output(out_path, list(paths.values()), overwrite)
    method = config.method
    # linear and passthrough ignore base_model (as in mergekit); nuslerp and multislerp work on task
    # vectors when one is given; karcher averages it with the models (mergekit 0.1.5 gathers every
    # model of the recipe, base_model included, into the mean).
    base_ref = None if method.name in ("linear", "karcher", "passthrough") else config.base_model
    inputs = list({m.model: m for m in config.models if m.model != base_ref}.values())
    if method.name == "karcher" and config.base_model and all(m.model != config.base_model for m in inputs):
        inputs.append(ModelEntry(config.base_model, {}))
    base_config = _read_json(_model_dir(paths[base_ref or inputs[0].model]) / "config.json")
    names = [n for n, _, _ in model_tensors(str(paths[base_ref or inputs[0].model]))]
    counts = [int(v) for k in COUNT_KEYS if isinstance(v := (base_config or {}).get(k), int)]
    layers = counts[0] if counts else 0
    if not layers:
        found = [layer_of(n) for n in names]
        layers = max((x for x in found if x is not None), default=0) + 1
    options = {k: lookup(config, None, k, "", None, v) for k, v in method.global_defaults.items()}
    if config.slices is None:
        plan = _plan_models(names, base_ref, inputs, layers)
    else:
        naming = layer_naming(base_config, names, base_ref or inputs[0].model)
        plan = _plan_slices(config, names, base_ref, naming)
        out_layers = sum(s[0].layer_range[1] - s[0].layer_range[0] for s in config.slices if s[0].layer_range)
        base_config = {**(base_config or {}), naming.count_key: out_layers}
    reference_tensors = model_tensors(str(paths[base_ref or inputs[0].model]))
    out_dtype = out_dtype_name(config, base_config, reference_tensors[0][2] if reference_tensors else None)
    compute = "float64" if precise else arithmetic_dtype(config.dtype, [_stored_dtype(paths[r]) for r in paths])
    if (
        method.name in ("ramplus_tl", "arcee_fusion")
        and config.out_dtype is None
        and compute in ("bfloat16", "float16")
    ):
        # RAM+'s float32 λ (arcee_fusion's float32 mask) promotes the result to float32, and mergekit
        # writes it so.
        out_dtype = "F32"
    parent = out_path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.modelkin-", dir=parent))
    try:
        models = [str(paths[ref]) for ref in paths]
        redirect: dict[tuple[str, str], int] = {}
        vocabulary = None
        if config.tokenizer is not None:
            vocabulary, files = _lay_out_vocabulary(config, refs, paths, plan, base_ref, staging / ".vocabulary")
            for key, file in files.items():
                redirect[key] = len(models)
                models.append(str(file))
            if base_config is not None:
                base_config = {**base_config, "vocab_size": vocabulary.rows}
        template = None
        if config.chat_template is not None:
            template = resolve_template(config.chat_template, [_model_dir(paths[r]) for r in refs])
        job = {
            "models": models,
            "base": list(paths).index(base_ref) if base_ref is not None else None,
            "method": method.name,
            "normalize": bool(options.get("normalize", False)),
            "rescale": bool(options.get("rescale", False)),
            "lambda": float(options.get("lambda", 1.0)),
            "seed": seed,
            "out_dtype": out_dtype,
            "compute": compute,
            "out_dir": str(staging),
            "max_shard_bytes": parse_size(out_shard_size),
            "threads": threads,
            "sort_order_bytes": SORT_ORDER_BYTES,
            "filter_wise": bool(options.get("filter_wise", False)),
            "ram": {
                "epsilon": float(options.get("epsilon", 1e-5)),
                "r": float(options.get("r", 0.1)),
                "alpha": float(options.get("alpha", 0.2)),
            },
            "spherical": {
                "normalize_weights": bool(options.get("normalize_weights", True)),
                "eps": float(options.get("eps", 1e-8)),
                "max_iter": int(options.get("max_iter", 10)),
                "tol": float(options.get("tol", 1e-5)),
                # mergekit ignores nuslerp_row_wise while nuslerp_flatten is true (the default).
                "flatten": bool(options.get("nuslerp_flatten", True)),
                "row_wise": bool(options.get("nuslerp_row_wise", False)),
            },
            "tensors": _recipes(config, paths, plan, base_ref, redirect),
            # Provenance compares the parents tensor by tensor; slices mix parents per layer.
            "kinship": config.slices is None,
        }
        report = run_merge(json.dumps(job), progress=progress)
        kinship = report["kinship"]
        if kinship is not None:
            kinship = {k: [[None if v != v else v for v in row] for row in m] for k, m in kinship.items()}
        parents = tuple(m.model for m in inputs)
        options = {**options, "arithmetic": compute if not precise else "float64 (precise)"}
        shutil.rmtree(staging / ".vocabulary", ignore_errors=True)
        _write_metadata(staging, config, paths, base_ref, inputs, out_dtype, base_config, options, kinship, parents)
        if vocabulary is not None:
            write_tokenizer(vocabulary, staging, TOKENIZER_FILES)
        if template is not None:
            write_template(staging, template)
        elif config.chat_template == "auto":
            print("warning: chat_template: auto found no template among the models; none written", file=sys.stderr)
        _publish(staging, out_path)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        message = str(error).replace(str(staging), str(out_path))
        raise OSError(f"{message} (nothing was written to {out_path})") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(out_path, method.name, parents, base_ref, kinship, int(report["bytes_written"]))


def _lay_out_vocabulary(
    config: MergeConfig,
    refs: list[str],
    paths: dict[str, Path],
    plan: list[PlannedOutput],
    base_ref: str | None,
    scratch: Path,
) -> tuple[OutputVocabulary, dict[tuple[str, str], Path]]:
    """The output vocabulary and every token-indexed input laid out in its order (scratch files)."""
    assert config.tokenizer is not None
    token_base = config.base_model or refs[0]
    source = config.tokenizer.source
    locations = dict(paths)
    if source not in ("base", "union") and source not in paths:
        locations[source] = resolve(source)
    vocabulary = build_vocabulary(config.tokenizer, token_base, refs, locations)
    tensors: dict[str, list[tuple[str, str]]] = {}
    for name, inputs, base_tensor, _ in plan:
        if VOCAB_TENSOR.search(name):
            feeds = [(base_ref, base_tensor)] if base_ref and base_tensor else []
            tensors[name] = feeds + [(entry.model, tensor) for entry, tensor in inputs]
    return vocabulary, lay_out(vocabulary, config.tokenizer, token_base, tensors, paths, scratch)


def arithmetic_dtype(dtype: str | None, stored: list[str | None]) -> str:
    """The dtype mergekit computes in: the recipe's ``dtype``, else the inputs' stored dtypes promoted
    as torch promotes them (bf16 with f16 gives float32)."""
    names = {
        "float64": "float64",
        "float32": "float32",
        "fp32": "float32",
        "float16": "float16",
        "fp16": "float16",
        "bfloat16": "bfloat16",
        "bf16": "bfloat16",
    }
    if dtype is not None:
        return names[dtype]
    kinds = {
        {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(s or "", "float32")
        for s in stored
    }
    if len(kinds) == 1:
        return kinds.pop()
    return "float64" if "float64" in kinds else "float32"


def _stored_dtype(path: Path) -> str | None:
    """The stored dtype of a model's first floating tensor."""
    return next((d for _, _, d in model_tensors(str(path)) if d in ("F64", "F32", "F16", "BF16")), None)


def _publish(staging: Path, out: Path) -> None:
    """Renames the finished staging directory into place; an old OUT is removed only after."""
    if out.exists():
        old = out.with_name(f".{out.name}.modelkin-old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _write_metadata(
    staging: Path,
    config: MergeConfig,
    paths: dict[str, Path],
    base_ref: str | None,
    inputs: list[ModelEntry],
    out_dtype: str,
    base_config: dict[str, Any] | None,
    options: dict[str, Any],
    kinship: dict[str, list[list[float | None]]] | None,
    parents: tuple[str, ...],
) -> None:
    torch_dtype = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[out_dtype]
    if base_config is not None:
        # Both keys, agreeing: transformers 5 reads `dtype`, older versions `torch_dtype`.
        (staging / "config.json").write_text(
            json.dumps({**base_config, "dtype": torch_dtype, "torch_dtype": torch_dtype}, indent=2)
        )
    if config.tokenizer is None:
        # No tokenizer request: the base's (else the first model's) files, as mergekit copies them.
        tokenizer_dir = _model_dir(paths[base_ref or inputs[0].model])
        for file in tokenizer_dir.iterdir():
            if file.is_file() and TOKENIZER_FILES.match(file.name):
                shutil.copyfile(file, staging / file.name)
    (staging / "mergekit_config.yml").write_text(config.text)
    provenance = {
        "parents": list(parents),
        "base": base_ref,
        "method": config.method.name,
        "parameters": {
            "global": dict(config.parameters),
            "resolved_defaults": options,
            "models": {m.model: dict(m.parameters) for m in config.models},
        },
        "kinship": kinship,
        "ignored": list(config.ignored),
        "modelkin_version": __version__,
    }
    (staging / "modelkin.json").write_text(json.dumps(provenance, indent=2, default=str))
    (staging / "README.md").write_text(
        _model_card(config, base_ref, parents, kinship, _arithmetic_text(options["arithmetic"]))
    )


def _arithmetic_text(compute: str) -> str:
    if compute.endswith("(precise)"):
        return "exact (float64, rounded once to the output dtype; `--precise`)"
    return f"{compute}, rounded after each operation as mergekit does"


def _model_card(
    config: MergeConfig,
    base: str | None,
    parents: tuple[str, ...],
    kinship: dict[str, list[list[float | None]]] | None,
    arithmetic: str,
) -> str:
    front = ["---", "base_model:"] + [f"- {p}" for p in ([base] if base else []) + list(parents)]
    front += ["library_name: transformers", "tags:", "- mergekit", "- merge", "- modelkin", "---", ""]
    body = [
        f"# {Path(config.raw.get('name') or 'merged model').name}",
        "",
        f"A merge made with modelkin using **{config.method.name}** ({METHODS[config.method.name].summary}).",
        "",
    ]
    if base:
        body += [f"Base model: `{base}`", ""]
    body += ["Parents:", *[f"- `{p}`" for p in parents], ""]
    body += [f"Arithmetic: {arithmetic}.", ""]
    if kinship is not None:
        body += [
            "## Kinship of the parents",
            "",
            "Similarity of the parents' deltas against the base (measured while merging).",
            "",
            "| model A | model B | pcc | cs | ed |",
            "|---|---|---|---|---|",
        ]
        for i, a in enumerate(parents):
            for j in range(i + 1, len(parents)):
                cells = []
                for metric in ("pcc", "cs", "ed"):
                    v = kinship[metric][i][j]
                    cells.append("n/a" if v is None else f"{v:.4f}")
                body.append(f"| `{a}` | `{parents[j]}` | " + " | ".join(cells) + " |")
        body.append("")
    body += ["## Configuration", "", "```yaml", config.text.rstrip(), "```", ""]
    return "\n".join(front + body)

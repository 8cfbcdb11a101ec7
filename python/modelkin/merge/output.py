"""The files of a merged model beside its tensors: config.json, tokenizer, model card and
provenance (modelkin.json), and publishing the finished directory atomically."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._core import __version__
from ..io.dtypes import TORCH_NAMES
from ..io.resident import TOKENIZER_FILES
from ..io.staging import set_aside_path
from .recipe import METHODS, MergeConfig, ModelEntry, RecipeError

if TYPE_CHECKING:
    from ..kinship.measure import KinshipMatrix


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB', '500M', '1.5G' or a byte count."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r} (examples: 2GB, 500MB)")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match[2].upper()]
    return int(float(match[1]) * scale)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    target = out.resolve()
    for path in inputs:
        model = path.resolve()
        if target == model or (model.is_dir() and model in target.parents):
            raise RecipeError(f"{out}: the output must not be (inside) an input model {model}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RecipeError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


def publish(staging: Path, out: Path) -> None:
    """Renames the finished staging directory into place; an old OUT is removed only after."""
    if out.exists():
        old = set_aside_path(out)
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            # Failed or interrupted (a signal) between the renames: the old OUT goes back.
            if not out.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def output_config(base_config: dict[str, Any], out_dtype: str) -> dict[str, Any]:
    """The config.json of a merge: the base's, with both dtype keys agreeing with the tensors
    (transformers 5 reads `dtype`, older versions `torch_dtype`)."""
    name = TORCH_NAMES[out_dtype]
    return {**base_config, "dtype": name, "torch_dtype": name}


def write_metadata(
    staging: Path,
    config: MergeConfig,
    paths: dict[str, Path],
    base_ref: str | None,
    inputs: list[ModelEntry],
    out_dtype: str,
    base_config: dict[str, Any] | None,
    options: dict[str, Any],
    kinship: KinshipMatrix | None,
    parents: tuple[str, ...],
    *,
    written_config: dict[str, Any] | None = None,
    tokenizer_from: Path | None = None,
    provenance_extra: dict[str, Any] | None = None,
) -> None:
    """Everything beside the tensors. ``written_config`` replaces the base's config (dtype keys
    set), ``tokenizer_from`` the directory the tokenizer files come from (a VLM written as itself)."""
    if written_config is None and base_config is not None:
        written_config = output_config(base_config, out_dtype)
    if written_config is not None:
        (staging / "config.json").write_text(json.dumps(written_config, indent=2))
    if config.tokenizer is None:
        # No tokenizer request: the base's (else the first model's) files, as mergekit copies them.
        tokenizer_dir = tokenizer_from or model_dir(paths[base_ref or inputs[0].model])
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
        "kinship": kinship.to_dict()["metrics"] if kinship is not None else None,
        "ignored": list(config.ignored),
        "modelkin_version": __version__,
        **(provenance_extra or {}),
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
    kinship: KinshipMatrix | None,
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
                    v = float(kinship[metric][i, j])
                    cells.append("n/a" if math.isnan(v) else f"{v:.4f}")
                body.append(f"| `{a}` | `{parents[j]}` | " + " | ".join(cells) + " |")
        body.append("")
    body += ["## Configuration", "", "```yaml", config.text.rstrip(), "```", ""]
    return "\n".join(front + body)

"""A merge with a VLM among its models is written as that VLM: the merged language model under the
VLM's tensor names, the VLM's other tensors (vision tower, projector) as they are, its config with
the text config's layer count and dtype set from the merge, and its processor and tokenizer files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .._core import ModelHandle, compose_model, open_model
from ..io.dtypes import TORCH_NAMES
from ..io.resident import TOKENIZER_FILES
from ..io.towers import Vlm
from .architecture import COUNT_KEYS
from .planner import MergePlan

# What a VLM's processor is made of besides its tokenizer files.
_PROCESSOR_FILES = re.compile(
    r"^(preprocessor_config\.json|processor_config\.json|chat_template.*|video_preprocessor.*)$"
)


def as_vlm(planned: MergePlan, merged: ModelHandle, label: str) -> ModelHandle:
    """The merged language model (text names) with the VLM's other tensors, under the VLM's names."""
    vlm = planned.vlm
    assert vlm is not None
    language = [(vlm.to_vlm_name(name), name) for name in merged.names]
    others = [(name, name) for name in vlm.others]
    return compose_model([(merged, language), (open_model(vlm.path), others)], label)


def vlm_config(planned: MergePlan, text_config: dict[str, Any] | None) -> dict[str, Any]:
    """The VLM's config with its text config's layer count (a stacked merge) and dtype the merge's."""
    vlm = planned.vlm
    assert vlm is not None
    name = TORCH_NAMES[planned.config_dtype_name]
    text = dict(vlm.text_config)
    for key in COUNT_KEYS:
        if text_config is not None and key in text_config and key in text:
            text[key] = text_config[key]
    text.update({"dtype": name, "torch_dtype": name})
    return {**vlm.config, vlm.text_config_key: text, "dtype": name, "torch_dtype": name}


def write_vlm_files(planned: MergePlan, staging: Path, text_config: dict[str, Any] | None) -> None:
    """The VLM's config (text config updated), processor and tokenizer files, and what was mapped
    (modelkin.json and one line on stderr)."""
    vlm = planned.vlm
    assert vlm is not None
    config = vlm_config(planned, text_config)
    text = config[vlm.text_config_key]
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    for file in staging.iterdir():
        if file.is_file() and TOKENIZER_FILES.match(file.name):
            file.unlink()  # another model's tokenizer: the VLM's processor goes with its own
    for file in vlm.path.iterdir():
        if file.is_file() and (TOKENIZER_FILES.match(file.name) or _PROCESSOR_FILES.match(file.name)):
            (staging / file.name).write_bytes(file.read_bytes())
    mapped = _mapped(planned, vlm)
    provenance_file = staging / "modelkin.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    provenance["vlm"] = mapped
    provenance_file.write_text(json.dumps(provenance, indent=2, default=str))
    print(
        f"merged into the {vlm.architecture} VLM {vlm.path}: its language model merged under the"
        f" {text.get('model_type', 'text')} names, {len(vlm.others)} other tensors copied from it",
        file=sys.stderr,
    )


def _mapped(planned: MergePlan, vlm: Vlm) -> dict[str, Any]:
    return {
        "written_as": str(vlm.path),
        "architecture": vlm.architecture,
        "text_config": vlm.text_config_key,
        "language_models": {ref: str(v.path) for ref, v in planned.vlms.items()},
        "copied_tensors": len(vlm.others),
        "naming": {text: vlm.to_vlm_name(text) for text in ("model.", "lm_head.")},
    }

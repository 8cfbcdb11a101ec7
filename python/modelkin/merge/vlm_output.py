"""A merge with a VLM among its models is written as that VLM: the merged language model under the
VLM's tensor names, the VLM's other tensors (vision tower, projector) as they are, its config with
the text config's layer count and dtype set from the merge, and its processor and tokenizer files."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .._core import ModelHandle, compose_model, open_model
from ..io.dtypes import TORCH_NAMES
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
    vlm = planned.written_vlm
    assert vlm is not None
    name = TORCH_NAMES[planned.config_dtype_name]
    text = dict(vlm.text_config)
    for key in COUNT_KEYS:
        if text_config is not None and key in text_config and key in text:
            text[key] = text_config[key]
    text.update({"dtype": name, "torch_dtype": name})
    return {**vlm.config, vlm.text_config_key: text, "dtype": name, "torch_dtype": name}


def vlm_metadata(planned: MergePlan, text_config: dict[str, Any] | None) -> dict[str, Any]:
    """What :func:`..output.write_metadata` writes differently for a merge into a VLM: the VLM's
    config, its tokenizer files, and what was mapped; nothing for another merge."""
    vlm = planned.written_vlm
    if vlm is None:
        return {}
    return {
        "written_config": vlm_config(planned, text_config),
        "tokenizer_from": vlm.path,
        "provenance_extra": {"vlm": _mapped(planned, vlm)},
    }


def write_processor_files(planned: MergePlan, staging: Path) -> None:
    """The VLM's processor files beside its tokenizer's, and one line on stderr."""
    vlm = planned.written_vlm
    assert vlm is not None
    for file in vlm.path.iterdir():
        if file.is_file() and _PROCESSOR_FILES.match(file.name):
            (staging / file.name).write_bytes(file.read_bytes())
    if planned.whole_vlm is not None:
        modules = ", ".join(m.name for m in planned.config.modules or ())
        print(
            f"merged {len(planned.paths)} {vlm.architecture} VLMs whole, module by module ({modules}); config,"
            f" processor and tokenizer files from {vlm.path}",
            file=sys.stderr,
        )
        return
    text = vlm.text_config
    print(
        f"merged into the {vlm.architecture} VLM {vlm.path}: its language model merged under the"
        f" {text.get('model_type', 'text')} names, {len(vlm.others)} other tensors copied from it",
        file=sys.stderr,
    )


def _mapped(planned: MergePlan, vlm: Vlm) -> dict[str, Any]:
    if planned.whole_vlm is not None:
        return {
            "written_as": str(vlm.path),
            "architecture": vlm.architecture,
            "merged_whole": True,
            "modules": [m.name for m in planned.config.modules or ()],
        }
    return {
        "written_as": str(vlm.path),
        "architecture": vlm.architecture,
        "text_config": vlm.text_config_key,
        "language_models": {ref: str(v.path) for ref, v in planned.vlms.items()},
        "copied_tensors": len(vlm.others),
        "naming": {text: vlm.to_vlm_name(text) for text in ("model.", "lm_head.")},
    }

"""Vision-language models seen through their language model: for each supported architecture, a
table maps the language model's tensors to the text architecture's names (``model.layers.N.…``,
``model.embed_tokens``, ``model.norm``, ``lm_head``) and names the config key of the text config.
Declared, not guessed: a VLM of another architecture is refused by name, with the list.

The language model is then an ordinary model to kinship and merges (a view of the VLM's files under
the text names, nothing copied); the other tensors (vision tower, projector) stay the VLM's."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._core import ModelHandle, compose_model, open_model
from .errors import InvalidModelError
from .resident import ResidentModel


@dataclass(frozen=True)
class Tower:
    """One VLM architecture's language model: how its tensors are named, where its text config is."""

    # (VLM prefix, text prefix) pairs, one list per tensor naming the architecture has had.
    namings: tuple[tuple[tuple[str, str], ...], ...]
    text_config: str = "text_config"
    # (older prefix, transformers 5 prefix) of every tensor, as transformers converts checkpoints
    # saved in the older naming (its checkpoint conversion mapping): mergekit names modules by the
    # transformers 5 names whatever the files use.
    renamed: tuple[tuple[str, str], ...] = ()


# transformers 5 names LLaVA's language model `model.language_model.…` with `lm_head` on top; older
# versions `language_model.model.…` and `language_model.lm_head`. LLaVA-NeXT is named the same.
_LLAVA_NAMINGS = (
    (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
)
_LLAVA_RENAMED = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
TOWERS: dict[str, Tower] = {
    "llava": Tower(_LLAVA_NAMINGS, renamed=_LLAVA_RENAMED),
    "llava_next": Tower(_LLAVA_NAMINGS, renamed=_LLAVA_RENAMED),
}


@dataclass(frozen=True)
class Vlm:
    """A VLM on disk and its language model's tensors under the text names."""

    path: Path
    architecture: str
    config: dict[str, Any]
    # text name -> the VLM's name, in the VLM's storage order
    language: dict[str, str]
    # the VLM's other tensors (vision tower, projector, ...)
    others: tuple[str, ...]
    # (VLM prefix, text prefix) pairs of the naming its files use
    naming: tuple[tuple[str, str], ...]

    @property
    def text_config_key(self) -> str:
        return TOWERS[self.architecture].text_config

    @property
    def text_config(self) -> dict[str, Any]:
        found: dict[str, Any] = self.config.get(self.text_config_key) or {}
        return found

    def to_vlm_name(self, text_name: str) -> str:
        """The VLM's name of a language tensor (a stacked merge's new layers follow the naming)."""
        for prefix_vlm, prefix_text in self.naming:
            if text_name.startswith(prefix_text):
                return prefix_vlm + text_name[len(prefix_text) :]
        raise InvalidModelError(f"{self.path}: no VLM name for {text_name}")

    def current_name(self, name: str) -> str:
        """A tensor's name in transformers 5's naming (the name itself in files that use it)."""
        for old, new in TOWERS[self.architecture].renamed:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def language_model(self, label: str | None = None) -> ModelHandle:
        """The language model as a model of the text architecture (a view: nothing is copied)."""
        handle = open_model(self.path)
        return compose_model([(handle, list(self.language.items()))], label or f"{self.path} (language model)")


def _config(path: Path) -> dict[str, Any] | None:
    folder = path if path.is_dir() else path.parent
    try:
        loaded: dict[str, Any] = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return loaded


Naming = tuple[tuple[str, str], ...]


def _language(names: list[str], architecture: str) -> tuple[dict[str, str], Naming] | None:
    """text name -> the VLM's name of every language tensor, under the naming ``names`` use, and
    that naming."""
    for naming in TOWERS[architecture].namings:
        language: dict[str, str] = {}
        for name in names:
            for prefix_vlm, prefix_text in naming:
                if name.startswith(prefix_vlm):
                    language[prefix_text + name[len(prefix_vlm) :]] = name
                    break
        if any(text.startswith("model.layers.") for text in language):
            return language, naming
    return None


def _architecture(config: dict[str, Any] | None, where: object) -> str | None:
    """The VLM architecture a config describes, None for a model that is not a VLM."""
    if config is None or not isinstance(config.get("vision_config"), dict):
        return None
    architecture = str(config.get("model_type"))
    if architecture not in TOWERS:
        raise InvalidModelError(
            f"{where}: model_type {architecture} is a vision-language model modelkin has no tower table for"
            f" (supported: {', '.join(TOWERS)})"
        )
    return architecture


def read_vlm(path: str | os.PathLike[str]) -> Vlm | None:
    """The VLM at ``path`` (its language model's names mapped), None for a model that is not one; a
    VLM of an architecture with no table is refused by name."""
    folder = Path(path)
    config = _config(folder)
    architecture = _architecture(config, folder)
    if architecture is None or config is None:
        return None
    names = [name for name, _, _ in open_model(folder).tensors()]
    found = _language(names, architecture)
    if found is None:
        raise InvalidModelError(f"{folder}: a {architecture} model with no language tensors under its known names")
    language, naming = found
    taken = set(language.values())
    return Vlm(folder, architecture, config, language, tuple(n for n in names if n not in taken), naming)


class LanguageModel(ResidentModel):
    """A VLM's language model held by the engine under the text architecture's names (a view of
    the VLM's tensors, nothing copied), with the text config: what a text evaluator reads."""

    def __init__(self, vlm: ResidentModel, text_config: dict[str, Any], language: dict[str, str]) -> None:
        super().__init__(compose_model([(vlm.handle, list(language.items()))], f"{vlm.label} (language model)"))
        self._label = f"{vlm.label} (language model)"
        self._config = text_config

    @property
    def label(self) -> str:
        return self._label

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config


def language_model(model: ResidentModel) -> ResidentModel:
    """``model`` itself, or its language model when it is a VLM (in memory or on disk)."""
    config = model.config
    architecture = _architecture(config, model.label)
    if architecture is None or config is None:
        return model
    found = _language(list(model.tensor_names), architecture)
    if found is None:
        raise InvalidModelError(f"{model.label}: a {architecture} model with no language model tensors")
    return LanguageModel(model, dict(config.get(TOWERS[architecture].text_config) or {}), found[0])

"""Turns a model reference (directory, file, or Hugging Face repo id) into a local path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelReferenceError

# org/name or org/name@revision, as the Hub spells repo ids.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<revision>[\w.\-/]+))?$")
_PATTERNS = ["*.safetensors", "*.json"]


def resolve(reference: str | os.PathLike[str], *, offline: bool = False) -> Path:
    """The local directory or file a reference names; Hub ids are fetched into (or read from) the
    Hugging Face cache. ``offline`` (or ``HF_HUB_OFFLINE=1``) never touches the network."""
    path = Path(reference).expanduser()
    if path.exists():
        return path
    text = os.fspath(reference)
    match = _REPO_ID.match(text)
    if match is None or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{text}: no such file or directory")
    return _from_hub(match["repo"], match["revision"], offline or _env_offline())


def _hub_cache() -> str:
    """The Hugging Face cache as the environment names it now (huggingface_hub's own default is
    frozen when it is imported, so a later change of HF_HUB_CACHE or HF_HOME would be missed)."""
    named = os.environ.get("HF_HUB_CACHE")
    if named:
        return named
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_hub(repo: str, revision: str | None, offline: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ModelReferenceError(f"{repo}: huggingface_hub is needed to resolve Hub ids") from error
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=_PATTERNS,
            local_files_only=offline,
            # Read at call time: huggingface_hub freezes its own default at import.
            cache_dir=_hub_cache(),
        )
    except Exception as error:  # huggingface_hub raises many unrelated types; all mean "not here"
        where = "in the local Hugging Face cache" if offline else "on the Hugging Face Hub"
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelReferenceError(f"{repo}: cannot resolve {where}: {detail}") from error
    return Path(folder)

"""Checks of a config's keys and values, each failure a one-line RecipeError naming the key and the
line it was written on (the same wording for every section)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..merge.recipe import RecipeError, _Lines
from ..merge.sources import key_path


class Checker:
    """Fails naming a key by its path and source line (``source`` is the file, or \"config\")."""

    def __init__(self, source: str, text: str | None) -> None:
        self.source = source
        self.lines = _Lines(text)

    def fail(self, path: Sequence[str | int], message: str) -> RecipeError:
        return RecipeError(f"{self.source}: {key_path(path)}{self.lines.line(path)}: {message}")

    def keys(self, path: list[str | int], value: Any, known: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, "must be a mapping")
        for key in value:
            if key not in known:
                raise self.fail([*path, key], f"unknown key (known: {', '.join(known)})")
        return value

    def integer(self, path: list[str | int], value: Any, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(path, f"must be an integer >= {low}")
        return value

    def choice(self, path: list[str | int], value: Any, options: Sequence[str]) -> Any:
        if value not in options:
            raise self.fail(path, f"{value!r} is not one of {', '.join(options)}")
        return value

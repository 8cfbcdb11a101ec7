"""Fixtures that build small safetensors model families (see modelkin.testing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from modelkin.testing import Family, make_family


@pytest.fixture
def family_factory(tmp_path: Path) -> Callable[..., Family]:
    counter = iter(range(1000))

    def build(**kwargs: object) -> Family:
        return make_family(tmp_path / f"family{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return build

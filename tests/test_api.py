"""The Python API: typed results, the exception hierarchy, progress and cancellation."""

from __future__ import annotations

import math

import pytest

import modelkin


def test_exception_hierarchy():
    for cls in (
        modelkin.InvalidModelError,
        modelkin.UnsupportedFormatError,
        modelkin.MissingTensorError,
        modelkin.ShapeMismatchError,
        modelkin.DtypeError,
        modelkin.NonFiniteError,
        modelkin.ModelReferenceError,
    ):
        assert issubclass(cls, modelkin.ModelkinError)
    assert issubclass(modelkin.ModelkinError, Exception)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        modelkin.kinship(tmp_path / "nope", tmp_path / "nope2", base=tmp_path / "base")


def test_progress_reports_bytes(family_factory):
    fam = family_factory()
    calls: list[tuple[int, int]] = []
    modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, progress=lambda d, t: calls.append((d, t)))
    assert calls, "the callback is called at least once"
    done, total = calls[-1]
    assert total > 0 and 0 <= done <= total


def test_an_exception_in_the_progress_callback_cancels_the_pass(family_factory):
    fam = family_factory(n=3)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        modelkin.kinship_matrix(fam.models, base=fam.base, progress=interrupt)
    # the extension is usable afterwards
    assert modelkin.kinship(fam.models[0], fam.models[1], base=fam.base).n > 0


def test_result_objects(family_factory):
    fam = family_factory(n=3)
    r = modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, metrics="pcc")
    assert list(r.metrics) == ["pcc"]
    assert r.to_dict()["metrics"]["pcc"] == r.pcc
    with pytest.raises(KeyError):
        _ = r.cs
    m = modelkin.kinship_matrix(fam.models, base=fam.base, metric=["ed", "pcc"])
    assert m.matrix is m["ed"]
    assert m.matrix.shape == (3, 3) and m.names == tuple(str(p) for p in fam.models)
    assert all(not math.isnan(v) for row in m.to_dict()["metrics"]["pcc"] for v in row)
    with pytest.raises(ValueError, match="unknown metric"):
        modelkin.kinship(fam.models[0], fam.models[1], base=fam.base, metrics="xyz")

"""Bad input: one line naming the file (and tensor), exit code 2, no traceback, inputs untouched."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import modelkin
from modelkin.io.safetensors import save_file
from modelkin.testing import run_cli, tree_digest


def assert_clean_failure(args: list[str], *needles: str, root: Path | None = None) -> str:
    before = tree_digest(root) if root else None
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if root is not None:
        assert tree_digest(root) == before
    return lines[0]


@pytest.fixture
def fam(family_factory):
    return family_factory(dtype="BF16", shards=2)


def kin(fam, a: Path | None = None, b: Path | None = None, base: Path | None = None) -> list[str]:
    return ["kinship", str(a or fam.models[0]), str(b or fam.models[1]), "--base", str(base or fam.base)]


def test_missing_path(fam):
    assert_clean_failure(kin(fam, a=fam.root / "nope"), "nope", "no such file")


def test_empty_directory(fam):
    (fam.root / "empty").mkdir()
    assert_clean_failure(kin(fam, a=fam.root / "empty"), "empty", "no .safetensors", root=fam.root)


def test_pickle_only_directory_is_refused_with_conversion_hint(fam):
    pickled = fam.root / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    line = assert_clean_failure(kin(fam, a=pickled), "pickled", "pickle", root=fam.root)
    assert "safe_serialization=True" in line


def corrupt_copy(fam, mutate) -> Path:
    target = fam.root / "corrupt"
    shutil.copytree(fam.models[0], target)
    shard = sorted(target.glob("*.safetensors"))[0]
    mutate(shard)
    return shard


def test_truncated_shard(fam):
    shard = corrupt_copy(fam, lambda p: p.write_bytes(p.read_bytes()[:-10]))
    assert_clean_failure(kin(fam, a=shard.parent), shard.name, "truncated", root=fam.root)


def test_header_length_past_end_of_file(fam):
    def mutate(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[:8] = struct.pack("<Q", len(data) * 4)
        p.write_bytes(bytes(data))

    shard = corrupt_copy(fam, mutate)
    assert_clean_failure(kin(fam, a=shard.parent), shard.name, "past the end", root=fam.root)


def test_malformed_header_json(fam):
    def mutate(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[8] = ord("[")
        p.write_bytes(bytes(data))

    shard = corrupt_copy(fam, mutate)
    assert_clean_failure(kin(fam, a=shard.parent), shard.name, "malformed header JSON", root=fam.root)


def write_raw(path: Path, header: dict, payload: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def test_overlapping_offsets(tmp_path):
    write_raw(
        tmp_path / "bad.safetensors",
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    )
    save_file(tmp_path / "base.safetensors", {"a": np.zeros(2), "b": np.zeros(2)}, "F32")
    save_file(tmp_path / "other.safetensors", {"a": np.ones(2), "b": np.ones(2)}, "F32")
    args = files_kinship(tmp_path, "bad", "other")
    assert_clean_failure(args, "bad.safetensors", "offsets", root=tmp_path)


def test_offsets_out_of_bounds(tmp_path):
    write_raw(tmp_path / "bad.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
    save_file(tmp_path / "base.safetensors", {"a": np.zeros(4)}, "F32")
    save_file(tmp_path / "other.safetensors", {"a": np.ones(4)}, "F32")
    args = files_kinship(tmp_path, "bad", "other")
    assert_clean_failure(args, "bad.safetensors", root=tmp_path)


def test_index_naming_a_missing_shard(fam):
    shard = corrupt_copy(fam, lambda p: p.unlink())
    assert_clean_failure(kin(fam, a=shard.parent), "index.json", shard.name, "does not exist", root=fam.root)


def files_kinship(root: Path, a: str, b: str, base: str = "base") -> list[str]:
    """CLI arguments of `kinship` over single .safetensors files in ``root``."""
    return [
        "kinship",
        str(root / f"{a}.safetensors"),
        str(root / f"{b}.safetensors"),
        "--base",
        str(root / f"{base}.safetensors"),
    ]


def api_kinship(root: Path, a: str, b: str) -> None:
    modelkin.kinship(root / f"{a}.safetensors", root / f"{b}.safetensors", base=root / "base.safetensors")


def test_tensor_missing_from_a_model(tmp_path):
    save_file(tmp_path / "base.safetensors", {"a": np.zeros(4), "b": np.zeros(4)}, "F32")
    save_file(tmp_path / "ft1.safetensors", {"a": np.ones(4), "b": np.ones(4)}, "F32")
    save_file(tmp_path / "ft2.safetensors", {"a": np.ones(4)}, "F32")
    args = files_kinship(tmp_path, "ft1", "ft2")
    assert_clean_failure(args, "ft2.safetensors", "'b'", "missing", root=tmp_path)
    with pytest.raises(modelkin.MissingTensorError):
        api_kinship(tmp_path, "ft1", "ft2")


def test_shape_mismatch(tmp_path):
    save_file(tmp_path / "base.safetensors", {"w": np.zeros((4, 4))}, "F32")
    save_file(tmp_path / "ft1.safetensors", {"w": np.ones((4, 4))}, "F32")
    save_file(tmp_path / "ft2.safetensors", {"w": np.ones((4, 5))}, "F32")
    args = files_kinship(tmp_path, "ft1", "ft2")
    assert_clean_failure(args, "ft2.safetensors", "'w'", "shape", root=tmp_path)
    with pytest.raises(modelkin.ShapeMismatchError):
        api_kinship(tmp_path, "ft1", "ft2")


def test_unsupported_dtype(tmp_path):
    write_raw(tmp_path / "ints.safetensors", {"w": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    save_file(tmp_path / "base.safetensors", {"w": np.zeros(2)}, "F32")
    save_file(tmp_path / "ft.safetensors", {"w": np.ones(2)}, "F32")
    args = files_kinship(tmp_path, "ints", "ft")
    assert_clean_failure(args, "ints.safetensors", "'w'", "I32", root=tmp_path)
    with pytest.raises(modelkin.DtypeError):
        api_kinship(tmp_path, "ints", "ft")


def nonfinite_family(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    base = {"good": rng.normal(size=(8, 8)), "bad": rng.normal(size=(8, 8))}
    ft1 = {k: v + rng.normal(0, 0.1, v.shape) for k, v in base.items()}
    ft2 = {k: v + rng.normal(0, 0.1, v.shape) for k, v in base.items()}
    ft2["bad"][3, 3] = np.nan
    for name, tensors in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        save_file(tmp_path / f"{name}.safetensors", tensors, "BF16")
    return [
        str(tmp_path / "ft1.safetensors"),
        str(tmp_path / "ft2.safetensors"),
        "--base",
        str(tmp_path / "base.safetensors"),
    ]


def test_nan_in_weights_names_the_tensor_and_can_be_skipped(tmp_path):
    models = nonfinite_family(tmp_path)
    assert_clean_failure(["kinship", *models], "ft2.safetensors", "'bad'", "NaN", root=tmp_path)
    proc = run_cli("kinship", *models, "--skip-nonfinite", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["tensors"] == 1 and data["n"] == 64
    assert "skipped tensor 'bad'" in proc.stderr


def test_nan_with_low_precision_is_reported_too(tmp_path):
    models = nonfinite_family(tmp_path)
    assert_clean_failure(["kinship", *models, "--low-precision"], "ft2.safetensors", "'bad'")


def test_same_path_twice(fam):
    assert_clean_failure(kin(fam, a=fam.models[0], b=fam.models[0]), "given twice", root=fam.root)
    # also when spelled differently
    other_spelling = fam.models[0] / ".." / fam.models[0].name
    assert_clean_failure(kin(fam, a=fam.models[0], b=other_spelling), "given twice", root=fam.root)


def test_unknown_metric_is_a_usage_error(fam):
    proc = run_cli(*kin(fam), "--metric", "xyz")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parameters": {"densty": 0.5}}, "ties has no parameter 'densty'"),
        ({"model_params": {"weight": 1.0, "scale": 0.0}}, "ties has no parameter 'scale'"),
        ({"chat_template": 5}, "chat_template must be a name"),
        ({"model_key": {"layer_range": [0, 1]}}, "unknown key"),
    ],
)
def test_recipe_keys_are_used_or_refused(tmp_path, change, message):
    """Nothing in a recipe is silently ignored: a misspelt or unsupported key is refused by name."""
    from modelkin.merge.recipe import RecipeError, load_config

    recipe: dict = {
        "merge_method": "ties",
        "base_model": "z",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 1.0}},
        ],
    }
    if "parameters" in change:
        recipe["parameters"] = change["parameters"]
    if "model_params" in change:
        recipe["models"][0]["parameters"] = change["model_params"]
    if "model_key" in change:
        recipe["models"][0].update(change["model_key"])
    if "chat_template" in change:
        recipe["chat_template"] = change["chat_template"]
    with pytest.raises(RecipeError) as error:
        load_config(recipe)
    assert message in str(error.value)


def test_slice_level_keys_and_unsupported_options_are_refused():
    from modelkin.merge.recipe import RecipeError, load_config

    with pytest.raises(RecipeError, match=r"slices\[0\]\.bogus.*unknown key"):
        load_config(
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}], "bogus": "a"}],
            }
        )
    with pytest.raises(RecipeError, match="b is not among the slice's sources"):
        load_config(
            {
                "merge_method": "task_arithmetic",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}], "base_model": "b"}],
            }
        )

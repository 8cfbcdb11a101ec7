"""Start-up: `import modelkin`, `import modelkin.cli` and the light commands load only what they use.

What a fresh interpreter has in sys.modules after each, never how long it took (the timings are
benches/bench_startup.py's): rich, typer's rich help, YAML, the evolve layer and the merge planner
(and for the imports and `kinship`, numpy) are loaded by the commands that need them, on use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import modelkin

# Loaded by none of the imports below (a name covers its submodules).
HEAVY = ("rich", "typer.rich_utils", "yaml", "pydantic", "modelkin.evolve", "modelkin.merge.planner")


def loaded_modules(tmp_path: Path, code: str, *args: str) -> set[str]:
    """The modules a fresh interpreter holds when it exits after running ``code`` with ``args``."""
    report = tmp_path / "modules.json"
    at_exit = (
        "import atexit, json, sys; "
        f"atexit.register(lambda: open({str(report)!r}, 'w').write(json.dumps(sorted(sys.modules)))); "
    )
    done = subprocess.run(
        [sys.executable, "-c", at_exit + code, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert report.exists(), done.stdout + done.stderr
    return set(json.loads(report.read_text()))


def among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("module", ["modelkin", "modelkin.cli"])
def test_imports_load_nothing_heavy(tmp_path, module):
    modules = loaded_modules(tmp_path, f"import {module}")
    assert module in modules
    assert among(modules, (*HEAVY, "numpy")) == []


def test_import_modelkin_loads_no_command_line(tmp_path):
    assert among(loaded_modules(tmp_path, "import modelkin"), ("typer", "modelkin.cli")) == []


def test_help_loads_no_command_it_lists(tmp_path):
    modules = loaded_modules(tmp_path, "import modelkin.cli as m; m.main()", "--help")
    assert "typer.rich_utils" in modules  # the help itself is typer's rich help
    assert among(modules, ("numpy", "yaml", "pydantic", "modelkin.evolve", "modelkin.kinship.measure")) == []
    # The merge layer's package itself is loaded (empty, so that `modelkin.merge` stays the function).
    assert [m for m in modules if m.startswith("modelkin.merge.")] == []


def test_kinship_command_loads_no_merge_evolve_or_numpy(tmp_path):
    from modelkin.example import write_example_family

    family = write_example_family(tmp_path / "family")
    args = ["kinship", str(family["math-a"]), str(family["math-b"]), "--base", str(family["base"]), "--json"]
    modules = loaded_modules(tmp_path, "import modelkin.cli as m; m.main()", *args)
    assert "modelkin.kinship.measure" in modules
    # rich is left out: a pass that ran past a second (a loaded machine) draws its bar with it.
    assert among(modules, ("typer.rich_utils", "yaml", "modelkin.evolve", "modelkin.merge.planner")) == []
    # A pair's kinship comes back as floats: numpy (and the adapter path that needs it) load on use.
    assert among(modules, ("numpy", "modelkin.kinship.lora", "modelkin.io.safetensors")) == []


def test_every_public_name_resolves_lazily():
    for name in modelkin.__all__:
        assert getattr(modelkin, name) is not None, name
    assert set(modelkin.__all__) <= set(dir(modelkin))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        modelkin.no_such_name  # noqa: B018


def test_kinship_and_merge_stay_the_functions_after_their_packages_load(tmp_path):
    code = (
        "import importlib, modelkin; "
        "importlib.import_module('modelkin.kinship.measure'); importlib.import_module('modelkin.merge.merging'); "
        "from modelkin.kinship.measure import kinship; from modelkin.merge.merging import merge; "
        "assert modelkin.kinship is kinship and modelkin.merge is merge, (modelkin.kinship, modelkin.merge); "
        "from modelkin import kinship as k, merge as g; assert k is kinship and g is merge; "
        "assert callable(modelkin.evolve) and modelkin.evolve.__name__ == 'modelkin.evolve'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

"""The architecture stays true: io <- kinship <- merge <- evolve <- the CLI, in both languages.

A module imports from its own layer and the layers below it, never above, and no two modules import
each other, directly or round a longer circle. Every import counts: a lazy import inside a function
and one under ``TYPE_CHECKING`` are dependencies all the same (they only hide the circle from the
interpreter). These tests read the sources; they import nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "modelkin"
CORE = ROOT / "rust" / "modelkin-core" / "src"
BINDING = ROOT / "rust" / "modelkin-py" / "src"

LAYERS = ("io", "kinship", "merge", "evolve")
TOP = len(LAYERS)  # the CLI and the package's front door


# ---------------------------------------------------------------- graph helpers


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph, as the list of its nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def upward(graph: dict[str, set[str]], layer_of: dict[str, int]) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if layer_of[dst] > layer_of[src])


# ---------------------------------------------------------------- Python


def python_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def python_layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return TOP


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> Iterable[str]:
    """The project modules `module` imports anywhere in its file (function bodies included)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _resolve(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in known or candidate == "modelkin._core":
                    yield candidate
                else:
                    yield from _resolve(base, known)
        elif isinstance(node, ast.Call) and _is_import_module(node):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("modelkin"):
                yield from _resolve(arg.value, known)


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _resolve(name: str, known: dict[str, Path]) -> Iterable[str]:
    if name.startswith("modelkin._core"):
        yield "modelkin._core"
        return
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            yield candidate
            return
        parts.pop()


def python_graph() -> tuple[dict[str, set[str]], dict[str, int]]:
    known = python_modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = set(imported_modules(module, path, known))
        # The compiled extension is the Rust crate, layered on its own; the package's own
        # `__init__` runs before any of its modules, but depending on it is a choice a module makes.
        targets.discard(module)
        targets.discard("modelkin._core")
        graph[module] = targets
    return graph, {module: python_layer(module) for module in known}


def test_python_layers_are_folders() -> None:
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file(), f"python/modelkin/{layer}/ is a layer"
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "import" in doc, f"python/modelkin/{layer}/__init__.py says what it may import"


def test_python_imports_point_down() -> None:
    graph, layer_of = python_graph()
    assert upward(graph, layer_of) == []


def test_python_imports_have_no_circle() -> None:
    graph, _ = python_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_python_layer_packages_do_not_reexport() -> None:
    # A layer's `__init__` that imported its modules would make every `from modelkin.merge.x import`
    # load the whole layer (and close a circle with any module that imported the package).
    graph, _ = python_graph()
    for layer in LAYERS:
        module = f"modelkin.{layer}"
        if layer == "evolve":
            continue  # `modelkin.evolve` is itself the callable public API (modelkin.evolve(cfg, dir))
        assert graph[module] == set(), f"{module} imports {sorted(graph[module])}"


# ---------------------------------------------------------------- Rust

# A path in code; one that opens a `{` group is read by the `use` parser instead.
PATH = re.compile(r"\b(crate|super)((?:::\w+)+)(?!::|\w)")


def rust_files(src: Path) -> dict[str, Path]:
    """Module path (e.g. ``merge::engine::job``) of every source file that is not a test module."""
    files: dict[str, Path] = {}
    for path in src.rglob("*.rs"):
        if path.name == "tests.rs":
            continue
        rel = path.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] in ("mod", "lib"):
            parts.pop()
        files["::".join(parts)] = path
    return files


def _strip(text: str) -> str:
    """Drops comments, string literals and the trailing unit-test module."""
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod \w+\s*\{", text, re.M)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def _expand(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` as `a::b`, `a::c::d`, `a::c::e`."""
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        return [tree]
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rindex("}")]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return [path for item in items if item for path in _expand(prefix + item)]


def _inline_modules(text: str) -> list[tuple[int, int]]:
    """Spans of `mod name { ... }` blocks: inside one, `super` is the file itself."""
    spans = []
    for match in re.finditer(r"\bmod\s+\w+\s*\{", text):
        depth, end = 0, len(text)
        for i in range(match.end() - 1, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
        spans.append((match.start(), end))
    return spans


def rust_references(module: str, path: Path) -> set[str]:
    """Absolute module paths (`a::b::Item`) the file names through `crate::`, `super::`, `self::`
    or one of its own child modules."""
    text = _strip(path.read_text(encoding="utf-8"))
    children = set(re.findall(r"^\s*(?:pub(?:\([\w:]+\))?\s+)?mod\s+(\w+)\s*;", text, re.M))
    raw: list[tuple[int, str]] = []
    for match in re.finditer(r"\buse\s+([\w:{}\s,*]+?)\s*;", text, re.S):
        for item in _expand(match.group(1)):
            head = item.split("::")[0]
            if head in children:
                item = "self::" + item
            raw.append((match.start(), item))
    raw.extend((m.start(), m.group(1) + m.group(2)) for m in PATH.finditer(text))
    spans = _inline_modules(text)
    own = module.split("::") if module else []
    refs = set()
    for position, ref in raw:
        parts = ref.split("::")
        if parts[0] == "crate":
            absolute = parts[1:]
        elif parts[0] == "self":
            absolute = own + parts[1:]
        elif parts[0] == "super":
            # `super` is the parent module whether the file is `x.rs` or `x/mod.rs`, and each further
            # `super` one more up; inside an inline `mod x { }` the first `super` is the file itself.
            ups = 0
            while parts and parts[0] == "super":
                parts, ups = parts[1:], ups + 1
            ups -= sum(start <= position <= end for start, end in spans)
            if ups <= 0:
                continue
            absolute = own[: len(own) - ups] + parts
        else:
            continue
        refs.add("::".join(absolute))
    return refs


def _owner(ref: str, files: dict[str, Path]) -> str | None:
    parts = ref.split("::")
    while parts:
        candidate = "::".join(parts)
        if candidate in files:
            return candidate
        parts.pop()
    return "" if "" in files else None


def rust_graph(src: Path) -> dict[str, set[str]]:
    files = rust_files(src)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for ref in rust_references(module, path):
            owner = _owner(ref, files)
            if owner is not None and owner != module:
                targets.add(owner)
        graph[module] = targets
    return graph


def core_layer(module: str) -> int:
    head = module.split("::")[0]
    return LAYERS.index(head) if head in LAYERS else TOP


def test_rust_core_layers_are_folders() -> None:
    for layer in ("io", "kinship", "merge"):
        mod = CORE / layer / "mod.rs"
        assert mod.is_file(), f"rust/modelkin-core/src/{layer}/ is a layer"
        head = mod.read_text().lstrip()
        assert head.startswith("//!") and "import" in head.split("\n\n")[0], f"{mod} opens with what it may import"
    for sub in ("engine", "methods", "torch"):
        assert (CORE / "merge" / sub / "mod.rs").is_file(), f"merge/{sub} is a folder"
    # Nothing evolution-specific in the Rust core.
    assert not (CORE / "evolve").exists()
    loose = sorted(p.name for p in CORE.glob("*.rs") if p.name != "lib.rs")
    assert loose == [], f"every core file lives in a layer folder: {loose}"


def test_rust_core_uses_point_down() -> None:
    graph = rust_graph(CORE)
    layer_of = {module: core_layer(module) for module in graph}
    layer_of[""] = TOP  # lib.rs re-exports for the crate's users
    assert upward(graph, layer_of) == []


def test_rust_core_has_no_circle() -> None:
    graph = rust_graph(CORE)
    graph.pop("", None)  # lib.rs only declares and re-exports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


BINDING_LAYERS = {"errors": 0, "progress": 0, "model": 0, "adapter": 0, "kinship": 1, "merge": 2, "methods": 2, "": TOP}


def test_rust_binding_layers() -> None:
    graph = rust_graph(BINDING)
    unknown = sorted(set(graph) - set(BINDING_LAYERS))
    assert unknown == [], f"assign a layer to binding modules {unknown} in this test"
    assert upward(graph, BINDING_LAYERS) == []
    graph.pop("", None)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# ---------------------------------------------------------------- the checker itself


def test_checker_sees_circles_and_upward_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert upward({"x": {"y"}}, {"x": 0, "y": 1}) == ["x -> y"]
    assert _expand("crate::io::{model::Model, dtype::{Dtype, decode}}") == [
        "crate::io::model::Model",
        "crate::io::dtype::Dtype",
        "crate::io::dtype::decode",
    ]


def test_checker_reads_grouped_uses_once() -> None:
    # A group names its members, not the module it opens (which may be a re-exporting mod.rs).
    text = "use crate::merge::torch::{radix, topk}; x = crate::merge::torch::topk::f(1);"
    assert PATH.findall(text) == [("crate", "::merge::torch::topk::f")]


def test_checker_resolves_rust_paths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "merge" / "engine").mkdir(parents=True)
    (src / "lib.rs").write_text("pub mod merge;\n")
    (src / "merge" / "mod.rs").write_text("//! m\npub mod engine;\n")
    (src / "merge" / "engine" / "mod.rs").write_text("//! e\nmod job;\nmod run;\npub use run::go;\n")
    (src / "merge" / "engine" / "job.rs").write_text("use super::run::go;\n")
    (src / "merge" / "engine" / "run.rs").write_text(
        "use crate::merge::engine::job::Job;\n// use crate::merge::nothing;\n"
        "#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::x::y;\n}\n"
    )
    graph = rust_graph(src)
    assert graph["merge::engine::job"] == {"merge::engine::run"}
    assert graph["merge::engine::run"] == {"merge::engine::job"}
    assert graph["merge::engine"] == {"merge::engine::run"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"merge::engine::job", "merge::engine::run"}


def test_checker_resolves_python_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "modelkin"
    (pkg / "merge").mkdir(parents=True)
    (pkg / "merge" / "__init__.py").write_text("")
    (pkg / "merge" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "merge" / "b.py").write_text("from modelkin.merge import a\n")
    known = {
        "modelkin.merge": pkg / "merge" / "__init__.py",
        "modelkin.merge.a": pkg / "merge" / "a.py",
        "modelkin.merge.b": pkg / "merge" / "b.py",
    }
    assert set(imported_modules("modelkin.merge.a", known["modelkin.merge.a"], known)) == {"modelkin.merge.b"}
    assert set(imported_modules("modelkin.merge.b", known["modelkin.merge.b"], known)) == {"modelkin.merge.a"}

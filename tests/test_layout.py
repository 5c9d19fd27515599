"""The house stays laid out: the import rules between the package's layers
and the size of its rooms, read from the source (AST) so that imports under
`TYPE_CHECKING` and inside functions count too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastapi_bgtasks"

# The numbers the house keeps to. SQL and DDL text (module-level string
# constants, and lists or dicts of them) is exempt: it is data, not code.
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> Iterator[str]:
    """Every module `name` imports, absolute, wherever the import stands."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{a.name}" for a in node.names]
            found = [m for m in submodules if m in MODULES]
            # `from . import x` of a module x imports x (its package is
            # already loaded); a name from a module imports that module.
            if len(found) < len(submodules):
                yield module
            yield from found


def _internal(target: str) -> str | None:
    """The package module an import lands in (a name's own module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {
    name: sorted({m for t in _imports(name) if (m := _internal(t)) and m != name})
    for name in MODULES
}
EXTERNAL = {name: sorted({t.split(".")[0] for t in _imports(name)}) for name in MODULES}


def _in(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_no_module_of_the_package_imports_itself_in_a_circle() -> None:
    # The package __init__ re-exports the public names: imports of it from
    # inside are refused separately below, so it is left out of the walk.
    graph = {
        n: [m for m in deps if m != "fastapi_bgtasks"]
        for n, deps in GRAPH.items()
        if n != "fastapi_bgtasks"
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                circles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == []


def test_no_module_imports_the_package_root() -> None:
    offenders = [n for n, deps in GRAPH.items() if "fastapi_bgtasks" in deps and "." in n]
    # Parent packages are imported implicitly; only an explicit
    # `from fastapi_bgtasks import X` (or `from .. import X`) counts.
    explicit = [
        n
        for n in offenders
        if any(
            isinstance(node, ast.ImportFrom)
            and (node.module == "fastapi_bgtasks" or (node.level and node.module is None))
            and not all(f"fastapi_bgtasks.{a.name}" in MODULES for a in node.names)
            for node in ast.walk(ast.parse(MODULES[n].read_text()))
        )
    ]
    assert explicit == []


def _reaches(name: str, room: str) -> list[str]:
    return [dep for dep in GRAPH[name] if _in(dep, room)]


@pytest.mark.parametrize("forbidden", ["server", "store", "hub", "submit"])
def test_the_worker_and_its_client_never_import_the_app_side(forbidden: str) -> None:
    room = f"fastapi_bgtasks.{forbidden}"
    users = [
        n
        for n in MODULES
        if (_in(n, "fastapi_bgtasks.worker") or n == "fastapi_bgtasks.client") and _reaches(n, room)
    ]
    assert users == []


@pytest.mark.parametrize(
    ("library", "room"),
    [
        ("sqlalchemy", "fastapi_bgtasks.store"),
        ("asyncpg", "fastapi_bgtasks.store"),
        ("aiosqlite", "fastapi_bgtasks.store"),
        ("fastapi", "fastapi_bgtasks.server"),
        ("sse_starlette", "fastapi_bgtasks.server"),
        ("starlette", "fastapi_bgtasks.server"),
    ],
)
def test_only_one_room_imports_each_framework(library: str, room: str) -> None:
    importers = [n for n, libs in EXTERNAL.items() if library in libs and not _in(n, room)]
    assert importers == []


@pytest.mark.parametrize("name", ["fastapi_bgtasks.errors", "fastapi_bgtasks.states"])
def test_the_error_tree_and_the_lifecycle_import_nothing_from_the_package(name: str) -> None:
    assert GRAPH[name] == []


def test_the_server_knows_the_hub_only_through_its_context() -> None:
    users = [
        n
        for n in MODULES
        if _in(n, "fastapi_bgtasks.server") and _reaches(n, "fastapi_bgtasks.hub")
    ]
    assert users == []


def _code_lines(node: ast.AST) -> int:
    """Lines of a definition, less those of string constants inside it."""
    end = getattr(node, "end_lineno", 0) or 0
    start = getattr(node, "lineno", 0) or 0
    exempt = 0
    for child in ast.walk(node):
        if child is node:
            continue
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            exempt += max((child.end_lineno or child.lineno) - child.lineno - 1, 0)
    return end - start + 1 - exempt


def _module_lines(tree: ast.Module, source: str) -> int:
    total = len(source.splitlines())
    for node in tree.body:
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign | ast.AnnAssign) and value is not None and _is_text(value):
            total -= (node.end_lineno or node.lineno) - node.lineno + 1
    return total


def _is_text(value: ast.AST) -> bool:
    """A string, or a list/tuple/dict of them: SQL and DDL held as data."""
    if isinstance(value, ast.Constant):
        return isinstance(value.value, str)
    if isinstance(value, ast.JoinedStr):
        return True
    if isinstance(value, ast.List | ast.Tuple):
        return bool(value.elts) and all(_is_text(e) for e in value.elts)
    if isinstance(value, ast.Dict):
        return bool(value.values) and all(v is not None and _is_text(v) for v in value.values)
    return False


def _sizes() -> Iterator[tuple[str, str, int, int]]:
    for name, path in MODULES.items():
        source = path.read_text()
        tree = ast.parse(source)
        yield name, "module", _module_lines(tree, source), MAX_MODULE_LINES
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                yield f"{name}.{node.name}", "class", _code_lines(node), MAX_CLASS_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = _code_lines(node) - _docstring_lines(node)
                yield f"{name}.{node.name}", "function", size, MAX_FUNCTION_LINES


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def test_every_module_class_and_function_stays_small() -> None:
    too_big = [
        f"{kind} {name}: {size} lines (at most {limit})"
        for name, kind, size, limit in _sizes()
        if size > limit
    ]
    assert too_big == []

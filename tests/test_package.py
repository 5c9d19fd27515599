"""The package as shipped: its public names, what it never imports or calls,
what a worker process loads, the worker CLI and the typing marker."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastapi_bgtasks
from tests.harness.procs import ROOT

PACKAGE = Path(fastapi_bgtasks.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Modules that turn bytes into code or arbitrary objects (RELIABILITY.md S4).
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", "shelve"}
FORBIDDEN_CALLS = {"eval", "exec"}


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGTASKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"


def test_the_package_has_source_files_to_scan() -> None:
    names = {path.name for path in SOURCES}
    assert {"__init__.py", "tasks.py", "app.py", "__main__.py"} <= names


def test_all_is_sorted() -> None:
    assert list(fastapi_bgtasks.__all__) == sorted(fastapi_bgtasks.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(fastapi_bgtasks.__all__)) == len(fastapi_bgtasks.__all__)


def test_every_name_in_all_exists() -> None:
    missing = [name for name in fastapi_bgtasks.__all__ if not hasattr(fastapi_bgtasks, name)]
    assert missing == []


def test_all_exports_the_contracts_names() -> None:
    contract = {"BgTasks", "Submitter", "Task", "TaskRun", "TaskRunFailed", "RunState"}
    assert contract | {"BgTasksError"} <= set(fastapi_bgtasks.__all__)


def test_no_module_imports_a_code_loading_serializer() -> None:
    found = []
    for path in SOURCES:
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and (
                    (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                    or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                )
            ):
                names = [node.args[0].value]
            else:
                continue
            found += [
                f"{where(path, node)} {name}"
                for name in names
                if name.split(".")[0] in FORBIDDEN_MODULES
            ]
    assert found == []


def test_no_module_calls_eval_or_exec() -> None:
    found = []
    for path in SOURCES:
        for node in ast.walk(parsed(path)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{where(path, node)} {func.id}()")
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in FORBIDDEN_CALLS
                and isinstance(func.value, ast.Name)
                and func.value.id == "builtins"
            ):
                found.append(f"{where(path, node)} builtins.{func.attr}()")
    assert found == []


def test_a_worker_process_imports_no_sqlalchemy_and_no_fastapi() -> None:
    """A worker needs neither the database layer nor the web framework
    (about 30 MB of resident memory), as long as its task module builds no app."""
    script = (
        "import sys\n"
        "import fastapi_bgtasks.worker.__main__\n"
        "import example_app.tasks\n"
        "heavy = ('sqlalchemy', 'fastapi', 'starlette', 'sse_starlette')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importing_the_package_imports_no_sqlalchemy_and_no_fastapi() -> None:
    script = (
        "import sys\n"
        "import fastapi_bgtasks\n"
        "heavy = ('sqlalchemy', 'fastapi', 'starlette', 'sse_starlette')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth and under TYPE_CHECKING too,
    as absolute names (`fastapi_bgtasks.hub`, `sqlalchemy.ext`)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    if package[-1:] == ["__init__"]:
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_imports(path: Path) -> set[str]:
    return {name for name in imported_modules(path) if name.startswith("fastapi_bgtasks.")}


@pytest.mark.parametrize(
    "name", ["submit", "tasks", "taskrun", "dispatch", "codec", "schedule", "settings"]
)
def test_the_submission_modules_never_import_the_hub(name: str) -> None:
    imports = package_imports(PACKAGE / f"{name}.py")
    assert "fastapi_bgtasks.hub" not in imports


@pytest.mark.parametrize("name", ["errors", "states"])
def test_the_leaf_modules_import_nothing_from_the_package(name: str) -> None:
    assert package_imports(PACKAGE / f"{name}.py") == set()


def test_only_the_store_imports_sqlalchemy() -> None:
    found = [
        str(path.relative_to(PACKAGE))
        for path in SOURCES
        if any(name.split(".")[0] == "sqlalchemy" for name in imported_modules(path))
    ]
    assert found and all(name.startswith("store/") for name in found), found


def test_the_worker_cli_help_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastapi_bgtasks.worker", "--help"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--url" in done.stdout
    assert "--concurrency" in done.stdout


def test_the_worker_cli_without_a_url_exits_with_an_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastapi_bgtasks.worker", "example_app.tasks"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--url" in done.stderr


def test_the_package_ships_py_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_a_docstring(path: Path) -> None:
    assert ast.get_docstring(parsed(path)), f"{path.name} has no module docstring"

"""The tree shows the architecture: the front's import closure holds no model code, no module
imports its way into a cycle, and every module stays short enough to read in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "pipeserve"
FRONT_ROOTS = ("pipeserve.front.cli", "pipeserve.http")
MODEL_CODE = ("torch", "transformers", "pipeserve.model", "pipeserve.model_proc")
MAX_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every module this one imports, at the top or inside a function (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return found


def _closure(roots: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in MODULES:
            todo.extend(_imports(name))
    return seen


def _is_model_code(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in MODEL_CODE)


def test_the_fronts_import_closure_has_no_model_code_even_inside_functions() -> None:
    closure = _closure(FRONT_ROOTS)
    assert "pipeserve.ipc" in closure and "pipeserve.front.batcher" in closure
    assert sorted(name for name in closure if _is_model_code(name)) == []
    # ...and every module of the front package is reached from its roots.
    front = {name for name in MODULES if name.startswith("pipeserve.front")}
    assert front - closure == set()


def test_the_model_process_imports_nothing_of_the_front() -> None:
    closure = _closure(("pipeserve.model_proc",))
    assert "pipeserve.model.loading" in closure
    assert sorted(name for name in closure if name.startswith(("pipeserve.front", "pipeserve.http",
                                                                "aiohttp"))) == []


def test_importing_the_front_loads_no_model_code() -> None:
    script = ("import sys, pipeserve.front.cli, pipeserve.http; "
              "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            check=True).stdout.split()
    assert "pipeserve.front.runtime" in loaded
    assert [name for name in loaded if _is_model_code(name)] == []


def test_no_import_cycles_between_pipeserve_modules() -> None:
    graph = {name: {dep for dep in _imports(name) if dep in MODULES and dep != name} for name in MODULES}
    # A package's __init__ is not an edge: importing pipeserve.front.x runs pipeserve.front first.
    graph = {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, name, dep])}"
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_every_module_is_short_enough_to_read_in_one_sitting() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_documented_request_path_names_functions_that_exist() -> None:
    document = (REPO_ROOT / "ARCHITECTURE.md").read_text()
    path = document.split("## One request's path", 1)[1].split("```")[1]
    steps = [line for line in path.splitlines() if line.strip()]
    assert 0 < len(steps) <= 8
    named = 0
    for line in steps:
        for module, function in __import__("re").findall(r"([\w/]+)\.(\w+)(?=[:( ])", line):
            candidates = [path for name, path in MODULES.items() if name.replace(".", "/").endswith(module)]
            assert candidates, f"{module} is not a module"
            assert any(f"def {function}(" in path.read_text() for path in candidates), f"{module}.{function}"
            named += 1
    assert named >= 7

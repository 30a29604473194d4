"""The import graph of ringfeed's own modules: no cycles, and a client that never imports the server.

The graph is read from the source (every ``import`` statement, at module level or inside a
function: a deferred import still makes a cycle when it runs), with the folders mapped to the
import names that ``pyproject.toml`` installs them under.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
CLIENT, SERVER = "ringfeed", "ringfeed.server"
# The package's front door names the server's Config and Service for users; it imports them
# only when they are asked for (a module __getattr__), so the client's modules never do.
FACADE = ("ringfeed", "__getattr__")


def _modules() -> dict[str, Path]:
    """Every module of the distribution, by its import name."""
    modules = {}
    for package, folder in PACKAGE_DIR.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            modules[".".join([package, *parts]).removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module imported, enclosing function or None) for each import in module ``name``."""
    found = []
    base = name if _is_package(name) else name.rpartition(".")[0]

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                package = child.module or ""
                if child.level:
                    anchor = base.split(".")[: len(base.split(".")) - child.level + 1]
                    package = ".".join([*anchor, *([package] if package else [])])
                for alias in child.names:  # `from pkg import mod` imports a module when mod is one
                    sub = f"{package}.{alias.name}"
                    found.append((sub if sub in MODULES else package, function))
            visit(child, inner)

    visit(ast.parse(MODULES[name].read_text()), None)
    return [(target, function) for target, function in found if target in MODULES and target != name]


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_folders_are_installed_under_one_import_name():
    assert PACKAGE_DIR == {"ringfeed": "client", "ringfeed.server": "loader_server"}
    assert {"ringfeed", "ringfeed.feed", "ringfeed.protocol", "ringfeed.server", "ringfeed.server.broker",
            "ringfeed.server.augment.kernels"} <= set(MODULES)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for v in sorted(GRAPH):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_client_never_imports_the_server():
    client = [name for name in MODULES if not (name == SERVER or name.startswith(SERVER + "."))]
    offending = [(name, target, function) for name in client for target, function in GRAPH[name]
                 if (target == SERVER or target.startswith(SERVER + ".")) and (name, function) != FACADE]
    assert not offending, f"client modules that import the server: {offending}"


def test_every_client_module_imports_without_numba_or_the_server():
    """The client installs and runs without numba: with numba unimportable, every client module
    imports, and none of them loads the server."""
    client = sorted(name for name in MODULES if not name.startswith(SERVER))
    code = ("import importlib, sys\n"
            "sys.modules['numba'] = None\n"  # an import of numba now raises ImportError
            f"for name in {client!r}:\n"
            "    importlib.import_module(name)\n"
            f"loaded = sorted(m for m in sys.modules if m == {SERVER!r} or m.startswith({SERVER + '.'!r}))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["Config", "ConfigError", "Service", "load_config", "load_toml", "run_server"])
def test_the_front_door_names_the_server_lazily(name):
    import ringfeed
    import ringfeed.server

    assert getattr(ringfeed, name) is getattr(ringfeed.server, name)

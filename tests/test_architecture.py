"""The package's shape, checked from its source: no import cycles, no long positional parameter lists.

Both tests read the code with ``ast`` (nothing is imported), so they are fast. Two import graphs
must be free of cycles:

* the *dependency* graph: every import anywhere in a module, also inside functions and under
  ``TYPE_CHECKING``. An import placed in a function only to dodge a cycle is still a cycle between
  the two modules' responsibilities.
* the *load* graph: what runs when a module is imported: its module-level imports (not under
  ``TYPE_CHECKING``), each of which first runs the ``__init__`` of every package above the
  target. A subpackage's ``__init__`` that imports its parts can close a cycle no single
  ``import`` line shows (``a/x.py`` imports ``b.y``, and ``b/__init__.py`` imports something that
  imports ``a``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "picotron_lightning"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_POSITIONAL = 8


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their ``__init__``)."""
    return {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs when the module is loaded (module level, not TYPE_CHECKING)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, at_load: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, at_load))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), at_load)
            else:
                visit(child, at_load)

    visit(tree, True)
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The package modules ``module`` depends on, and those that loading it runs (see the module docstring).

    ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``. Loading a module also
    runs the packages above it, except the top-level package (always loaded first) and the
    packages ``module`` itself is in (already loading).
    """
    depends: set[str] = set()
    loads: set[str] = set()
    is_package = path.name == "__init__.py"
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    for node, at_load in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = _absolute(module, is_package, node)
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        for target in targets:
            if target not in modules or target == module:
                continue
            depends.add(target)
            if at_load:
                parents = {".".join(target.split(".")[:i]) for i in range(2, target.count(".") + 2)}
                loads.update(p for p in parents if p in modules and p not in own_packages)
    return depends, loads


def import_graphs(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The dependency graph and the load graph of the package under ``root``."""
    modules = package_modules(root)
    edges = {name: imports_of(name, path, modules) for name, path in modules.items()}
    return {n: d for n, (d, _) in edges.items()}, {n: lo for n, (_, lo) in edges.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle through the component's first module, by breadth-first search."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in strongly connected component {sorted(component)}")


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_walker_sees_function_level_type_checking_and_package_cycles(tmp_path):
    # The checker itself: each kind of cycle the module docstring names is found.
    pkg = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.b import thing\n",  # function level
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "pkg/c/__init__.py": "from pkg.c.x import thing\n",
        "pkg/c/x.py": "from pkg.d.y import other\n",
        "pkg/d/__init__.py": "from pkg.d.y import other\nfrom pkg.d.z import more\n",
        "pkg/d/y.py": "other = 1\n",
        "pkg/d/z.py": "from pkg.c import thing\n",  # closes c -> x -> d (__init__) -> z -> c
    })
    depends, loads = import_graphs(pkg)
    assert depends["pkg.a"] == {"pkg.b"} and depends["pkg.b"] == {"pkg.a"}
    assert loads["pkg.a"] == set() and loads["pkg.b"] == set()  # neither runs when loading
    assert loads["pkg.c.x"] == {"pkg.d.y", "pkg.d"}
    assert find_cycles(depends) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert find_cycles(loads) == [["pkg.c", "pkg.c.x", "pkg.d", "pkg.d.z", "pkg.c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graphs_have_no_cycles():
    depends, loads = import_graphs()
    assert len(depends) > 50 and depends[f"{PACKAGE}.options"], "the walker found no modules or no imports"
    for kind, graph in (("dependency", depends), ("load", loads)):
        cycles = find_cycles(graph)
        assert not cycles, f"{kind} cycles in the package:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _positional(args: ast.arguments, is_method: bool) -> list[str]:
    names = [a.arg for a in [*args.posonlyargs, *args.args]]
    if is_method and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def long_positional_signatures() -> list[str]:
    """``module:line name(params)`` of every function or method with more than MAX_POSITIONAL positional parameters."""
    found = []
    for name, path in package_modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = _positional(node.args, id(node) in methods)
                if len(params) > MAX_POSITIONAL:
                    found.append(f"{name}:{node.lineno} {node.name}({', '.join(params)})")
    return found


def test_no_function_takes_more_than_eight_positional_parameters():
    assert _positional(ast.parse("def f(self, a, /, b, *, c): pass").body[0].args, True) == ["a", "b"]
    too_long = long_positional_signatures()
    assert not too_long, (f"more than {MAX_POSITIONAL} positional parameters (make the rest keyword-only or "
                          "pass an options object):\n" + "\n".join(too_long))

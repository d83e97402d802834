"""gpuce has no import cycle, counting the imports inside functions too (a lazy import hides a
cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpuce"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(modules: set, name: str) -> str | None:
    """The gpuce module ``name`` refers to (a submodule, else its package), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path = PACKAGE) -> dict:
    """{module: {gpuce modules it imports anywhere in its source}}."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = ".".join(p for p in (base, node.module) if p)
                else:
                    base = node.module or ""
                # `from pkg import name`: the submodule pkg.name where there is one, else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                dep = _resolve(modules, t)
                if dep is not None and dep != mod:
                    deps.add(dep)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules (first repeated last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "gpuce"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    pass\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    (pkg / "c.py").write_text("import gpuce.a\nfrom gpuce import b as B\n")
    graph = import_graph(pkg)
    assert graph == {"gpuce": {"gpuce.a"}, "gpuce.a": {"gpuce.b"}, "gpuce.b": {"gpuce.a"},
                     "gpuce.c": {"gpuce.a", "gpuce.b"}}
    assert find_cycle(graph) == ["gpuce.a", "gpuce.b", "gpuce.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_gpuce_has_no_import_cycle():
    graph = import_graph()
    assert "gpuce.sce" in graph and "gpuce._validation" in graph["gpuce.sce"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in gpuce: " + " -> ".join(cycle)


def test_import_gpuce_imports_no_heavy_optional_module():
    """``import gpuce`` stays near NumPy's own import time: ml_dtypes (about 0.5 s), scipy,
    dask, torch and CuPy are imported only where a call needs them."""
    import subprocess
    import sys

    code = ("import sys, gpuce; "
            "print(sorted(m for m in ('ml_dtypes', 'scipy', 'dask', 'torch', 'cupy', 'sklearn', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

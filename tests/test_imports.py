"""No import cycle among the modules of distbelief, distbelief.server and distbelief.workers.

The sources are parsed with ``ast``, nothing is imported. Only imports that run when
a module is loaded count: those at module level (also inside ``try``, ``if`` or a
class body), not those inside functions or under ``if TYPE_CHECKING:``. A package's
``__init__`` is not an implicit dependency of its submodules (Python starts it first
either way); ``from package import name`` depends on ``package.name`` when that is a
module, else on ``package``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml, [tool.setuptools] package-dir)
PACKAGE_DIRS = {
    "distbelief": "distbelief",
    "server": "distbelief.server",
    "workers": "distbelief.workers",
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under the mapped folders."""
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        if not (root / folder).is_dir():
            continue
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING", "t.TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]):
    """The Import and ImportFrom nodes that run when ``body`` runs as a module."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue  # runs when called, not when the module loads
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _load_time_imports(node.orelse)
        else:  # class bodies, if/else, try/except/finally, with, for, while, match
            for field in ("body", "orelse", "finalbody"):
                yield from _load_time_imports(getattr(node, field, []))
            for holder in (*getattr(node, "handlers", []), *getattr(node, "cases", [])):
                yield from _load_time_imports(holder.body)


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name an ``ImportFrom`` in ``module`` (defined in ``path``) names."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at load time."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in _load_time_imports(tree.body):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            else:
                base = _resolve(module, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in files else base)
        graph[module] = {d for d in deps if d in files and d != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    files = module_files()
    assert "distbelief.server.shard" in files and "distbelief.workers.replica" in files
    assert "distbelief.cli" in files
    cycle = find_cycle(import_graph(files))
    assert cycle is None, "import cycle at module level: " + " -> ".join(cycle)


def test_the_graph_sees_relative_and_from_package_imports():
    graph = import_graph(module_files())
    assert "distbelief.server.checkpoints" in graph["distbelief.server.shard"]  # from .x
    # under `if TYPE_CHECKING:` only, so no edge back
    assert "distbelief.server.shard" not in graph["distbelief.server.checkpoints"]
    assert "distbelief.cli.serve" in graph["distbelief.cli"]  # from distbelief.cli import serve


def test_a_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "distbelief"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import distbelief.b\n\ndef f():\n    import distbelief.c\n")
    (pkg / "b.py").write_text("from distbelief.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\ntry:\n    from .. import a\nexcept ImportError:\n"
        "    pass\nif TYPE_CHECKING:\n    from distbelief import b\n"
    )
    graph = import_graph(module_files(tmp_path))
    assert graph["distbelief.sub.c"] == {"distbelief.a"}
    assert find_cycle(graph) == ["distbelief.a", "distbelief.b", "distbelief.sub.c", "distbelief.a"]
    (pkg / "sub" / "c.py").write_text("def g():\n    from .. import a\n")
    assert find_cycle(import_graph(module_files(tmp_path))) is None


def test_cli_command_modules_load_only_the_shared_flags_config_and_logs():
    """docs/design.md: the commands never import the group or each other at load time."""
    graph = import_graph(module_files())
    allowed = {"distbelief.cli.options", "distbelief.config", "distbelief.logs"}
    commands = [m for m in graph if m.startswith("distbelief.cli.")]
    assert "distbelief.cli.serve" in commands and "distbelief.cli.keys" in commands
    for module in commands:
        extra = graph[module] - allowed
        assert not extra, f"{module} imports {sorted(extra)} when it loads"

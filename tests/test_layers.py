"""The layout holds: read from the modules' own imports (their source, not a running process), no
module imports a layer after its own, no import cycle exists, nobody imports another module's
private names, kvconf imports no built-in connector, and no file is over about 500 lines unless
its docstring says why it is one piece. Each rule is also shown failing on a planted violation."""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

LAYERS = [
    ("kvconf.errors", "kvconf.units", "kvconf.version"),
    ("kvconf.conf",),
    ("kvconf.config",),
    ("kvconf.contract",),
    ("kvconf.runtime",),
    ("kvconf_connectors",),
    ("kvconf.vllm",),
    ("kvconf.bench",),
    ("kvconf.proxy",),
    ("kvconf.ci",),
    ("kvconf.cli",),
]
"""Each layer may import itself and the layers before it, never one after it."""
TOP = ("kvconf", "kvconf.__main__")
"""The package's flat API and ``python -m kvconf``: above every layer (they may import any),
imported by none."""
PLUGINS = "kvconf_connectors"
"""The built-in connectors: kvconf's registry names them by string; no kvconf module imports them."""
PACKAGES = {"kvconf": "kvconf", "kvconf.conf": "conf", "kvconf_connectors": "connectors"}
"""Import name -> the repository's folder (pyproject.toml's package-dir)."""
MAX_LINES = 500


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    names: tuple[str, ...] = ()


def modules(root: Path) -> dict[str, Path]:
    """``module name -> file`` of every module of kvconf's packages under ``root``."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [*pkg.split("."), *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, type_checking: bool = False):
    """Every import statement, at any depth (functions' lazy imports too); those under
    ``if TYPE_CHECKING:``, which never run, only with ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child) and not type_checking:
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph(root: Path, type_checking: bool = False) -> list[Edge]:
    """The edges between kvconf's modules, from each module's own import statements (with
    ``type_checking``, those made for the type checker alone too)."""
    mods = modules(root)
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path)), type_checking):
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append((sub, ()) if sub in mods else (base, (a.name,)))
            for target, names in targets:
                while target and target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target in mods and target != name:
                    edges.append(Edge(name, target, node.lineno, names))
    return edges


def layer_of(module: str) -> int:
    """The index of ``module``'s layer in :data:`LAYERS`; one past the last for :data:`TOP`."""
    if module in TOP:
        return len(LAYERS)
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (tests/test_layers.py)")


def upward_imports(edges: list[Edge]) -> list[str]:
    out = []
    for e in edges:
        if e.dst in TOP:
            out.append(f"{e.src}:{e.line} imports {e.dst}, which only users and python -m may import")
        elif e.dst.startswith(PLUGINS) and not e.src.startswith(PLUGINS) and e.src not in TOP:
            out.append(f"{e.src}:{e.line} imports the built-in connector module {e.dst} (the registry names it)")
        elif layer_of(e.dst) > layer_of(e.src):
            out.append(f"{e.src}:{e.line} imports {e.dst}, a later layer")
    return out


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(edges: list[Edge]) -> list[str]:
    return [f"{e.src}:{e.line} imports {', '.join(n for n in e.names if _private(n))} from {e.dst}"
            for e in edges if any(_private(n) for n in e.names)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def long_files(root: Path) -> list[str]:
    out = []
    for path in modules(root).values():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > MAX_LINES and "one piece" not in doc:
            out.append(f"{path.relative_to(root)}: {n} lines, and its docstring does not say why it is one piece")
    return out


def _planted(tmp_path: Path, module: str, code: str) -> Path:
    """A copy of the packages with ``code`` appended to ``module``'s file."""
    for folder in PACKAGES.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    path = modules(tmp_path)[module]
    path.write_text(path.read_text() + "\n" + code)
    return tmp_path


# ---- the repository --------------------------------------------------------------------------------


def test_no_module_imports_a_later_layer():
    assert upward_imports(import_graph(REPO)) == []


def test_no_import_cycle_not_even_for_the_type_checker():
    assert cycles(import_graph(REPO, type_checking=True)) == []


def test_no_module_imports_another_modules_private_names():
    assert private_imports(import_graph(REPO)) == []


def test_every_module_is_in_a_layer():
    for name in modules(REPO):
        layer_of(name)


def test_no_file_is_over_500_lines_without_saying_why():
    assert long_files(REPO) == []


def test_the_graph_sees_lazy_imports_inside_functions():
    edges = import_graph(REPO)
    assert any(e.src == "kvconf.runtime.pipeline" and e.dst == "kvconf.runtime.allocate" for e in edges)


# ---- planted violations ------------------------------------------------------------------------------


def test_a_planted_upward_import_is_found(tmp_path):
    root = _planted(tmp_path, "kvconf.config.models", "def _late():\n    from kvconf.cli.app import main\n")
    found = upward_imports(import_graph(root))
    assert found and "kvconf.config.models" in found[0] and "kvconf.cli.app, a later layer" in found[0]


def test_a_planted_cycle_through_a_type_checking_import_is_found(tmp_path):
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .connector import P2PConnector  # noqa\n"
    root = _planted(tmp_path, "kvconf_connectors.p2p.producer", code)
    assert cycles(import_graph(root)) == []
    found = cycles(import_graph(root, type_checking=True))
    assert any({"kvconf_connectors.p2p.connector", "kvconf_connectors.p2p.producer"} <= set(c) for c in found)


def test_a_planted_cycle_is_found(tmp_path):
    root = _planted(tmp_path, "kvconf.units", "from kvconf.errors import Problem  # noqa\n")
    path = modules(root)["kvconf.errors"]
    path.write_text(path.read_text() + "\nfrom kvconf.units import parse_bytes  # noqa\n")
    assert ["kvconf.errors", "kvconf.units"] in cycles(import_graph(root))


def test_a_planted_private_import_is_found(tmp_path):
    root = _planted(tmp_path, "kvconf.ci.conformance", "from kvconf.contract.registry import _REGISTRY  # noqa\n")
    assert private_imports(import_graph(root)) == [
        f"kvconf.ci.conformance:{len(modules(root)['kvconf.ci.conformance'].read_text().splitlines())} imports "
        "_REGISTRY from kvconf.contract.registry"]


def test_a_planted_import_of_a_built_in_connector_is_found(tmp_path):
    root = _planted(tmp_path, "kvconf.runtime.pipeline", "def _x():\n    import kvconf_connectors.example\n")
    assert any("built-in connector module kvconf_connectors.example" in f for f in upward_imports(import_graph(root)))


def test_a_planted_long_file_is_found(tmp_path):
    root = _planted(tmp_path, "kvconf.units", "\n".join(f"X{i} = {i}" for i in range(MAX_LINES)))
    assert [f for f in long_files(root) if "kvconf/units.py" in f]

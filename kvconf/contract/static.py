"""Connector classes read from their source, never run: for a machine without vLLM, and for tools
that must not execute what a config names (``kvconf validate``).

:func:`static_class` finds the module's file on ``sys.path`` without importing it (nor its parent
packages), parses it, and follows the class's bases: classes of the same module, classes of other
modules it imports (read the same way), vLLM's ``KVConnectorBase_V1`` and ``SupportsHMA``, and
kvconf's own classes (kvconf's and its built-in connectors' modules are imported: they are
kvconf's code, not the user's). It returns a stand-in with the same name, constructor signature
and unimplemented abstract methods, so that the contract check gives the verdict it would give
the real class; None when a base cannot be read that way.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["VLLM_ABSTRACT", "VLLM_BASE", "VLLM_BASE_MODULE", "is_vllm_missing", "source_of", "static_class"]

VLLM_BASE = "KVConnectorBase_V1"
VLLM_BASE_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.base"
VLLM_ABSTRACT = frozenset({"start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
                           "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"})
"""The abstract methods of vLLM 0.32's ``KVConnectorBase_V1``."""
_HMA_ABSTRACT = frozenset({"request_finished_all_groups"})
_TRUSTED = ("kvconf", "kvconf_connectors")
_IGNORED = {"object", "abc.ABC", "ABC", "typing.Generic", "Generic"}


def is_vllm_missing(exc: BaseException) -> bool:
    """Whether ``exc`` is the import of a module that needs vLLM, which is not installed."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and (name == "vllm" or name.startswith("vllm."))


def source_of(module: str) -> Optional[str]:
    """The ``.py`` file of ``module`` on ``sys.path`` (the current folder for ``""``), found
    without importing it or its parent packages; None when there is none."""
    parts = module.split(".")
    for entry in sys.path:
        base = os.path.join(entry or os.getcwd(), *parts)
        for candidate in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(candidate):
                return candidate
    return _mapped_source(parts)


def _mapped_source(parts: list[str]) -> Optional[str]:
    """The ``.py`` file of a module whose package an import finder maps to another folder (an
    editable install's ``package-dir``: ``kvconf_connectors`` is ``connectors/``), asking the
    finders package by package; a finder's ``find_spec`` locates, it does not import."""
    search: Optional[list[str]] = None
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            try:
                spec = find(name, search) if find is not None else None
            except (ImportError, ValueError, AttributeError):
                spec = None
            if spec is not None:
                break
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    origin = getattr(spec, "origin", None)
    return origin if isinstance(origin, str) and origin.endswith(".py") and os.path.isfile(origin) else None


def _imports(tree: ast.Module, module: str) -> dict[str, str]:
    """Local name -> dotted origin (``KVConnectorBase_V1`` -> ``vllm....base.KVConnectorBase_V1``)."""
    out: dict[str, str] = {}
    package = module.rsplit(".", 1)[0] if "." in module else ""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:  # relative: from .base import X
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                origin = ".".join([*up, *([origin] if origin else [])])
            for a in node.names:
                out[a.asname or a.name] = f"{origin}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    return out


def _dotted(expr: ast.expr, names: dict[str, str]) -> str:
    if isinstance(expr, ast.Name):
        return names.get(expr.id, expr.id)
    if isinstance(expr, ast.Attribute):
        return f"{_dotted(expr.value, names)}.{expr.attr}"
    return ""


def _signature(fn: ast.FunctionDef) -> inspect.Signature:
    a = fn.args
    params: list[inspect.Parameter] = []
    positional = [*a.posonlyargs, *a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(positional, defaults)):
        if i == 0:
            continue  # self
        kind = inspect.Parameter.POSITIONAL_ONLY if arg in a.posonlyargs else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(arg.arg, kind, default=inspect.Parameter.empty if d is None else ...))
    if a.vararg:
        params.append(inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                        default=inspect.Parameter.empty if d is None else ...))
    if a.kwarg:
        params.append(inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


_BASE_SIGNATURE = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                     for n in ("vllm_config", "role", "kv_cache_config")])


@dataclass
class _Read:
    """What the source says of a class and its ancestors."""

    methods: set[str] = field(default_factory=set)
    init: Optional[ast.FunctionDef] = None
    vllm: bool = False
    hma: bool = False
    trusted: Optional[type] = None
    """The nearest of kvconf's own classes among the ancestors (imported: kvconf's code)."""
    own_extra: bool = False
    """Whether the class (or an ancestor read from source) sets ``extra_config`` itself."""


def _parse(module: str) -> Optional[tuple[str, ast.Module]]:
    path = source_of(module)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return path, ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _read(module: str, name: str, depth: int = 0) -> Optional[tuple[_Read, str, int]]:
    """``(what the class says, its file, its line)``; None where it, or a base, cannot be read."""
    if depth > 8:
        return None
    parsed = _parse(module)
    if parsed is None:
        return None
    path, tree = parsed
    names = _imports(tree, module)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    cls = classes.get(name)
    if cls is None:
        return None
    read = _Read()
    read.methods = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    read.init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    read.own_extra = any(isinstance(n, (ast.Assign, ast.AnnAssign)) and any(
        isinstance(t, ast.Name) and t.id == "extra_config" for t in (n.targets if isinstance(n, ast.Assign)
                                                                     else [n.target])) for n in cls.body)
    for b in cls.bases:
        dotted = _dotted(b, names)
        if dotted in _IGNORED or not dotted:
            continue
        if dotted == f"{VLLM_BASE_MODULE}.{VLLM_BASE}":
            read.vllm = True
            continue
        if dotted == f"{VLLM_BASE_MODULE}.SupportsHMA":
            read.hma = True
            continue
        if isinstance(b, ast.Name) and b.id in classes and "." not in dotted:
            sub = _read(module, b.id, depth + 1)
        elif dotted.split(".")[0] in _TRUSTED:
            mod, _, attr = dotted.rpartition(".")
            try:
                real = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError):
                return None
            read.trusted = read.trusted or real
            continue
        elif "." in dotted:
            mod, _, attr = dotted.rpartition(".")
            sub = _read(mod, attr, depth + 1)
        else:
            return None  # a base this reading cannot follow (a builtin, a name made at run time)
        if sub is None:
            return None
        r = sub[0]
        read.methods |= r.methods
        read.init = read.init or r.init
        read.vllm = read.vllm or r.vllm
        read.hma = read.hma or r.hma
        read.trusted = read.trusted or r.trusted
        read.own_extra = read.own_extra or r.own_extra
    return read, path, cls.lineno


def _stub(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("a stand-in read from source: it is never run")


def static_class(module: str, attr: str, *, why: str = "vllm") -> Optional[type]:
    """A stand-in for ``module.attr`` read from source (see the module's docstring), or None when
    the class, or one of its bases, cannot be read that way. ``why``: ``vllm`` (vLLM is not
    installed) or ``no-import`` (the caller must not run the user's code)."""
    found = _read(module, attr)
    if found is None:
        return None
    read, path, line = found
    if not read.vllm and read.trusted is None:
        return None  # neither base: the contract check needs the real class to say more
    ns: dict[str, Any] = {"__module__": module, "__qualname__": attr, "__kvconf_static__": f"{path}:{line}",
                          "__kvconf_static_why__": why, "__kvconf_hma__": read.hma}
    if read.init is not None:
        ns["__signature__"] = _signature(read.init)
    if read.trusted is not None:
        ns.update({m: _stub for m in read.methods if m != "__init__"})
        if read.own_extra:
            ns["extra_config"] = None  # the user's own model: not evaluated without running the module
        return type(attr, (read.trusted,), ns)
    ns.setdefault("__signature__", _BASE_SIGNATURE)
    ns["__kvconf_base__"] = "vllm"
    stand_in = type(attr, (), ns)
    missing = VLLM_ABSTRACT - read.methods
    if read.hma:
        missing |= _HMA_ABSTRACT - read.methods
    if missing:
        stand_in.__abstractmethods__ = frozenset(missing)  # type: ignore[attr-defined]  # marks it abstract
    return stand_in

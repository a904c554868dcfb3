"""Connector classes written for vLLM, read from their source when vLLM is not installed.

A connector author's class subclasses vLLM's ``KVConnectorBase_V1``; importing its module imports
vLLM, which a CI machine or a laptop may not have. :func:`static_class` then reads the module's
source (never running it) and returns a stand-in class with the same name, constructor signature
and unimplemented abstract methods, so that the contract check gives the verdict it would give
the real class. It recognises ``from vllm...v1.base import KVConnectorBase_V1 [as X]`` and
``import vllm...v1.base as b`` (``b.KVConnectorBase_V1``), with ``SupportsHMA`` beside it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from typing import Any, Optional

__all__ = ["VLLM_ABSTRACT", "VLLM_BASE", "VLLM_BASE_MODULE", "is_vllm_missing", "static_class"]

VLLM_BASE = "KVConnectorBase_V1"
VLLM_BASE_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.base"
VLLM_ABSTRACT = frozenset({"start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
                           "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"})
"""The abstract methods of vLLM 0.32's ``KVConnectorBase_V1``."""
_HMA_ABSTRACT = frozenset({"request_finished_all_groups"})


def is_vllm_missing(exc: BaseException) -> bool:
    """Whether ``exc`` is the import of a module that needs vLLM, which is not installed."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and (name == "vllm" or name.startswith("vllm."))


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin (``KVConnectorBase_V1`` -> ``vllm....base.KVConnectorBase_V1``)."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
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


def _walk(cls: ast.ClassDef, classes: dict[str, ast.ClassDef], names: dict[str, str],
          seen: set[str]) -> Optional[tuple[set[str], Optional[ast.FunctionDef], bool]]:
    """The methods ``cls`` defines or inherits from classes of its own module, its ``__init__``
    (the first found in base order) and whether it is SupportsHMA; None unless vLLM's base is
    among its ancestors."""
    seen.add(cls.name)
    methods = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    vllm = hma = False
    for b in cls.bases:
        dotted = _dotted(b, names)
        if dotted == f"{VLLM_BASE_MODULE}.{VLLM_BASE}":
            vllm = True
        elif dotted == f"{VLLM_BASE_MODULE}.SupportsHMA":
            hma = True
        elif isinstance(b, ast.Name) and b.id in classes and b.id not in seen:
            sub = _walk(classes[b.id], classes, names, seen)
            if sub is not None:
                vllm = True
                methods |= sub[0]
                init = init or sub[1]
                hma = hma or sub[2]
    return (methods, init, hma) if vllm else None


_BASE_SIGNATURE = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                     for n in ("vllm_config", "role", "kv_cache_config")])


def static_class(module: str, attr: str) -> Optional[type]:
    """A stand-in for ``module.attr`` read from source, when that class subclasses vLLM's connector
    base directly; None when the source cannot be found or the class is not such a class."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), spec.origin)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    names = _imports(tree)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    cls = classes.get(attr)
    if cls is None:
        return None
    found = _walk(cls, classes, names, set())
    if found is None:
        return None
    methods, init, hma = found
    sig = _signature(init) if isinstance(init, ast.FunctionDef) else _BASE_SIGNATURE
    required = VLLM_ABSTRACT | (_HMA_ABSTRACT if hma else frozenset())
    ns: dict[str, Any] = {"__module__": module, "__qualname__": attr, "__signature__": sig,
                          "__kvconf_static__": f"{spec.origin}:{cls.lineno}", "__kvconf_base__": "vllm",
                          "__kvconf_hma__": hma}
    stand_in = type(attr, (), ns)
    missing = required - methods
    if missing:
        stand_in.__abstractmethods__ = frozenset(missing)  # type: ignore[attr-defined]  # marks it abstract
    return stand_in

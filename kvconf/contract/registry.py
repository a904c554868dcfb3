"""Connector names to classes: a lazy registry, entry points, and ``module_path``.

Resolution order (as vLLM since PR #38301): ``module_path`` wins; then kvconf's built-in names;
then the ``kvconf.connectors`` entry-point group of installed packages. Only the chosen connector's
module is imported, so importing kvconf imports no connector.

>>> sorted(builtin_names())
['example', 'mooncake', 'multi', 'nixl', 'offloading', 'shared_storage']
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvconf.errors import ConfigError, ContractError, Problem, did_you_mean

__all__ = ["ENTRY_POINT_GROUP", "Resolved", "builtin_extra_model", "builtin_extra_models", "builtin_name_of",
           "builtin_for_vllm", "builtin_names", "no_imports", "register_connector", "resolve", "user_modules", "vllm_names"]

ENTRY_POINT_GROUP = "kvconf.connectors"

_REGISTRY: dict[str, tuple[str, str]] = {}
_VLLM_NAMES: dict[str, str] = {}


def register_connector(name: str, module: str, class_name: str, vllm_name: str | None = None) -> None:
    """Adds ``name -> module:class_name`` to the registry; the module is imported only on use.
    ``vllm_name``: the name vLLM registers its counterpart under (the class says the same as
    ``ExportsToVLLM.vllm_name``; kept here too, so that reading a vLLM config imports no connector)."""
    if name in _REGISTRY:
        raise ValueError(f"Connector {name!r} is already registered.")
    _REGISTRY[name] = (module, class_name)
    if vllm_name is not None:
        _VLLM_NAMES[name] = vllm_name


register_connector("example", "kvconf_connectors.example", "ExampleConnector")
register_connector("mooncake", "kvconf_connectors.mooncake", "MooncakeConnector", "MooncakeConnector")
register_connector("multi", "kvconf_connectors.multi", "MultiConnector", "MultiConnector")
register_connector("nixl", "kvconf_connectors.nixl", "NixlConnector", "NixlConnector")
register_connector("offloading", "kvconf_connectors.offloading", "OffloadingConnector", "OffloadingConnector")
register_connector("shared_storage", "kvconf_connectors.shared_storage", "SharedStorageConnector", "ExampleConnector")


def vllm_names() -> dict[str, str]:
    """kvconf name -> vLLM's name, for the built-in connectors that vLLM has a counterpart of."""
    return dict(_VLLM_NAMES)


def builtin_for_vllm(vllm_name: str) -> str | None:
    """The built-in connector that stands for vLLM's ``vllm_name`` (``NixlPullConnector``, vLLM's
    alias, is kvconf's nixl in pull mode), or None."""
    if vllm_name in ("NixlPullConnector", "NixlPushConnector"):
        vllm_name = "NixlConnector"
    return next((k for k, v in _VLLM_NAMES.items() if v == vllm_name), None)


_USER_MODULES: list[str] = []


def user_modules() -> list[str]:
    """The modules of user code that :func:`resolve` imported (ran) in this process, in order:
    ``module_path`` modules and entry points; kvconf's own built-in connectors are not listed."""
    return list(_USER_MODULES)


def _ran(module: str) -> None:
    if module not in _USER_MODULES:
        _USER_MODULES.append(module)


_IMPORT_MODULES: contextvars.ContextVar[bool] = contextvars.ContextVar("kvconf_import_modules", default=True)


@contextlib.contextmanager
def no_imports() -> Iterator[None]:
    """Within it, :func:`resolve` reads a ``module_path`` connector from its source and never
    imports (runs) the user's module (``kvconf validate`` without ``--import-modules``)."""
    token = _IMPORT_MODULES.set(False)
    try:
        yield
    finally:
        _IMPORT_MODULES.reset(token)


def builtin_names() -> list[str]:
    return list(_REGISTRY)


def builtin_extra_model(name: str) -> Any:
    """The ``extra``-settings model of the built-in connector ``name`` (importing only its module);
    None for an unknown name or a connector whose settings are free-form."""
    if name not in _REGISTRY:
        return None
    module, attr = _REGISTRY[name]
    return getattr(getattr(importlib.import_module(module), attr), "extra_config", None)


def builtin_extra_models() -> dict[str, Any]:
    """``name -> extra-settings model`` of every built-in connector that has one (imports them all)."""
    models = {name: builtin_extra_model(name) for name in _REGISTRY}
    return {name: m for name, m in models.items() if m is not None}


def builtin_name_of(cls: type) -> str | None:
    """The registry name of a built-in connector class, or None."""
    return next((n for n, (m, c) in _REGISTRY.items() if (m, c) == (cls.__module__, cls.__name__)), None)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


@dataclass(frozen=True)
class Resolved:
    """What a connector name resolved to."""

    target: Any
    """The object found (a class, unless the contract check says otherwise)."""
    module: str
    attribute: str
    source: str
    """``module_path``, ``registry`` or ``entry_point``."""
    path: str
    """The config path that chose it (``connector.module_path`` or ``connector.name``)."""


def resolve(name: str, module_path: str | None) -> Resolved:
    """The object ``name`` names; a :class:`ConfigError` or :class:`ContractError` (exit 2) saying
    what is wrong and how to fix it when there is none."""
    if module_path is not None and not _IMPORT_MODULES.get():
        return _from_source(name, module_path, "no-import")
    if module_path is not None:
        try:
            module = _import(module_path, "connector.module_path")
        except _NeedsVLLM:  # a connector written for vLLM, on a machine without vLLM
            return _from_source(name, module_path, "vllm")
        _ran(module_path)
        return Resolved(_getattr(module, module_path, name), module_path, name, "module_path", "connector.module_path")
    if name in _REGISTRY:
        module, attr = _REGISTRY[name]
        return Resolved(_getattr(_import(module, "connector.name"), module, attr), module, attr,
                        "registry", "connector.name")
    eps = _entry_points()
    if name in eps:
        module, _, attr = eps[name].partition(":")
        obj = _import(module, "connector.name")
        _ran(module)
        for part in attr.split("."):
            obj = _getattr(obj, module, part) if part else obj
        return Resolved(obj, module, attr, "entry_point", "connector.name")
    known = sorted(set(_REGISTRY) | set(eps))
    ours = builtin_for_vllm(name)
    if ours is not None:
        raise ConfigError(Problem(
            "connector.name", f"{name} is vLLM's name; kvconf's connector of that kind is {ours}", value=name,
            allowed=known, fix=f"use connector={ours} (kvconf import translates a whole vLLM JSON)"))
    from kvconf.config.vllm import REMOVED_CONNECTORS, RENAMED_CONNECTORS

    gone = RENAMED_CONNECTORS.get(name) or REMOVED_CONNECTORS.get(name)
    if gone is not None:
        ours = builtin_for_vllm(gone.replacement) if gone.replacement else None
        raise ConfigError(Problem(
            "connector.name", f"{name} is no longer a vLLM connector: {gone.advice}", value=name, allowed=known,
            fix=f"use connector={ours}" if ours else "use one of the allowed connectors"))
    hint = did_you_mean(name, known)
    raise ConfigError(Problem(
        "connector.name", "unknown connector", value=name, allowed=known,
        fix=(f"use connector={hint}" if hint else "use a registered name")
        + ", or give the class's module: connector.module_path=my_pkg.my_module connector.name=MyConnector"))


def _from_source(name: str, module_path: str, why: str) -> Resolved:
    """``module_path``'s class read from its source, nothing of the user's run: because the caller
    must not run it (``why="no-import"``), or because it needs vLLM, which is missing (``"vllm"``)."""
    from .static import source_of, static_class

    if why == "no-import" and source_of(module_path) is None:  # (an import that needed vLLM found it)
        raise ContractError(Problem(
            "connector.module_path", f"no module named {module_path!r} (looked for its source on the path, "
            "without importing it)", value=module_path,
            fix="check the spelling, or add its folder to PYTHONPATH"))
    stand_in = static_class(module_path, name, why=why)
    if stand_in is not None:
        return Resolved(stand_in, module_path, name, "module_path (read from source)", "connector.module_path")
    if why == "vllm":
        raise ContractError(Problem(
            "connector.module_path", f"importing {module_path!r} needs vLLM, which is not installed, and "
            f"its source has no class {name!r} on vLLM's KVConnectorBase_V1", value=module_path,
            fix="install vLLM, or check connector.name"))
    raise ContractError(Problem(
        "connector.name", f"{name} in {module_path!r} cannot be checked from its source alone: the class, or "
        "one of its bases, is not a class statement this reading can follow", value=name,
        fix="pass --import-modules to import the module (this runs its code), or check the spelling"))


class _NeedsVLLM(Exception):
    """Importing a ``module_path`` failed only because vLLM is not installed."""


def _import(module: str, path: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        from .static import is_vllm_missing

        if path == "connector.module_path" and is_vllm_missing(exc):
            raise _NeedsVLLM(module) from None
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise ContractError(Problem(
                path, f"no module named {module!r}", value=module,
                fix="check the spelling, install the package that provides it, or add its folder "
                    "to PYTHONPATH")) from None
        raise ContractError(Problem(
            path, f"importing {module!r} failed: it needs the module {exc.name!r}, which is not installed",
            value=module, fix=f"install what provides {exc.name!r} (pip install ...)")) from None
    except Exception as exc:  # the module itself raised
        tb = exc.__traceback__
        where = None
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__") == module:
                where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
            tb = tb.tb_next
        raise ContractError(Problem(
            path, f"importing {module!r} raised {type(exc).__name__}: {exc}", value=module, location=where,
            fix="fix the error in that module; it must import without side effects")) from None


def _getattr(module: Any, module_name: str, attr: str) -> Any:
    try:
        return getattr(module, attr)
    except AttributeError:
        classes = sorted(n for n, v in vars(module).items()
                         if inspect.isclass(v) and getattr(v, "__module__", None) == getattr(module, "__name__", None))
        hint = did_you_mean(attr, classes)
        raise ContractError(Problem(
            "connector.name", f"class {attr!r} not found in module {module_name!r}", value=attr,
            allowed=classes or None,
            location=getattr(module, "__file__", None),
            fix=(f"use connector.name={hint}" if hint else "set connector.name to a class defined in that module"))) from None


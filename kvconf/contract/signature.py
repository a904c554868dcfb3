"""The constructor contract: a connector must be callable as ``cls(config, role, kv_cache_config)``.

kvconf's check is stricter than vLLM's. vLLM asks only whether a parameter named
``kv_cache_config`` (or ``**kwargs``) exists, so it lets ``**kwargs``-only and keyword-only
signatures through (they then fail with a TypeError at construction) and rejects a renamed third
parameter that would have worked. kvconf asks what the engine will do:
``inspect.signature(cls).bind(config, role, kv_cache_config)`` with three positional arguments.

>>> class Legacy:
...     def __init__(self, config, role): ...
>>> v = check(Legacy)
>>> v.verdict, v.signature
('legacy', '(config, role)')

A class must also be a connector: a subclass of kvconf's ``KVConnectorBase`` or of vLLM's
``KVConnectorBase_V1`` (a connector written for vLLM itself gets the same verdicts as kvconf's):

>>> class Plain:
...     def __init__(self, config, role, kv_cache_config): ...
>>> check(Plain).verdict
'not_a_connector'
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from kvconf.errors import ContractError, Problem

__all__ = ["Verdict", "check", "check_received", "connector_base", "require", "vllm_accepts"]

FIX = ("accept kv_cache_config as the third argument and pass it to super().__init__(): "
       "def __init__(self, config, role, kv_cache_config): super().__init__(config, role, kv_cache_config)")

_P = inspect.Parameter


@dataclass(frozen=True)
class Verdict:
    """The outcome of a contract check."""

    verdict: str
    """``ok``, ``legacy``, ``kwargs_only``, ``keyword_only``, ``extra_required``, ``not_bindable``,
    ``not_a_connector``, ``abstract`` or ``not_a_class``."""
    message: str
    signature: str | None = None
    location: str | None = None
    fix: str | None = None
    vllm_accepts: bool | None = None
    """What vLLM's name-based check (``supports_kw(cls, "kv_cache_config")``) would decide."""
    details: tuple[str, ...] = field(default_factory=tuple)
    base: str | None = None
    """Whose connector base the class subclasses: ``kvconf``, ``vllm`` or None."""

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "message": self.message, "signature": self.signature,
                "location": self.location, "fix": self.fix, "vllm_accepts": self.vllm_accepts, "base": self.base,
                "static": bool(self.details and self.details[0].startswith("read from source"))}


def connector_base(cls: Any) -> str | None:
    """``kvconf`` when ``cls`` subclasses kvconf's connector base, ``vllm`` when it subclasses
    vLLM's ``KVConnectorBase_V1`` (or is a stand-in for such a class read from source), else None."""
    marked = getattr(cls, "__kvconf_base__", None)
    if isinstance(marked, str):
        return marked
    for k in getattr(cls, "__mro__", ()):
        if k.__name__ == "KVConnectorBase" and k.__module__ == "kvconf.contract.base":
            return "kvconf"
        if k.__name__ == "KVConnectorBase_V1" and k.__module__.startswith("vllm."):
            return "vllm"
    return None


def vllm_accepts(cls: Any) -> bool | None:
    """vLLM's check: a parameter named ``kv_cache_config``, or ``**kwargs``."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    return any((p.name == "kv_cache_config" and p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY))
               or p.kind is _P.VAR_KEYWORD for p in params)


def _location(cls: Any) -> str | None:
    static = getattr(cls, "__kvconf_static__", None)
    if isinstance(static, str):
        return static
    init = getattr(cls, "__init__", None)
    try:
        target = init if init is not None and init is not object.__init__ else cls
        return f"{inspect.getsourcefile(target)}:{inspect.getsourcelines(target)[1]}"
    except (TypeError, OSError):
        return None


def check(target: Any, name: str | None = None) -> Verdict:
    """The contract verdict for ``target``; never raises and never calls ``target``."""
    label = str(name or getattr(target, "__qualname__", repr(target)))
    if not inspect.isclass(target):
        kind = "a function" if inspect.isroutine(target) else f"a {type(target).__name__}"
        return Verdict("not_a_class", f"{label} is {kind}, not a class",
                       fix="point connector.name at a connector class (a subclass of kvconf.KVConnectorBase)",
                       vllm_accepts=None)
    where = _location(target)
    accepts = vllm_accepts(target)
    base = connector_base(target)
    why = getattr(target, "__kvconf_static_why__", None)
    details = ((("read from source: vLLM is not installed, so the module was not imported",) if why == "vllm" else
                ("read from source, not imported (--import-modules imports it)",)) if why else ())
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError) as exc:
        return Verdict("not_bindable", f"{label}'s signature cannot be read: {exc}", location=where,
                       fix=FIX, vllm_accepts=accepts, details=details, base=base)
    shown = str(sig)
    try:
        sig.bind(object(), object(), object())
    except TypeError as exc:
        verdict, message = _classify(sig, label, str(exc))
        return Verdict(verdict, message, signature=shown, location=where, fix=FIX, vllm_accepts=accepts,
                       details=details, base=base)
    if base is None:
        return Verdict("not_a_connector", f"{label} subclasses neither kvconf's KVConnectorBase nor vLLM's "
                       "KVConnectorBase_V1, so it lacks the connector API the engine calls", signature=shown,
                       location=where, vllm_accepts=accepts, details=details,
                       fix="subclass kvconf.KVConnectorBase (or vLLM's KVConnectorBase_V1) and implement its "
                           "abstract methods")
    if inspect.isabstract(target):
        missing = sorted(getattr(target, "__abstractmethods__", ()))
        return Verdict("abstract", f"{label} cannot be instantiated: abstract methods not implemented: "
                       f"{', '.join(missing)}", signature=shown, location=where,
                       fix="implement them (kvconf.KVConnectorBase lists the worker and scheduler methods)",
                       vllm_accepts=accepts, details=details, base=base)
    return Verdict("ok", f"{label} accepts (config, role, kv_cache_config)", signature=shown,
                   location=where, vllm_accepts=accepts, details=details, base=base)


def _classify(sig: inspect.Signature, label: str, error: str) -> tuple[str, str]:
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind is _P.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is _P.VAR_KEYWORD for p in params)
    kw_only = [p for p in params if p.kind is _P.KEYWORD_ONLY]
    required_pos = [p for p in positional if p.default is _P.empty]
    required_kw = [p for p in kw_only if p.default is _P.empty]
    if any(p.name == "kv_cache_config" for p in kw_only) and len(positional) == 2 and not var_pos:
        return "keyword_only", (f"{label} takes kv_cache_config as a keyword-only argument; the engine "
                                "passes it as the third positional argument, so construction would fail")
    if len(positional) == 2 and not var_pos and var_kw:
        return "kwargs_only", (f"{label} takes only two positional arguments and **kwargs; the engine "
                               "passes kv_cache_config as the third positional argument, so construction "
                               "would fail with a TypeError (vLLM's name-based check lets this through)")
    if len(positional) == 2 and not var_pos:
        return "legacy", (f"{label} uses the legacy 2-argument constructor (config, role); since vLLM "
                          "PR #39832 connectors must take kv_cache_config as the third argument")
    if len(required_pos) > 3 or required_kw:
        extra = [p.name for p in required_pos[3:]] + [p.name for p in required_kw]
        return "extra_required", (f"{label} requires more than (config, role, kv_cache_config): "
                                  f"{', '.join(extra)} would be missing at construction")
    return "not_bindable", f"{label} cannot be called with (config, role, kv_cache_config): {error}"


def require(target: Any, *, module: str, attribute: str, path: str = "connector.name") -> type:
    """``target`` if it passes the contract, else a :class:`ContractError` naming class and module."""
    v = check(target, f"{attribute} (module {module})")
    if v.ok:
        return target
    details = list(v.details)
    if v.signature is not None:
        details.append(f"signature found: {attribute}{v.signature}")
    if v.vllm_accepts is not None and v.verdict != "not_a_class":
        details.append("vLLM's name-based check would " + ("accept" if v.vllm_accepts else "reject") + " it")
    raise ContractError(Problem(path, v.message, value=attribute, location=v.location, fix=v.fix,
                                details=tuple(details)))


def check_received(connector: Any, kv_cache_config: Any, *, module: str, attribute: str) -> None:
    """After construction: the base class must hold the very ``kv_cache_config`` it was given."""
    got = getattr(connector, "_kv_cache_config", _Absent)
    if got is kv_cache_config:
        return
    what = "nothing (the base __init__ never ran)" if got is _Absent else (
        "None" if got is None else f"a different object ({type(got).__name__})")
    raise ContractError(Problem(
        "connector.name", f"{attribute} (module {module}) did not pass kv_cache_config to "
        f"super().__init__(): the base class received {what}", value=attribute,
        location=_location(type(connector)),
        fix="call super().__init__(config, role, kv_cache_config) in __init__"))


class _Absent:
    pass

"""``kvconf check-connector MODULE:CLASS ...``: the constructor contract of connector classes, for
connector authors' CI. Imports each module (as the engine would) but never imports torch itself.

A verdict per class: ``ok``, ``legacy`` (2-argument constructor), ``kwargs_only``, ``keyword_only``,
``extra_required``, ``not_bindable`` (not callable with three positional arguments), ``abstract``,
``not_a_class``, ``missing_class`` or ``import_error``, with the fix; where vLLM's own name-based
check would decide differently, it says so. Exit 0 only if every class is ok, 1 otherwise, 2 for a
usage error. Also ``python -m kvconf.ci.check_connector``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from kvconf.contract import signature as contract

__all__ = ["check_target", "main"]


def _vllm_note(v: contract.Verdict) -> str | None:
    if v.vllm_accepts is None or v.vllm_accepts == v.ok:
        return None
    if v.vllm_accepts:
        return ("vLLM's check (a parameter named kv_cache_config, or **kwargs) would accept this class; "
                "its construction cls(config, role, kv_cache_config) would then fail with a TypeError")
    return ("vLLM's check would reject this class (it looks for a parameter named kv_cache_config), "
            "though the engine's call would work: name the third parameter kv_cache_config")


def check_target(target: str) -> dict[str, Any]:
    """The verdict for ``MODULE:CLASS`` as a plain dict."""
    module, sep, attr = target.partition(":")
    out: dict[str, Any] = {"target": target, "module": module, "class": attr}
    if not sep or not module or not attr:
        return {**out, "verdict": "usage", "ok": False, "message": f"{target!r} is not MODULE:CLASS",
                "fix": "write it as my_pkg.my_module:MyConnector"}
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # the module does not import: that is the verdict
        from kvconf.contract.static import is_vllm_missing, static_class

        stand_in = static_class(module, attr) if is_vllm_missing(exc) else None
        if stand_in is not None:  # a connector written for vLLM, on a machine without vLLM
            return _verdict(out, contract.check(stand_in, attr))
        return {**out, "verdict": "import_error", "ok": False,
                "message": f"importing {module!r} failed: {type(exc).__name__}: {exc}",
                "fix": "make the module importable (installed, or its folder on PYTHONPATH) without side effects"}
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            classes = sorted(n for n, v in vars(mod).items() if isinstance(v, type) and v.__module__ == mod.__name__)
            return {**out, "verdict": "missing_class", "ok": False,
                    "message": f"{module!r} has no attribute {attr!r}",
                    "fix": "classes defined there: " + (", ".join(classes) or "none")}
        obj = getattr(obj, part)
    return _verdict(out, contract.check(obj, attr))


def _verdict(out: dict[str, Any], v: contract.Verdict) -> dict[str, Any]:
    return {**out, "verdict": v.verdict, "ok": v.ok, "message": v.message, "signature": v.signature,
            "location": v.location, "fix": None if v.ok else v.fix, "vllm_accepts": v.vllm_accepts,
            "vllm_differs": _vllm_note(v), "base": v.base, "details": list(v.details)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvconf check-connector", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="+", metavar="MODULE:CLASS")
    p.add_argument("--format", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    results = [check_target(t) for t in args.targets]
    if any(r["verdict"] == "usage" for r in results):
        for r in results:
            if r["verdict"] == "usage":
                print(f"kvconf check-connector: {r['message']}; {r['fix']}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"ok": all(r["ok"] for r in results), "results": results}))
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['target']}: {r['verdict']}: {r['message']}")
            if r.get("signature"):
                print(f"     signature: {r['class'].split('.')[-1]}{r['signature']}")
            if r.get("fix"):
                print(f"     fix: {r['fix']}")
            for d in r.get("details") or ():
                print(f"     note: {d}")
            if r.get("vllm_differs"):
                print(f"     note: {r['vllm_differs']}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``kvconf lint`` of a ``--kv-transfer-config`` that runs kvconf's plug-in (``kvconf.vllm``): the
connector tree inside gets kvconf's checks, each problem at its path in the JSON."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from kvconf.errors import MISSING

__all__ = ["Finding", "is_plugin", "plugin_findings"]

Finding = tuple[tuple[Any, ...], Any, str, Optional[str], Optional[str]]
"""(path in the JSON, value, what is wrong, fix, severity or None)."""

EXTRA = "kv_connector_extra_config"


def is_plugin(data: dict[str, Any]) -> bool:
    """Whether a KVTransferConfig runs a kvconf connector through kvconf's plug-in."""
    from kvconf.runtime.export import PLUGIN_CLASS, PLUGIN_MODULE

    return data.get("kv_connector") == PLUGIN_CLASS and data.get("kv_connector_module_path") == PLUGIN_MODULE


def plugin_findings(data: dict[str, Any], at: tuple[Any, ...], import_modules: bool) -> Iterable[Finding]:
    """kvconf's checks of the connector tree the plug-in is given (those vLLM's config validation
    would stop with): the tree validated, its class resolved and its contract checked. A tree
    naming a module of one's own is read only with ``--import-modules`` (resolving runs its code)."""
    if not is_plugin(data):
        return
    from types import SimpleNamespace

    from kvconf.errors import KVConfError
    from kvconf.runtime.export import PLUGIN_TREE_KEY
    from kvconf.vllm.tree import check_tree, connector_tree

    extra = data.get(EXTRA)
    try:
        tree = connector_tree(extra if extra is not None else {})
        if tree.get("module_path") and not import_modules:
            yield ((*at, EXTRA, PLUGIN_TREE_KEY, "module_path"), tree["module_path"], "the tree's class (module "
                   f"{tree['module_path']}) was not checked: importing runs the module's code",
                   "pass --import-modules to check it", "note")
            return
        transfer = SimpleNamespace(kv_role=data.get("kv_role"),
                                   kv_load_failure_policy=data.get("kv_load_failure_policy", "fail"))
        check_tree(tree, "worker", transfer, None)
    except KVConfError as exc:
        for p in exc.problems:
            parts = p.path.split(".") if p.path else []
            if parts[:1] == ["connector"]:
                where = (*at, EXTRA, PLUGIN_TREE_KEY, *parts[1:])
            elif parts[:1] == [EXTRA]:
                where = (*at, *parts)
            else:
                where = (*at, EXTRA)
            yield (where, None if p.value is MISSING else p.value, p.message + (
                f" (did you mean {p.suggestion()}?)" if p.suggestion() else ""), p.fix, None)

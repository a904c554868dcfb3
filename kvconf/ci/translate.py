"""vLLM's KVTransferConfig in kvconf's terms: which built-in connector stands for a vLLM
connector, how its ``kv_connector_extra_config`` keys map onto that connector's ``extra``
settings, and which values kvconf's connector model rejects. ``kvconf import`` and ``kvconf lint``
both use it; it imports only the connector named, never torch or vLLM.
"""

from __future__ import annotations

from typing import Any

from kvconf.config.vllm import kvconf_keys

__all__ = ["ImportFailure", "builtin", "extra_problems", "to_number", "translate"]


class ImportFailure(Exception):
    """The JSON has no kvconf counterpart: why."""


def builtin(vllm_name: str) -> tuple[str, type] | None:
    from kvconf.contract import registry

    ours = registry.builtin_for_vllm(vllm_name)
    if ours is None:
        return None
    return ours, registry.resolve(ours, None).target


def to_number(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def extra_problems(vllm_name: str, extra: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(vLLM key, message, kvconf-only)`` for each extra value kvconf's connector of this kind
    rejects; ``kvconf-only`` marks a value outside a choice kvconf's connector has and vLLM's may not
    (a Mooncake protocol kvconf cannot run). Keys kvconf does not read, and missing keys, are other
    entries' business."""
    found = builtin(vllm_name)
    if found is None:
        return []
    _, cls = found
    model = getattr(cls, "extra_config", None)
    back: dict[str, str] = getattr(cls, "vllm_extra_keys", {})
    mapped = kvconf_keys(back)
    if model is None or not mapped:
        return []
    from pydantic import ValidationError

    data = {mapped[k]: to_number(v) for k, v in extra.items() if k in mapped}
    try:
        model.model_validate(data)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            key = err["loc"][0] if err["loc"] else None
            if err["type"] == "missing" or key not in back:
                continue
            out.append((back[key], err["msg"], err["type"] == "literal_error"))
        return out
    return []


def translate(ktc: dict[str, Any]) -> dict[str, Any]:
    """kvconf's connector node for vLLM's KVTransferConfig ``ktc`` (a linted one). kvconf's plug-in
    carries kvconf's own tree: that tree is the node."""
    from kvconf.runtime.export import PLUGIN_CLASS, PLUGIN_MODULE, PLUGIN_TREE_KEY

    if ktc.get("kv_connector") == PLUGIN_CLASS and ktc.get("kv_connector_module_path") == PLUGIN_MODULE:
        tree = (ktc.get("kv_connector_extra_config") or {}).get(PLUGIN_TREE_KEY)
        if not isinstance(tree, dict):
            raise ImportFailure("kvconf's plug-in composes its connector from overrides here (kvconf_overrides): "
                                "there is no tree to import; run python -m kvconf with those overrides instead")
        return dict(tree)
    name = ktc.get("kv_connector")
    module_path = ktc.get("kv_connector_module_path")
    extra_in = dict(ktc.get("kv_connector_extra_config") or {})
    node: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    if module_path:
        node.update(name=name, module_path=module_path)
        extra = extra_in  # an external connector takes its extra settings as they are
    else:
        found = builtin(str(name))
        if found is None:
            from kvconf.contract.registry import vllm_names

            raise ImportFailure(f"kvconf has no counterpart of vLLM's {name}; it runs "
                                + ", ".join(f"{v} (as {k})" for k, v in sorted(vllm_names().items())))
        ours, cls = found
        node["name"] = ours
        mapped = kvconf_keys(getattr(cls, "vllm_extra_keys", {}))
        for key, value in extra_in.items():
            if ours == "multi" and key == "connectors":
                extra["connectors"] = [translate(child) for child in value]
            elif key in mapped:
                extra[mapped[key]] = to_number(value)
            else:
                passthrough[key] = value
        if name in ("NixlPullConnector", "NixlPushConnector"):
            extra["mode"] = "push" if name == "NixlPushConnector" else "pull"
    node["kv_role"] = ktc.get("kv_role")
    for key in ("engine_id", "kv_buffer_device", "kv_port", "kv_load_failure_policy", "enable_permute_local_kv"):
        if key in ktc:
            node[key] = ktc[key]
    if "kv_port" in node:  # linted: an int, a whole float, or a numeric string ("30000", which vLLM takes)
        node["kv_port"] = int(node["kv_port"])
    if extra:
        node["extra"] = extra
    if passthrough:
        node["vllm_extra_config"] = passthrough
    return node

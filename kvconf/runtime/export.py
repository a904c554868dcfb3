"""``action=export``: the connector config as the JSON vLLM takes in ``--kv-transfer-config``.

Field names are vLLM's ``KVTransferConfig`` (``vllm/config/kv_transfer.py``, which forbids any
other key). A connector that vLLM has a counterpart of
(:class:`~kvconf.contract.capabilities.ExportsToVLLM`) is named by vLLM's registered name, and its
``extra`` settings are mapped to the ``kv_connector_extra_config`` keys vLLM's connector reads. An
external connector keeps its class name and module path.
"""

from __future__ import annotations

from typing import Any, Optional

from kvconf.config.models import ConnectorConfig, validate_extra
from kvconf.contract.capabilities import ExportsToVLLM
from kvconf.errors import ConfigError, Problem

__all__ = ["PLUGIN_CLASS", "plugin_refuses", "PLUGIN_EXTRA_KEYS", "PLUGIN_MODULE", "PLUGIN_TREE_KEY", "VLLM_FIELDS", "to_plugin",
           "to_vllm"]

PLUGIN_CLASS = "KVConfConnector"
"""vLLM's ``kv_connector`` for kvconf's plug-in (:mod:`kvconf.vllm`)."""
PLUGIN_MODULE = "kvconf.vllm"
"""vLLM's ``kv_connector_module_path`` for kvconf's plug-in."""
PLUGIN_TREE_KEY = "kvconf_connector"
"""``kv_connector_extra_config`` key of the plug-in's inline connector tree."""
PLUGIN_OVERRIDES_KEY = "kvconf_overrides"
"""``kv_connector_extra_config`` key of the overrides the plug-in composes the tree from."""
PLUGIN_CONFIG_DIR_KEY = "kvconf_config_dir"
"""``kv_connector_extra_config`` key of a config directory searched when composing."""
PLUGIN_EXTRA_KEYS = (PLUGIN_TREE_KEY, PLUGIN_OVERRIDES_KEY, PLUGIN_CONFIG_DIR_KEY)
"""Every key the plug-in reads from ``kv_connector_extra_config``."""

VLLM_FIELDS = ("kv_connector", "engine_id", "kv_buffer_device", "kv_role", "kv_port",
               "kv_connector_extra_config", "kv_connector_module_path", "enable_permute_local_kv",
               "kv_load_failure_policy")
"""Every top-level key vLLM's KVTransferConfig accepts (it forbids any other)."""


def to_vllm(connector: ConnectorConfig, cls: Any) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` for this connector."""
    exports = isinstance(cls, type) and issubclass(cls, ExportsToVLLM)
    out: dict[str, Any] = {}
    if connector.module_path is not None:
        out["kv_connector"] = connector.name
        out["kv_connector_module_path"] = connector.module_path
    elif exports:
        out["kv_connector"] = cls.vllm_name
    else:
        raise ConfigError(Problem(
            "connector.name", f"the {connector.name} connector has no vLLM counterpart to export", value=connector.name,
            fix="export mooncake, offloading or shared_storage, or a connector given by connector.module_path"))
    out["kv_role"] = connector.kv_role
    if connector.engine_id_given:
        out["engine_id"] = connector.engine_id
    if connector.kv_buffer_device is not None:
        out["kv_buffer_device"] = connector.kv_buffer_device
    if connector.kv_port != ConnectorConfig.model_fields["kv_port"].default:
        out["kv_port"] = connector.kv_port
    out["kv_load_failure_policy"] = connector.kv_load_failure_policy
    if connector.enable_permute_local_kv:
        out["enable_permute_local_kv"] = True
    extra = validate_extra(getattr(cls, "extra_config", None), connector.extra)
    plain = extra.model_dump() if hasattr(extra, "model_dump") else dict(extra)
    out["kv_connector_extra_config"] = {**(cls.vllm_extra_config(extra) if exports else plain),
                                        **connector.vllm_extra_config}
    assert set(out) <= set(VLLM_FIELDS)
    return out


def plugin_refuses(cls: Any, name: Any, connector: Optional[dict[str, Any]] = None,
                   path: str = "connector") -> Optional[Problem]:
    """Why the plug-in does not run connector class ``cls`` in vLLM, or None: a peer-to-peer
    connector (mooncake, nixl) runs alone, not as a child of a multi connector (its
    ``kv_transfer_params`` and held blocks are not merged with another child's)."""
    from kvconf.contract.capabilities import SupportsServe

    kids = getattr(cls, "child_classes", None)
    if connector is not None and callable(kids):
        for i, (child, child_cls) in enumerate(kids(connector)):
            if isinstance(child_cls, type) and issubclass(child_cls, SupportsServe):
                where = f"{path}.extra.connectors.{i}"
                given = ((connector.get("extra") or {}).get("connectors") or [None] * (i + 1))[i]
                child_name = (given.get("name") if isinstance(given, dict) else None) or (
                    child.get("name") if isinstance(child, dict) else getattr(child, "name", None)) or child_cls.__name__
                return Problem(f"{where}.name", f"the {child_name} connector moves KV between a prefill and a decode "
                               "instance; the plug-in runs it alone, not inside a multi connector",
                               value=child_name, allowed=["example", "offloading", "shared_storage"],
                               fix=f"run connector={child_name} on its own in vLLM, or drop it from the multi connector")
    return None


def to_plugin(connector: ConnectorConfig, cls: Any) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` that runs this kvconf connector in vLLM through kvconf's
    plug-in: the validated tree (the connector's ``extra`` with its defaults filled in) in
    ``kv_connector_extra_config``, ``kv_role`` and ``kv_load_failure_policy`` at vLLM's top level
    too (vLLM acts on those itself). An engine id is written only where the config gave one: each
    vLLM instance otherwise makes its own."""
    refused = plugin_refuses(cls, connector.name, connector.model_dump())
    if refused is not None:
        raise ConfigError(refused)
    extra = validate_extra(getattr(cls, "extra_config", None), connector.extra)
    tree = connector.model_dump(mode="json")
    tree["extra"] = extra.model_dump(mode="json") if hasattr(extra, "model_dump") else dict(extra)
    if not connector.engine_id_given:
        tree["engine_id"] = None
    out: dict[str, Any] = {"kv_connector": PLUGIN_CLASS, "kv_connector_module_path": PLUGIN_MODULE,
                           "kv_role": connector.kv_role, "kv_load_failure_policy": connector.kv_load_failure_policy}
    if connector.engine_id_given:
        out["engine_id"] = connector.engine_id
    if connector.kv_buffer_device is not None:
        out["kv_buffer_device"] = connector.kv_buffer_device
    out["kv_connector_extra_config"] = {PLUGIN_TREE_KEY: tree}
    assert set(out) <= set(VLLM_FIELDS)
    return out

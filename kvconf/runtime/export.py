"""``action=export``: the connector config as the JSON vLLM takes in ``--kv-transfer-config``.

Field names are vLLM's ``KVTransferConfig`` (``vllm/config/kv_transfer.py``, which forbids any
other key). A connector that vLLM has a counterpart of
(:class:`~kvconf.contract.capabilities.ExportsToVLLM`) is named by vLLM's registered name, and its
``extra`` settings are mapped to the ``kv_connector_extra_config`` keys vLLM's connector reads. An
external connector keeps its class name and module path.
"""

from __future__ import annotations

from typing import Any

from kvconf.config.models import ConnectorConfig, validate_extra
from kvconf.contract.capabilities import ExportsToVLLM
from kvconf.errors import ConfigError, Problem

__all__ = ["VLLM_FIELDS", "to_vllm"]

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

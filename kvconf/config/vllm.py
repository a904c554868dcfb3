"""vLLM's ``--kv-transfer-config`` as data: what vLLM 0.32 accepts, what it renamed or removed, and
which ``kv_connector_extra_config`` keys each of its connectors reads.

Sources (vLLM 0.32, paths under ``vllm/``):

- ``config/kv_transfer.py``: ``KVTransferConfig``, a pydantic dataclass with ``extra="forbid"``:
  the nine fields of :data:`TRANSFER_FIELDS`; a connector without ``kv_role`` is a ValueError.
- ``distributed/kv_transfer/kv_connector/factory.py``: the registered names
  (:data:`VLLM_CONNECTORS`); any other name without ``kv_connector_module_path`` fails with
  "Unsupported connector type" when the class is resolved.
- each connector's source (``distributed/kv_transfer/kv_connector/v1/...``): the extra keys it
  reads (:data:`EXTRA_KEYS`); vLLM ignores every other key silently.

This module is data and small lookups; it imports nothing beyond the standard library, so
``kvconf lint`` and the config layer can use it for free.

>>> vllm_spelling("protocol", "MooncakeConnector")
'mooncake_protocol'
>>> kvconf_spelling("kv_connector_extra_config")
'extra'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvconf.errors import Problem

__all__ = [
    "ALIASES",
    "EXTRA_KEYS",
    "KV_ROLES",
    "LOAD_FAILURE_POLICIES",
    "MISSPELLINGS",
    "REMOVED_CONNECTORS",
    "REMOVED_FIELDS",
    "RENAMED_CONNECTORS",
    "REQUIRED",
    "TRANSFER_CONNECTORS",
    "TRANSFER_FIELDS",
    "VLLM_CONNECTORS",
    "VLLM_VERSION",
    "ExtraTable",
    "Removed",
    "explain",
    "kvconf_keys",
    "kvconf_spelling",
    "vllm_extra_problems",
    "vllm_spelling",
]

VLLM_VERSION = "0.32"
"""The vLLM release these tables were taken from."""

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
"""Default of a key that has none (the connector fails without it)."""

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
LOAD_FAILURE_POLICIES = ("fail", "recompute")
BUFFER_DEVICES = ("cuda", "cpu", "xpu")

TRANSFER_FIELDS: dict[str, Any] = {
    "kv_connector": None,
    "engine_id": None,
    "kv_buffer_device": None,
    "kv_role": None,
    "kv_port": 14579,
    "kv_connector_extra_config": {},
    "kv_connector_module_path": None,
    "enable_permute_local_kv": False,
    "kv_load_failure_policy": "fail",
}
"""Every key of vLLM's ``KVTransferConfig`` and its default (``kv_buffer_device`` defaults to the
platform's device type, given here as None). It forbids any other key."""

VLLM_CONNECTORS = (
    "ExampleConnector", "ExampleHiddenStatesConnector", "LMCacheConnectorV1", "LMCacheMPConnector",
    "NixlConnector", "NixlPullConnector", "NixlPushConnector", "MultiConnector", "HiSparseConnector",
    "MoRIIOConnector", "OffloadingConnector", "DecodeBenchConnector", "MooncakeConnector",
    "MooncakeStoreConnector", "FlexKVConnectorV1", "SimpleCPUOffloadConnector", "HF3FSKVConnector",
)
"""The names vLLM's connector factory registers (``factory.py``)."""

TRANSFER_CONNECTORS = ("NixlConnector", "MooncakeConnector", "MoRIIOConnector")
"""vLLM's connectors that move KV between a prefill and a decode instance."""


@dataclass(frozen=True)
class Removed:
    """A name vLLM no longer accepts, and what took its place."""

    replacement: str | None
    """The name to use instead, where one name replaces it."""
    advice: str
    """What to do, in a sentence."""
    source: str
    """Where vLLM records the change."""


RENAMED_CONNECTORS: dict[str, Removed] = {
    "SharedStorageConnector": Removed(
        "ExampleConnector", "vLLM renamed it ExampleConnector (same key: shared_storage_path)",
        "vLLM PR #30201; issue #49399"),
    "LMCacheConnector": Removed(
        "LMCacheConnectorV1", "that was the V0 engine's LMCache connector; the V1 engine's is LMCacheConnectorV1",
        "LMCache/LMCache#638"),
}
"""Connector names vLLM renamed: the old name fails with "Unsupported connector type"."""

REMOVED_CONNECTORS: dict[str, Removed] = {
    name: Removed(None, "vLLM removed the P2P NCCL connectors; prefill-to-decode transfer is done by "
                  + ", ".join(TRANSFER_CONNECTORS), "vLLM v0.12 release; issue #11490")
    for name in ("P2pNcclConnector", "PyNcclConnector")
}
"""Connector names vLLM removed without a one-to-one successor."""

REMOVED_FIELDS: dict[str, Removed] = {
    "kv_rank": Removed(None, "the P2P NCCL connectors' rank; a connector's ranks now come from the engine's "
                       "tensor- and pipeline-parallel ranks: drop it, and set kv_role for the data direction",
                       "vLLM issue #11490"),
    "kv_parallel_size": Removed(None, "P/D instances are paired per request by the proxy (kv_transfer_params), "
                                "not by a fixed group size: drop it", "vLLM issue #11490"),
    "kv_ip": Removed(None, "the side channel's address is each connector's own setting: "
                     "VLLM_NIXL_SIDE_CHANNEL_HOST for NixlConnector, kv_connector_extra_config."
                     "bootstrap_server_address for MooncakeConnector: drop it", "vLLM issue #11490"),
    "kv_buffer_size": Removed(None, "the PyNccl transfer buffer is gone; a host tier is sized by "
                              "kv_connector_extra_config.cpu_bytes_to_use (OffloadingConnector): drop it",
                              "vLLM v0.12 KVTransferConfig"),
}
"""``KVTransferConfig`` fields vLLM removed after v0.12: JSON carrying them now fails validation."""


@dataclass(frozen=True)
class ExtraTable:
    """The ``kv_connector_extra_config`` keys one of vLLM's connectors reads, with their defaults."""

    keys: dict[str, Any]
    source: str
    retired: dict[str, str] = field(default_factory=dict)
    """Keys it no longer reads -> what replaced them."""
    integers: frozenset[str] = frozenset()
    """Required keys that take an integer (a key with a default takes its default's type)."""

    def integer(self, key: str) -> bool:
        """Whether vLLM's connector reads ``key`` as an integer (a byte count, a count)."""
        default = self.keys.get(key)
        return key in self.integers or (isinstance(default, int) and not isinstance(default, bool))


_NIXL = ExtraTable(
    {"backends": ["UCX"], "num_threads": 4, "kv_lease_duration": 30, "kv_recompute_threshold": 64,
     "bidirectional_kv_xfer": False, "decoder_kv_blocks_ttl": 480, "engine_ttl": 3600,
     "enforce_handshake_compat": True, "push_registration_timeout": None},
    "distributed/kv_transfer/kv_connector/v1/nixl/")

EXTRA_KEYS: dict[str, ExtraTable] = {
    "MooncakeConnector": ExtraTable(
        {"mooncake_protocol": "rdma", "device_name": "", "num_workers": 10, "bootstrap_server_address": None},
        "distributed/kv_transfer/kv_connector/v1/mooncake/mooncake_connector.py"),
    "NixlConnector": _NIXL,
    "NixlPullConnector": _NIXL,
    "NixlPushConnector": _NIXL,
    "OffloadingConnector": ExtraTable(
        {"spec_name": "CPUOffloadingSpec", "spec_module_path": None, "cpu_bytes_to_use": REQUIRED,
         "block_size": None, "blocks_per_chunk": 1, "eviction_policy": "lru", "cache_policy_module_path": None,
         "store_threshold": 0, "max_tracker_size": 64000, "offload_prompt_only": True,
         "canonical_layout": False, "self_describing_kv_events": False, "secondary_tiers": None,
         "backpressure": None},
        "distributed/kv_transfer/kv_connector/v1/offloading_connector.py, v1/kv_offload/",
        retired={"num_cpu_blocks": "cpu_bytes_to_use (bytes across all workers; vLLM PR #24498)"},
        integers=frozenset({"cpu_bytes_to_use", "block_size"})),
    "SimpleCPUOffloadConnector": ExtraTable(
        {"cpu_bytes_to_use": 8 << 30, "cpu_bytes_to_use_per_rank": None, "lazy_offload": False,
         "kv_offload_backend": "cpu", "disk_path": None, "disk_capacity_bytes": 100 << 30,
         "disk_buffer_slots": None, "use_page_cache": None},
        "distributed/kv_transfer/kv_connector/v1/simple_cpu_offload_connector.py"),
    "ExampleConnector": ExtraTable(
        {"shared_storage_path": "/tmp"}, "distributed/kv_transfer/kv_connector/v1/example_connector.py"),
    "MultiConnector": ExtraTable(
        {"connectors": REQUIRED}, "distributed/kv_transfer/kv_connector/v1/multi_connector.py"),
    "LMCacheMPConnector": ExtraTable(
        {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": 5555, "lmcache.mp.mq_timeout": 300,
         "lmcache.mp.heartbeat_interval": 10},
        "distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py",
        retired={"lmcache_mp_server_url": "lmcache.mp.host and lmcache.mp.port (LMCache/LMCache#4267)"}),
}
"""vLLM connector name -> the extra keys it reads. Connectors not listed (LMCacheConnectorV1, which
hands its settings to LMCache, and the rest) are not checked key by key."""

ALIASES: tuple[tuple[str, str, str], ...] = (
    ("", "kv_connector", "name"),
    ("", "kv_connector_module_path", "module_path"),
    ("", "kv_connector_extra_config", "extra"),
    ("MooncakeConnector", "mooncake_protocol", "protocol"),
)
"""``(scope, vLLM's spelling, kvconf's spelling)`` of one setting: scope ``""`` is the top level of
the JSON (kvconf's ``connector`` node), a connector name its extra keys. Used both ways: a kvconf
spelling in a vLLM JSON, and a vLLM spelling in a kvconf config, are each told the other."""

MISSPELLINGS: dict[str, str] = {
    "kv_extra_config": "kv_connector_extra_config",
    "extra_config": "kv_connector_extra_config",
    "kv_connector_config": "kv_connector_extra_config",
    "connector_extra_config": "kv_connector_extra_config",
    "kv_connector_name": "kv_connector",
    "connector": "kv_connector",
    "kv_connector_module": "kv_connector_module_path",
    "module": "kv_connector_module_path",
    "role": "kv_role",
    "kv_connector_role": "kv_role",
    "kv_load_failure": "kv_load_failure_policy",
    "load_failure_policy": "kv_load_failure_policy",
}
"""Top-level keys seen in the wild for a KVTransferConfig field (vLLM PR #15960's first example used
``kv_extra_config``); a role value used as a key is told apart by the linter."""


def vllm_spelling(key: str, scope: str = "") -> str | None:
    """vLLM's name for kvconf's ``key`` in ``scope`` (see :data:`ALIASES`), or None."""
    return next((v for s, v, k in ALIASES if s == scope and k == key), None)


def kvconf_spelling(key: str, scope: str = "") -> str | None:
    """kvconf's name for vLLM's ``key`` in ``scope``, or None."""
    return next((k for s, v, k in ALIASES if s == scope and v == key), None)


# ---- kvconf's config told in vLLM's terms --------------------------------------------------------


def kvconf_keys(mapped: dict[str, str]) -> dict[str, str]:
    """vLLM's ``kv_connector_extra_config`` key -> kvconf's ``connector.extra`` key, the reverse of a
    connector's ``vllm_extra_keys`` (``mapped``: kvconf key -> vLLM key).

    >>> kvconf_keys({"protocol": "mooncake_protocol"})
    {'mooncake_protocol': 'protocol'}
    """
    return {v: k for k, v in mapped.items()}


def vllm_extra_problems(vllm_name: str | None, connector: dict[str, Any],
                        mapped: dict[str, str]) -> list[Problem]:
    """Problems with ``connector.vllm_extra_config``: a key vLLM's connector ``vllm_name`` does not
    read, or one that kvconf's connector reads itself under ``connector.extra`` (``mapped``: kvconf
    key -> vLLM key)."""
    given = connector.get("vllm_extra_config") or {}
    if not isinstance(given, dict) or not given:
        return []
    if vllm_name is None:
        return [Problem("connector.vllm_extra_config", f"the {connector.get('name')} connector has no vLLM "
                        "counterpart to pass these keys to", value=sorted(given),
                        fix="remove connector.vllm_extra_config, or put the settings under connector.extra")]
    table = EXTRA_KEYS.get(vllm_name)
    ours = kvconf_keys(mapped)
    out = []
    for key in given:
        path = f"connector.vllm_extra_config.{key}"
        if key in ours:
            out.append(Problem(path, f"kvconf's connector reads {key!r} itself, as connector.extra.{ours[key]}",
                               value=given[key], fix=f"set connector.extra.{ours[key]} instead"))
        elif table is not None and key not in table.keys:
            out.append(Problem(path, f"vLLM's {vllm_name} does not read {key!r} (it ignores unknown keys)",
                               allowed=sorted(set(table.keys) - set(ours)), typo=key,
                               fix="remove it or correct its spelling"))
    return out


def explain(problem: Problem, vllm_name: str | None, mapped: dict[str, str]) -> Problem:
    """``problem`` told in vLLM's terms where the key is vLLM's: an unknown ``connector.KEY`` that is
    vLLM's spelling or a field vLLM removed, an unknown ``connector.extra.KEY`` that is vLLM's
    spelling of a kvconf setting or a key only vLLM's connector reads."""
    from dataclasses import replace

    if not problem.message.startswith("unknown key"):
        return problem
    parts = problem.path.split(".")
    if len(parts) == 2 and parts[0] == "connector":
        key = parts[1]
        ours = kvconf_spelling(key) or {"kv_connector_extra_config": "extra"}.get(MISSPELLINGS.get(key, ""))
        if ours is not None:
            return replace(problem, message=f"{key!r} is vLLM's spelling; kvconf calls it connector.{ours}",
                           fix=f"write connector.{ours}", allowed=None)
        if key in KV_ROLES:
            return replace(problem, message=f"{key!r} is a kv_role value, written as a key", allowed=None,
                           fix=f"write connector.kv_role={key} (the data direction), and remove connector.{key}")
        gone = REMOVED_FIELDS.get(key)
        if gone is not None:
            return replace(problem, message=f"vLLM removed {key!r} from its KVTransferConfig: {gone.advice}",
                           fix=f"remove connector.{key}", allowed=None)
    if len(parts) == 3 and parts[:2] == ["connector", "extra"] and vllm_name is not None:
        key = parts[2]
        ours = kvconf_keys(mapped).get(key)
        if ours is not None and ours != key:
            return replace(problem, message=f"{key!r} is vLLM's spelling; kvconf calls it connector.extra.{ours}",
                           fix=f"write connector.extra.{ours}", allowed=None)
        table = EXTRA_KEYS.get(vllm_name)
        if table is not None and key in table.keys:
            return replace(problem, message=f"kvconf's connector does not read {key!r}; vLLM's {vllm_name} does",
                           fix=f"to pass it to vLLM on export, set connector.vllm_extra_config.{key} instead",
                           allowed=None)
    return problem

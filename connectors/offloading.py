"""The offloading connector: KV blocks kept in a host-memory tier, reused on a prefix hit.

Settings and export are final (vLLM's OffloadingConnector names); the data path is tracked by
issue #4.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PositiveInt, field_validator, model_validator

from kvconf.units import parse_bytes

from ._unfinished import UnfinishedConnector

Lru = Literal["lru"]
EvictionPolicy = Literal[Lru]


class OffloadingExtra(BaseModel):
    """Settings of the offloading connector (vLLM's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_bytes_to_use: int | str
    """Host memory for offloaded blocks (``4GiB``, bytes); replaces vLLM's retired ``num_cpu_blocks``."""
    block_size: PositiveInt | None = None
    """Tokens per offload chunk, a multiple of the KV cache's block size; unset means the same."""
    eviction_policy: EvictionPolicy = "lru"
    """Which blocks go when the tier is full: the least recently used."""

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_cpu_blocks" in data:
            raise ValueError(
                "num_cpu_blocks was retired (vLLM PR #24498): give the tier's size in bytes with "
                "cpu_bytes_to_use instead, e.g. connector.extra.cpu_bytes_to_use=4GiB")
        return data

    @field_validator("cpu_bytes_to_use")
    @classmethod
    def _bytes(cls, v: int | str) -> int | str:
        if parse_bytes(v) <= 0:
            raise ValueError("cpu_bytes_to_use must be positive")
        return v


class OffloadingConnector(UnfinishedConnector):
    """Host-memory tier with LRU eviction."""

    extra_config = OffloadingExtra
    vllm_name = "OffloadingConnector"
    vllm_extra_keys = {"cpu_bytes_to_use": "cpu_bytes_to_use", "block_size": "block_size",
                       "eviction_policy": "eviction_policy"}
    issue = "issue #4"

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        out = super().vllm_extra_config(extra)
        out["cpu_bytes_to_use"] = parse_bytes(out["cpu_bytes_to_use"])
        return out

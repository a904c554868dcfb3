"""The shared_storage connector: KV blocks saved under a directory, loaded by a later process.

Settings and export are final (vLLM's ExampleConnector, formerly SharedStorageConnector); the data
path is tracked by issue #4.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from kvconf.units import parse_bytes

from ._unfinished import UnfinishedConnector


class SharedStorageExtra(BaseModel):
    """Settings of the shared_storage connector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shared_storage_path: str = "/tmp/kvconf_shared_storage"
    """Directory the blocks are saved under (vLLM's key)."""
    capacity: int | str | None = None
    """Most bytes kept under the directory; the oldest files go first. Unset: no limit."""

    @field_validator("capacity")
    @classmethod
    def _capacity(cls, v: int | str | None) -> int | str | None:
        if v is not None and parse_bytes(v) <= 0:
            raise ValueError("capacity must be positive")
        return v

    @field_validator("shared_storage_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("shared_storage_path cannot be empty")
        return v


class SharedStorageConnector(UnfinishedConnector):
    """Disk tier: a request's blocks in few large files."""

    extra_config = SharedStorageExtra
    vllm_name = "ExampleConnector"
    vllm_extra_keys = {"shared_storage_path": "shared_storage_path"}
    issue = "issue #4"

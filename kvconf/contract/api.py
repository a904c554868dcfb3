"""The types of vLLM's v1 connector API that a connector sees (``vllm/distributed/kv_transfer/
kv_connector/v1/base.py`` and the scheduler's request and output types), reduced to what kvconf's
engine fills in, with vLLM's names and meanings.

Imports neither torch nor pydantic: a contract check imports this for free.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "KVCacheBlocks",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "Request",
    "SchedulerOutput",
    "block_hashes",
]


class KVConnectorRole(enum.Enum):
    """Process side (vLLM's ``KVConnectorRole``); not the data direction, which is ``kv_role``."""

    SCHEDULER = 0
    WORKER = 1

    @classmethod
    def from_name(cls, name: str) -> KVConnectorRole:
        return cls[name.upper()]


class KVConnectorMetadata:
    """What the scheduler side tells the worker side for one step (vLLM's marker base class)."""


@dataclass
class Request:
    """The part of an engine request a connector sees."""

    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: Optional[dict[str, Any]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class KVCacheBlocks:
    """Block ids given to a request, one list per KV-cache group (vLLM's ``KVCacheBlocks``)."""

    blocks: tuple[list[int], ...]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return self.blocks


@dataclass
class SchedulerOutput:
    """The part of a scheduler step a connector sees."""

    scheduled_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids``: block ``i``'s hash covers every token up
    to the end of block ``i``, so two prompts that share a prefix share its block hashes.

    >>> a = block_hashes(list(range(40)), 16)
    >>> b = block_hashes(list(range(32)) + [7] * 8, 16)
    >>> len(a), a[:2] == b[:2]
    (2, True)
    """
    out, prev = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(b",".join(str(t).encode() for t in token_ids[start:start + block_size]))
        prev = h.digest()
        out.append(prev)
    return out

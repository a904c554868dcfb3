"""The types of vLLM's v1 connector API that a connector sees (``vllm/distributed/kv_transfer/
kv_connector/v1/base.py`` and the scheduler's request and output types), reduced to what kvconf's
engine fills in, with vLLM's names and meanings.

Imports neither torch nor pydantic: a contract check imports this for free.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "KVCacheBlocks",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "Request",
    "SchedulerOutput",
    "block_hashes",
    "prefix_digests",
    "token_bytes",
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
    """The part of an engine request a connector sees.

    Its prefix hashes (:meth:`prefix_hashes`) are computed once per block, as tokens arrive, and
    kept: a connector asks as often as it likes and a decode step that fills a block hashes that
    block alone, never the prompt again (vLLM keeps ``Request.block_hashes`` so).

    >>> r = Request("r", list(range(40)))
    >>> len(r.prefix_hashes(16)), r.hashed_blocks
    (2, 2)
    >>> r.append_output_token_ids(list(range(40, 48))); len(r.prefix_hashes(16)), r.hashed_blocks
    (3, 3)
    >>> r.prefix_hashes(16) == block_hashes(list(range(48)), 16)
    True
    """

    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: Optional[dict[str, Any]] = None
    output_token_ids: list[int] = field(default_factory=list)
    """Tokens generated so far (decode)."""
    num_computed_tokens: int = 0
    """Tokens whose KV is computed (the engine's count; set at ``request_finished``)."""
    aborted: bool = False
    """At ``request_finished``: the request was aborted (vLLM's FINISHED_ABORTED and the like), not
    stopped or capped: its blocks are freed, never kept for a decode."""
    hashed_blocks: int = field(default=0, init=False, compare=False)
    """Blocks hashed so far, for every block size asked: each full block once."""
    _tokens: Optional[list[int]] = field(default=None, init=False, repr=False, compare=False)
    _hashes: dict[int, list[bytes]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _hashers: dict[int, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Per block size: SHA-256 fed every full block so far (a new block costs its own bytes only)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        """A decode step's new tokens."""
        self.output_token_ids.extend(token_ids)
        if self._tokens is not None:
            self._tokens.extend(token_ids)

    def prefix_hashes(self, block_size: int) -> list[bytes]:
        """:func:`block_hashes` of every full block of ``block_size`` tokens so far (the list is
        kept and extended; do not change it)."""
        if self._tokens is None:
            self._tokens = self.prompt_token_ids + self.output_token_ids
        hashes = self._hashes.setdefault(block_size, [])
        full = len(self._tokens) // block_size
        if len(hashes) < full:
            data = token_bytes(self._tokens[len(hashes) * block_size:full * block_size])  # the new blocks only
            self.hashed_blocks += full - len(hashes)
            hasher = self._hashers.get(block_size)
            if hasher is None:
                hasher = self._hashers[block_size] = hashlib.sha256()
            hashes.extend(prefix_digests(hasher, data, block_size * 8))
        return hashes


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
    num_computed_tokens: Optional[dict[str, int]] = None
    """Per scheduled request, the tokens whose KV is in the cache once this step has run (vLLM:
    the request's computed tokens plus those scheduled now). None: the engine does not say, and
    every block a request was given is computed in its first step (kvconf's engine)."""
    new_block_ids: dict[str, tuple[list[int], ...]] = field(default_factory=dict)
    """Blocks given this step to requests scheduled before (a long prompt's later chunks), per group."""


def prefix_digests(hasher: Any, data: bytes, step: int) -> list[bytes]:
    """Feeds ``data`` to ``hasher`` (a :mod:`hashlib` object, kept by the caller) in ``step``-byte
    blocks and returns the digest after each: every block's bytes are hashed once, and each digest
    covers everything fed before it.

    >>> h = hashlib.sha256(b"ab"); prefix_digests(h, b"cdef", 2) == [hashlib.sha256(b"abcd").digest(),
    ...                                                              hashlib.sha256(b"abcdef").digest()]
    True
    """
    view = memoryview(data)
    out = []
    for at in range(0, len(data), step):
        hasher.update(view[at:at + step])
        out.append(hasher.copy().digest())
    return out


def token_bytes(token_ids: list[int]) -> bytes:
    """Token ids as 64-bit little-endian integers: what the prefix hashes cover."""
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """Prefix hashes of the full blocks of ``token_ids``: block ``i``'s hash is SHA-256 of the
    token ids (64-bit little-endian) from the first token to the end of block ``i``, so two prompts
    that share a prefix share its block hashes (as vLLM's chained prefix-caching hashes do; here one
    running SHA-256 computes them, each block's bytes hashed once).

    >>> a = block_hashes(list(range(40)), 16)
    >>> b = block_hashes(list(range(32)) + [7] * 8, 16)
    >>> len(a), a[:2] == b[:2], len(a[0])
    (2, True, 32)
    """
    full = len(token_ids) // block_size * block_size
    return prefix_digests(hashlib.sha256(), token_bytes(token_ids[:full]), block_size * 8)

"""kvconf's connector base: vLLM's v1 connector API, with the three-argument constructor.

A connector is constructed as ``cls(config, role, kv_cache_config)``, all three positional, and
passes ``kv_cache_config`` on to ``super().__init__()``. The scheduler side decides what to load
and save; the worker side moves the bytes. Method names and meanings follow vLLM's
``KVConnectorBase_V1`` (shared/reference/vllm-connectors.md, section 1), so a kvconf connector
reads like a vLLM one.

This module imports neither torch nor any engine: a contract check imports it for free.
"""

from __future__ import annotations

import enum
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydantic import BaseModel

    from .kvcache import KVCacheConfig
    from .schema import ConnectorConfig

__all__ = [
    "KVCacheBlocks",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "Request",
    "SchedulerOutput",
    "SelfTestContext",
    "block_hashes",
]


class KVConnectorRole(enum.Enum):
    """Process side (vLLM's ``KVConnectorRole``); not the data direction, which is ``kv_role``."""

    SCHEDULER = 0
    WORKER = 1

    @classmethod
    def from_name(cls, name: str) -> "KVConnectorRole":
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


_hard_exit = False


def request_hard_exit() -> None:
    """Says that this process must end with ``os._exit`` once its work is flushed: an engine loaded
    here crashes the interpreter's normal exit (NIXL's UCX backend segfaults in ``_dl_fini``).
    kvconf's command line and pytest plugin honour it; a library user calls ``os._exit`` after
    ``shutdown()``."""
    global _hard_exit
    _hard_exit = True


def hard_exit_requested() -> bool:
    return _hard_exit


@dataclass
class SelfTestContext:
    """What ``action=run`` and ``action=serve`` give a connector besides its KV caches."""

    settings: Any
    """The job's ``self_test`` settings."""
    data: dict[str, Any]
    """The whole composed config as plain data, to start a peer process with."""
    device: str
    output: str = "text"
    bench: Any = None
    """The job's ``bench`` settings (``action=bench``)."""
    prompt_blocks: Optional[int] = None
    """Blocks per request, where a benchmark sets them."""
    concurrency: Optional[int] = None
    """Requests per engine step (or in flight), where a benchmark sets them."""
    salt: int = 0
    """Varies the prompts (``action=bench`` repetitions: a persistent tier would otherwise hold
    every block from the first repetition on, and nothing would be saved again)."""


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


class KVConnectorBase(ABC):
    """Base of every kvconf connector; constructed as ``cls(config, role, kv_cache_config)``."""

    extra_config: ClassVar[Optional[type["BaseModel"]]] = None
    """The pydantic model of the connector's ``extra`` settings; ``None`` leaves them free-form."""
    vllm_name: ClassVar[Optional[str]] = None
    """The name vLLM registers the equivalent connector under (``MooncakeConnector``), if any."""
    vllm_extra_keys: ClassVar[dict[str, str]] = {}
    """``extra`` field -> key of vLLM's ``kv_connector_extra_config``, for ``action=export``."""
    can_serve: ClassVar[bool] = False
    """Whether ``action=serve`` (a long-lived producer for separate consumers) applies."""

    @classmethod
    def check_environment(cls, extra: Any, role: "KVConnectorRole") -> list[Any]:
        """Problems (``kvconf.errors.Problem``) with what the connector needs installed; checked
        with the contract, before anything is allocated. Default: none."""
        return []

    def __init__(self, config: "ConnectorConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        self._config = config
        self._role = role
        self._kv_cache_config = kv_cache_config
        self._connector_metadata: Optional[KVConnectorMetadata] = None
        extra_model = type(self).extra_config
        self._extra = extra_model.model_validate(config.extra) if extra_model is not None else dict(config.extra)

    # ---- properties --------------------------------------------------------------------------
    @property
    def role(self) -> KVConnectorRole:
        return self._role

    @property
    def config(self) -> "ConnectorConfig":
        return self._config

    @property
    def kv_cache_config(self) -> "KVCacheConfig":
        return self._kv_cache_config

    @property
    def extra(self) -> Any:
        """The validated ``extra`` settings (an instance of ``extra_config``, or a dict)."""
        return self._extra

    @property
    def is_producer(self) -> bool:
        return self._config.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self._config.kv_role in ("kv_consumer", "kv_both")

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        """Receives the allocated KV tensors, by layer name, once, before the first step."""

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    def _get_connector_metadata(self) -> KVConnectorMetadata:
        assert self._connector_metadata is not None, "no connector metadata is bound"
        return self._connector_metadata

    @abstractmethod
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Starts loading external KV into the paged buffer (may be asynchronous)."""

    @abstractmethod
    def wait_for_layer_load(self, layer_name: str) -> None:
        """Blocks until ``layer_name``'s KV has loaded."""

    @abstractmethod
    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Starts saving one layer's KV."""

    @abstractmethod
    def wait_for_save(self) -> None:
        """Blocks until this step's saves are done (or safely submitted)."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        """Request ids whose asynchronous sends and receives have finished."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call."""
        return set()

    def get_load_error_reasons(self) -> dict[int, str]:
        """kvconf: why each block in ``get_block_ids_with_load_errors`` failed (the file, the
        check that failed); call it first, as that call clears the errors."""
        return {}

    def shutdown(self) -> None:
        """Releases everything the connector holds."""

    # ---- scheduler side ----------------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        """Tokens the connector can provide beyond ``num_computed_tokens``, and whether the load is
        asynchronous. Must be free of side effects."""

    @abstractmethod
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Called after blocks were allocated for ``request``."""

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's metadata for the workers; resets the step's state."""

    def get_save_errors(self) -> dict[str, str]:
        """kvconf: request id -> why its blocks could not be saved, since the last call."""
        return {}

    def update_connector_output(self, finished_sending: set[str], finished_recving: set[str]) -> None:
        """Takes in what the workers reported this step (vLLM's ``update_connector_output``)."""

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        """Whether the request's blocks must stay allocated (an asynchronous save), and the
        ``kv_transfer_params`` to return with it."""
        return False, None

    # ---- kvconf --------------------------------------------------------------------------------
    def self_test(self, kv_caches: Optional[dict[str, "torch.Tensor"]], ctx: SelfTestContext) -> dict[str, Any]:
        """What ``action=run`` does once the connector is up: by default, kvconf's driver saves
        blocks with a known pattern through this connector, loads them back and verifies every byte."""
        from .driver import run_self_test

        shared = ctx.bench.shared_prefix if ctx.bench is not None else 0.5
        return run_self_test(self, kv_caches, ctx.settings, shared, salt=ctx.salt, blocks_per_request=ctx.prompt_blocks,
                             concurrency=ctx.concurrency or 1)

    def raw_path(self, kv_caches: Optional[dict[str, "torch.Tensor"]], ctx: SelfTestContext,
                 runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """``action=bench``: the raw path under this connector measured on the same bytes as
        ``runs`` (``{"path": what, "gbps": ...}``), or None where there is none to compare with."""
        return None

    def serve(self, kv_caches: Optional[dict[str, "torch.Tensor"]], ctx: SelfTestContext) -> dict[str, Any]:
        """What ``action=serve`` does: serve peers until SIGINT or SIGTERM (``can_serve`` connectors)."""
        raise NotImplementedError

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        """``kv_connector_extra_config`` for vLLM, from this connector's validated ``extra``."""
        data = extra.model_dump() if hasattr(extra, "model_dump") else dict(extra)
        if not cls.vllm_extra_keys:
            return data
        return {vk: data[k] for k, vk in cls.vllm_extra_keys.items() if data.get(k) is not None}

"""kvconf's connector base: vLLM's v1 connector API, with the three-argument constructor.

A connector is constructed as ``cls(config, role, kv_cache_config)``, all three positional, and
passes ``kv_cache_config`` on to ``super().__init__()``. The scheduler side decides what to load
and save; the worker side moves the bytes. Method names and meanings follow vLLM's
``KVConnectorBase_V1`` (``vllm/distributed/kv_transfer/kv_connector/v1/base.py``), so a kvconf
connector reads like a vLLM one. What kvconf adds beyond that API (its own self-test, serving,
export to vLLM, ...) are optional mixins in :mod:`kvconf.contract.capabilities`.

This module imports neither torch nor any engine: a contract check imports it for free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from kvconf.config.models import validate_extra

from .api import KVCacheBlocks, KVConnectorMetadata, KVConnectorRole, Request, SchedulerOutput

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydantic import BaseModel

    from kvconf.config.kvcache import KVCacheConfig
    from kvconf.config.models import ConnectorConfig

__all__ = ["KVConnectorBase"]


class KVConnectorBase(ABC):
    """Base of every kvconf connector; constructed as ``cls(config, role, kv_cache_config)``."""

    extra_config: ClassVar[Optional[type[BaseModel]]] = None
    """The pydantic model of the connector's ``extra`` settings; ``None`` leaves them free-form."""

    def __init__(self, config: ConnectorConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        self._config = config
        self._role = role
        self._kv_cache_config = kv_cache_config
        self._connector_metadata: Optional[KVConnectorMetadata] = None
        self._extra = validate_extra(type(self).extra_config, config.extra)

    # ---- properties --------------------------------------------------------------------------
    @property
    def role(self) -> KVConnectorRole:
        return self._role

    @property
    def config(self) -> ConnectorConfig:
        return self._config

    @property
    def kv_cache_config(self) -> KVCacheConfig:
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
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
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
    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
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

    def update_connector_output(self, finished_sending: set[str], finished_recving: set[str]) -> None:
        """Takes in what the workers reported this step (vLLM's ``update_connector_output``)."""

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        """Whether the request's blocks must stay allocated (an asynchronous save), and the
        ``kv_transfer_params`` to return with it."""
        return False, None

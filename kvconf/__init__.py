"""kvconf: declare, validate and start KV-cache connectors.

The public API is flat and cheap to import: no torch, no connector, no Hydra.
"""

from .connector import (
    KVCacheBlocks,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorRole,
    Request,
    SchedulerOutput,
)
from .errors import ConfigError, ConnectorRuntimeError, ContractError, KVConfError, Problem
from .kvcache import KVCacheConfig, KVCacheGroupSpec, KVCacheLayout, KVCacheTensor
from .schema import ConnectorConfig, KVConfConfig

__all__ = [
    "ConfigError",
    "ConnectorConfig",
    "ConnectorRuntimeError",
    "ContractError",
    "KVCacheBlocks",
    "KVCacheConfig",
    "KVCacheGroupSpec",
    "KVCacheLayout",
    "KVCacheTensor",
    "KVConfConfig",
    "KVConfError",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "Problem",
    "Request",
    "SchedulerOutput",
]

__version__ = "0.1.0"

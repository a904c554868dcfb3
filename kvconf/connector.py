"""Deprecated: moved to :mod:`kvconf.contract.api` (the API types), :mod:`kvconf.contract.base`
(``KVConnectorBase``), :mod:`kvconf.contract.capabilities` (``SelfTestContext`` and kvconf's
optional capabilities) and :mod:`kvconf.runtime.process` (``request_hard_exit``). This module
re-exports them for one release (see CHANGELOG.md); ``from kvconf import KVConnectorBase`` is the
lasting spelling.
"""

from kvconf.contract.api import (
    KVCacheBlocks,
    KVConnectorMetadata,
    KVConnectorRole,
    Request,
    SchedulerOutput,
    block_hashes,
)
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import SelfTestContext
from kvconf.runtime.process import hard_exit_requested, request_hard_exit

__all__ = [
    "KVCacheBlocks",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "Request",
    "SchedulerOutput",
    "SelfTestContext",
    "block_hashes",
    "hard_exit_requested",
    "request_hard_exit",
]

"""kvconf's optional connector capabilities, one small mixin each, as vLLM marks its own optional
capabilities (``SupportsHMA``): the base class carries vLLM's connector API only, and kvconf asks
``isinstance(connector, Capability)`` before it uses one.

=====================  ==========================================================================
mixin                  what a connector that has it adds
=====================  ==========================================================================
ChecksEnvironment      ``check_environment``: what it needs installed, checked before allocation
ExportsToVLLM          its vLLM name and ``kv_connector_extra_config`` keys, for ``action=export``
ExplainsFailures       why a block did not load or a request's blocks were not saved
SupportsSelfTest       its own ``action=run`` (else kvconf's engine drives it through save and load)
SupportsServe          ``action=serve``: a long-lived producer for consumers started separately
SupportsRawPath        its own raw path for ``action=bench`` (the bare engine under it)
ComparesToBaseline     a raw path that kvconf measures for it (a plain host copy, or raw file I/O)
SupportsHMA            vLLM's: several KV-cache groups (a hybrid model), each with its own block ids
ChecksConfig           settings beyond its ``extra`` model (a multi connector's children), checked first
ReportsListeners       the network addresses it listens on, and which of them are authenticated
KeepsStore             a store that outlives the process (a folder): ``action=bench`` gives it a fresh one
ColdLoads              files the OS caches: ``action=bench`` drops them before its load pass
=====================  ==========================================================================
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvconf.errors import Problem

    from .api import KVConnectorRole

__all__ = [
    "ChecksConfig",
    "ColdLoads",
    "KeepsStore",
    "ChecksEnvironment",
    "ComparesToBaseline",
    "ExplainsFailures",
    "ExportsToVLLM",
    "ReportsListeners",
    "SelfTestContext",
    "SupportsHMA",
    "SupportsRawPath",
    "SupportsSelfTest",
    "SupportsServe",
    "supports_hma",
]

KVCaches = Optional[dict[str, "torch.Tensor"]]


@dataclass
class SelfTestContext:
    """What ``action=run``, ``serve`` and ``bench`` give a connector besides its KV caches."""

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
    batch_steps: bool = False
    """Without ``concurrency``: schedule as many requests a step as the token budget holds, as
    vLLM's scheduler batches prefills (``action=bench``), rather than one a step (``action=run``:
    later requests then find the prefix earlier ones saved)."""
    min_seconds: float = 0.0
    """A two-process self-test goes on with more rounds until its transfers have taken this long
    (``action=bench``: each repetition then times ``bench.min_seconds`` of transfers with one peer
    process, not one round of a few milliseconds)."""
    salt: int = 0
    """Varies the prompts (``action=bench`` repetitions: a persistent tier would otherwise hold
    every block from the first repetition on, and nothing would be saved again)."""


class SupportsHMA(ABC):
    """vLLM's marker of a connector that handles a hybrid model's KV-cache groups: a request holds
    one list of block ids per group, and the groups' tensors may share one allocation, so a
    connector must move each layer's pages at its own group's block ids. For a connector without
    it, vLLM (and kvconf) disable the hybrid plan: sliding-window layers are planned as full
    attention, in one group."""

    @abstractmethod
    def request_finished_all_groups(self, request: Any,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, Optional[dict[str, Any]]]:
        """``request_finished`` with every group's block ids."""


def supports_hma(cls: Any) -> bool:
    """vLLM's ``supports_hma``: ``cls`` subclasses kvconf's :class:`SupportsHMA`, or vLLM's own
    (a connector written for vLLM; also when it was read from source)."""
    if getattr(cls, "__kvconf_hma__", False):
        return True
    return any(k is SupportsHMA or (k.__name__ == "SupportsHMA" and k.__module__.startswith("vllm."))
               for k in getattr(cls, "__mro__", ()))


class ChecksEnvironment(ABC):
    """A connector that needs something installed (an engine) checks it before anything is allocated."""

    @classmethod
    @abstractmethod
    def check_environment(cls, extra: Any, role: KVConnectorRole) -> list[Problem]:
        """Problems with what the connector needs for ``role``; empty when all is there."""


class ChecksConfig(ABC):
    """A connector whose config says more than its ``extra`` model checks (a multi connector's
    child connectors): checked with the rest of the config, before anything is constructed."""

    @classmethod
    @abstractmethod
    def config_problems(cls, connector: dict[str, Any], kv_cache_config: Any = None) -> list[Problem]:
        """Problems with ``connector`` (the connector node as plain data), with their config paths;
        ``kv_cache_config`` is the job's plan where it validated (None otherwise)."""

    @classmethod
    def supports_hma_config(cls, connector: dict[str, Any]) -> bool:
        """Whether this connector, so configured, handles hybrid KV-cache groups (vLLM's
        ``supports_hma_config``: a multi connector does when every child does)."""
        return supports_hma(cls)


class ExportsToVLLM:
    """A connector that vLLM has a counterpart of: ``action=export`` names it and maps its settings."""

    vllm_name: ClassVar[str]
    """The name vLLM registers the equivalent connector under (``MooncakeConnector``)."""
    vllm_extra_keys: ClassVar[dict[str, str]] = {}
    """``extra`` field -> key of vLLM's ``kv_connector_extra_config``; empty: every field as is."""
    vllm_differences: ClassVar[tuple[str, ...]] = ()
    """Where this connector behaves differently from vLLM's of the same name (``action=export``
    says so, beside the JSON)."""

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        """``kv_connector_extra_config`` for vLLM, from this connector's validated ``extra``."""
        data = extra.model_dump() if hasattr(extra, "model_dump") else dict(extra)
        if not cls.vllm_extra_keys:
            return data
        return {vk: data[k] for k, vk in cls.vllm_extra_keys.items() if data.get(k) is not None}


class ReportsListeners:
    """A connector whose process listens on the network (a side channel, a transfer engine)."""

    def listeners(self) -> list[dict[str, Any]]:
        """Every ``address`` (``HOST:PORT``; ``0.0.0.0`` or ``*``: every interface) it listened on
        during the job, ``what`` listens there, whether it is ``authenticated`` and ``loopback`` only."""
        return []


class ExplainsFailures:
    """kvconf's additions to vLLM's failure reporting: the reasons behind the block ids."""

    def get_load_error_reasons(self) -> dict[int, str]:
        """Why each block of ``get_block_ids_with_load_errors`` failed (the file, the check that
        failed); call it first, as that call clears the errors."""
        return {}

    def get_save_errors(self) -> dict[str, str]:
        """Request id -> why its blocks could not be saved, since the last call."""
        return {}

    def report_save_failed(self, request_id: str) -> None:
        """Scheduler side: the worker could not save ``request_id``'s blocks; forget them."""


class SupportsSelfTest(ABC):
    """A connector whose ``action=run`` is its own (a two-process transfer, say)."""

    @abstractmethod
    def self_test(self, kv_caches: KVCaches, ctx: SelfTestContext) -> dict[str, Any]:
        """Moves bytes through the connector and verifies them; the ``self_test`` report."""


class SupportsServe(ABC):
    """A connector that can run as a long-lived producer (``action=serve``)."""

    @abstractmethod
    def serve(self, kv_caches: KVCaches, ctx: SelfTestContext) -> dict[str, Any]:
        """Serves peers until SIGINT or SIGTERM; what it served."""


class SupportsRawPath(ABC):
    """A connector that measures the raw path under it itself (the bare engine), for ``action=bench``."""

    @abstractmethod
    def raw_path(self, kv_caches: KVCaches, ctx: SelfTestContext,
                 runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """``{"path": what, "gbps": ...}`` on the same bytes as ``runs``, or None."""


class ComparesToBaseline:
    """A connector whose raw path kvconf's benchmark measures for it: ``host_copy`` (the fastest
    plain torch gather and scatter of the same blocks) or ``file_io`` (the same bytes written as
    one raw file with fsync, and read back, in :meth:`baseline_dir`)."""

    baseline: ClassVar[Literal["host_copy", "file_io"]] = "host_copy"

    def baseline_dir(self) -> str:
        """Where the ``file_io`` baseline writes its file (the connector's own storage)."""
        return tempfile.gettempdir()


class KeepsStore(ABC):
    """A connector whose data outlives the process (a folder on disk): a second benchmark would
    find the first one's blocks, so ``action=bench`` runs it in a private store."""

    @abstractmethod
    def private_store(self) -> AbstractContextManager[str]:
        """Points this connector (and the twins and scheduler sides made from its config) at a
        fresh, empty store on the same device as its configured one, yields where, and removes
        it and points back on exit."""


class ColdLoads(ABC):
    """A connector that reads files the operating system caches in memory."""

    @abstractmethod
    def drop_cached(self) -> None:
        """Asks the OS to drop its cached pages of the connector's files, so that the next loads
        read the device (``posix_fadvise(DONTNEED)``; clean pages only: the files are synced)."""

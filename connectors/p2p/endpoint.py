"""What the two sides of a peer-to-peer transfer share with the connector they run in: the record
of a request a consumer fetches (:class:`Recv`), and :class:`Endpoint`, the part of a connector
that the producer server (:mod:`.producer`), the consumer's request loop (:mod:`.consumer`) and
the two-process self-test (:mod:`.selftest`) use. :class:`~.connector.P2PConnector` is the one
endpoint; those modules name this protocol, not the connector, so the connector imports them and
none of them imports it back.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from kvconf.config.kvcache import KVCacheConfig
    from kvconf.config.models import ConnectorConfig
    from kvconf.contract.api import KVConnectorMetadata, KVConnectorRole

    from . import auth
    from . import protocol as sc

__all__ = ["Endpoint", "Recv"]


@dataclass
class Recv:
    """A request whose blocks a consumer reads: its ids here (group by group), its producer's
    address, and what the request's ``kv_transfer_params`` name there. An empty ``request_id``
    only opens the connection to ``peer``."""

    request_id: str
    block_ids: list[list[int]]
    peer: str
    remote_request_id: str = ""
    remote_block_ids: list[list[int]] = field(default_factory=list)
    remote_engine_id: str = ""
    """The producer's engine id the params name ("": any)."""
    expires: Optional[float] = None
    """When the producer's lease on the blocks ends (epoch seconds; None: not said): after it the
    producer may have given them to another request, so a read then is not trusted."""


class Endpoint(Protocol):
    """A peer-to-peer connector as its producer, consumer loop and self-test see it: its settings,
    its registered memory, its transfer engine (the ``_engine_*`` hooks a subclass gives) and the
    state a request's load goes through."""

    needs_progress: bool
    transport: str
    transport_reason: str
    _engine_meta: bytes
    _session: str
    _auth: Optional[auth.AuthKey]
    _regions: dict[str, tuple[int, int, int]]
    _views: dict[str, Any]
    _done: set[str]
    _lock: threading.Lock
    _outbox: queue.Queue[Recv]
    _waker: sc.Waker
    _finished: threading.Event
    _ready: set[str]
    _stop: threading.Event
    _side_channel: int
    _bare: Any
    """The bare-engine peer a bench keeps (:class:`.selftest.BarePeer`), or None."""
    _read_pairs: dict[tuple[str, str, str], Any]
    """Per producer (engine, session, layout): this side's layers beside its regions (the
    consumer's plan, made once per producer, not per read)."""

    @property
    def config(self) -> ConnectorConfig: ...
    @property
    def extra(self) -> Any: ...
    @property
    def kv_cache_config(self) -> KVCacheConfig: ...
    @property
    def role(self) -> KVConnectorRole: ...

    def layout_fingerprint(self) -> str: ...
    def layer_regions(self) -> list[Any]: ...
    def note_listeners(self) -> list[dict[str, Any]]: ...
    def connect(self, peer: str, timeout: float) -> bool: ...
    def wait_for_results(self, timeout: float) -> None: ...
    def take_failures(self) -> dict[str, str]: ...
    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]: ...
    def get_block_ids_with_load_errors(self) -> set[int]: ...
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None: ...
    def clear_connector_metadata(self) -> None: ...
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None: ...
    def _fail(self, recv: Recv, reason: str) -> None: ...
    def _engine_read(self, peer: Any, src: list[int], dst: list[int], lens: list[int]) -> Any: ...
    def _engine_connect(self, peer: Any) -> None: ...
    def _engine_poll(self, handle: Any) -> str: ...
    def _engine_progress(self) -> None: ...

"""The peer-to-peer connector base that mooncake and nixl share: the scheduler side, the
consumer's request loop, and the worker's registered regions; the engines differ only in the
``_engine_*`` methods.

A consumer (decode) asks a producer (prefill) for a request's blocks over the typed side channel
(:mod:`kvconf_connectors.p2p.protocol`), naming its block ids and registered regions. In push mode
the producer (:mod:`kvconf_connectors.p2p.producer`) writes the blocks into the consumer's memory
and answers done or failed; in pull mode it answers with where the blocks lie, the consumer reads
them and releases them. A request whose answer does not come within ``transfer_timeout`` fails; no
block is reported loaded unless all its bytes arrived.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from kvconf.config.base import StrictModel
from kvconf.contract.api import KVCacheBlocks, KVConnectorMetadata, KVConnectorRole, Request, SchedulerOutput
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import (
    ChecksConfig,
    ChecksEnvironment,
    ExportsToVLLM,
    ReportsListeners,
    SelfTestContext,
    SupportsHMA,
    SupportsRawPath,
    SupportsSelfTest,
    SupportsServe,
)
from kvconf.errors import ContractError, Problem
from kvconf.runtime.engine import drive
from kvconf.runtime.listeners import interface_of, is_loopback, listening
from kvconf.runtime.views import byte_views

from . import auth
from . import protocol as sc
from .consumer import pull_loop
from .endpoint import Recv
from .producer import Producer
from .selftest import bare_engine, run_as_consumer, run_as_producer, stop_bare_peer

__all__ = ["P2PConnector", "P2PExtra", "P2PMetadata", "Recv"]

log = logging.getLogger("kvconf.p2p")


HOST = re.compile(r"^(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[?[0-9a-fA-F:]+\]?|"
                  r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                  r"[A-Za-z0-9])?)*)$")
"""An IPv4 or IPv6 address, or a host name (RFC 1123)."""
HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[^:\s]+):(?P<port>[0-9]{1,5})$")


class P2PExtra(StrictModel):
    """The settings every peer-to-peer connector has (a connector's own model adds its engine's)."""

    side_channel_host: str = "127.0.0.1"
    """Address a producer's side channel binds to (and a Mooncake engine advertises); loopback
    unless told otherwise."""
    side_channel_port: int = Field(0, ge=0, le=65535)
    """Port of a producer's side channel; 0 picks a free one."""
    num_workers: PositiveInt = 10
    """Sender threads of a producer (vLLM's ``num_workers``)."""
    handshake_timeout: PositiveFloat = Field(10.0, allow_inf_nan=False)
    """Seconds to wait for a producer's side channel to answer the first message (finite)."""
    transfer_timeout: PositiveFloat = Field(30.0, allow_inf_nan=False)
    """Seconds a request's blocks may take to arrive before the request fails (finite)."""
    peer: Optional[str] = Field(None, json_schema_extra={"pattern": HOST_PORT.pattern})
    """``HOST:PORT`` of a serving producer (what it printed as ``serving on HOST:PORT``), for a
    consumer started separately; unset, ``action=run`` starts its own peer process."""
    auth_key_file: Optional[str] = Field(None, min_length=1, max_length=4096)
    """File holding the secret every peer proves it knows (16 to 4096 characters; mode 0600).
    Unset: ``$KVCONF_AUTH_KEY``; where neither is set, ``action=serve`` generates a key into a 0600
    file and prints its path beside ``serving on HOST:PORT``, and ``action=run`` hands a key of its
    own to the peer it starts."""

    @field_validator("side_channel_host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST.match(v):
            raise ValueError(f"{v!r} is not an IP address or a host name; fix: give one, e.g. 127.0.0.1")
        return v

    @field_validator("peer")
    @classmethod
    def _peer(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        m = HOST_PORT.match(v)
        if not m or not 1 <= int(m.group("port")) <= 65535:
            raise ValueError(f"{v!r} is not HOST:PORT; fix: give what the producer printed as "
                             "'serving on HOST:PORT', e.g. 127.0.0.1:40123")
        return v


@dataclass
class P2PMetadata(KVConnectorMetadata):
    recv: list[Recv] = field(default_factory=list)


def merged_regions(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(addresses, lengths) of the distinct memory regions that ``[start, end)`` spans cover:
    layers that share an allocation (a hybrid model's groups, a block-outermost layout) are
    registered once, as the engines refuse overlapping registrations.

    >>> merged_regions([(0, 100), (50, 150), (200, 300), (200, 300)])
    ([0, 200], [150, 100])
    """
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [s for s, _ in out], [e - s for s, e in out]


class P2PConnector(KVConnectorBase, SupportsHMA, ChecksConfig, ChecksEnvironment, ExportsToVLLM, SupportsSelfTest,
                   SupportsServe, SupportsRawPath, ReportsListeners):
    """A producer (prefill) pushes, or lets a consumer (decode) read, a request's blocks on the
    consumer's request over the side channel. Subclasses give the engine: ``_engine_start``,
    ``_engine_register``, ``_engine_push``, ``_engine_read``/``_engine_poll`` (pull mode),
    ``_engine_progress`` and ``_engine_stop``."""

    pull = False
    """True: the consumer reads from the producer (NIXL's default); False: the producer writes."""
    needs_progress = False
    """True when a waiting side must drive the engine's progress itself (NIXL without its thread)."""

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        self.transport, self.transport_reason = "", ""
        self._engine_meta = b""
        """This side's engine metadata for the peer (a NIXL agent's; empty where the engine needs none)."""
        self._recv_pending: list[Recv] = []
        self._engine: Any = None
        self._session = ""
        self._regions: dict[str, tuple[int, int, int]] = {}
        self._registered: list[int] = []
        self._views: dict[str, Any] = {}
        self._done: set[str] = set()
        self._failed: dict[str, str] = {}
        self._error_blocks: set[int] = set()
        self._lock = threading.Lock()
        self._outbox: queue.Queue[Recv] = queue.Queue()
        self._waker = sc.Waker()
        self._finished = threading.Event()
        self._ready: set[str] = set()
        """Producers whose Hello this side's request loop has had answered."""
        self._stop = threading.Event()
        self._puller: Optional[threading.Thread] = None
        self._listening: dict[str, dict[str, Any]] = {}
        self._side_channel = 0
        """The port of this process's side channel while it serves (0: none)."""
        self._bare: Any = None
        """The producer peer of the bench's raw path, kept for its repetitions (stopped at shutdown)."""
        self._auth: Optional[auth.AuthKey] = None
        """The shared secret this side proves (a consumer without one is refused by producers)."""
        if role is KVConnectorRole.WORKER:
            self._auth = auth.load_key(self.extra.auth_key_file)
            self._engine_start()

    # ---- the engine (subclasses) ---------------------------------------------------------------
    @staticmethod
    def _engine_import() -> Any:
        """Imports the engine; a :class:`ContractError` with the install command where it does not."""
        raise NotImplementedError

    @classmethod
    def check_environment(cls, extra: Any, role: KVConnectorRole) -> list[Problem]:
        if role is not KVConnectorRole.WORKER:
            return []  # the scheduler side moves no bytes
        try:
            cls._engine_import()
        except ContractError as exc:
            return exc.problems
        return []

    @classmethod
    def job_processes(cls, job: dict[str, Any]) -> int:
        """The processes a job with this connector runs at once (a sweep's launcher is asked for as
        many CPUs): a worker's ``action=run`` or ``bench`` without ``connector.extra.peer`` starts
        its peer beside it."""
        extra = (job.get("connector") or {}).get("extra") or {}
        alone = job.get("role", "worker") != "worker" or job.get("action", "run") not in ("run", "bench")
        return 1 if alone or extra.get("peer") else 2

    @classmethod
    def config_problems(cls, connector: dict[str, Any], kv_cache_config: Any = None) -> list[Problem]:
        """The shared key (``connector.extra.auth_key_file`` or ``$KVCONF_AUTH_KEY``), where one is
        set: a file that is missing, readable by others or too short is a config error at check time."""
        return auth.key_problems((connector.get("extra") or {}).get("auth_key_file"))

    def _engine_start(self) -> None:
        """Starts the worker's transfer engine; sets ``_session``, ``transport``, ``transport_reason``."""
        raise NotImplementedError

    def _engine_register(self, ptrs: list[int], lens: list[int]) -> None:
        """Registers the KV cache's memory regions once."""
        raise NotImplementedError

    def _engine_push(self, msg: Any, src: list[int], dst: list[int], lens: list[int]) -> Optional[str]:
        """Producer: writes local ``src`` regions into the consumer's ``dst``; None, or why it failed."""
        raise NotImplementedError

    def _engine_read(self, peer_meta: bytes, src: list[int], dst: list[int], lens: list[int]) -> Any:
        """Consumer, pull mode: starts reading the producer's ``src`` into local ``dst``; a handle."""
        raise NotImplementedError

    def _engine_connect(self, peer_meta: bytes) -> None:
        """Consumer, pull mode: opens the engine's connection to a producer whose metadata just
        arrived (the handshake), so that its first read pays no connection set-up. Optional: an
        engine that connects on the first transfer leaves it a no-op."""

    def _engine_poll(self, handle: Any) -> str:
        """``"DONE"``, ``"ERR"`` or ``"PROC"`` for a read started by ``_engine_read``."""
        raise NotImplementedError

    def _engine_progress(self) -> None:
        """Drives the engine's progress from a side that only waits (no-op where a thread does it)."""

    def _engine_stop(self) -> None:
        """Releases the engine and what it registered."""

    # ---- layout ----------------------------------------------------------------------------------
    def layout_fingerprint(self) -> str:
        """Layer names, their groups and page sizes: two peers must agree on it."""
        h = hashlib.sha256()
        for gi, g in enumerate(self.kv_cache_config.kv_cache_groups):
            for name in g.layer_names:
                h.update(f"{gi}:{name}:{g.kv_cache_spec.page_size_bytes};".encode())
        return h.hexdigest()[:16]

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        params = request.kv_transfer_params or {}
        if self.is_consumer and params.get("do_remote_prefill"):
            return max(0, request.num_tokens - num_computed_tokens), True
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if num_external_tokens > 0 and params.get("do_remote_prefill"):
            peer = params.get("remote_address") or self.extra.peer
            # every group's ids, group after group (a hybrid model's groups share the memory)
            block_ids = [b for ids in blocks.get_block_ids() for b in ids]
            self._recv_pending.append(Recv(params.get("remote_request_id", request.request_id), block_ids, peer))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta, self._recv_pending = P2PMetadata(self._recv_pending), []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        return False, None

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, Optional[dict[str, Any]]]:
        return False, None

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Registers every layer's memory with the engine, once."""

        self._views = byte_views(kv_caches)
        spans = []
        for name, v in self._views.items():
            base, stride, page = v.data_ptr(), v.stride(0), v.shape[1]
            self._regions[name] = (base, stride, page)
            spans.append((base, base + (v.shape[0] - 1) * stride + page))
        ptrs, lens = merged_regions(spans)
        self._engine_register(ptrs, lens)
        open_ = [x["address"] for x in self.note_listeners() if not x["loopback"] and not x["authenticated"]]
        if open_:
            print(f"kvconf: warning: the {self.config.name} transfer engine listens beyond loopback, without "
                  f"authentication, on {', '.join(open_)}: only a firewall keeps other hosts from this KV cache "
                  "(see the README's Security section)", file=sys.stderr, flush=True)

    # ---- what this process listens on ---------------------------------------------------------
    def note_listeners(self) -> list[dict[str, Any]]:
        """Records what this process listens on now (the engine's listeners, the side channel while
        serving); returns the records."""
        now = []
        for host, port in listening():
            side = port == self._side_channel
            rec: dict[str, Any] = {"address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                   "what": "side channel" if side else f"{self.config.name} transfer engine",
                   "authenticated": side, "loopback": is_loopback(host)}
            self._listening[rec["address"]] = rec
            now.append(rec)
        return now

    def listeners(self) -> list[dict[str, Any]]:
        return [self._listening[k] for k in sorted(self._listening)]

    def _engine_interface(self) -> Optional[str]:
        """The network interface an engine that can be told one should listen on: the side
        channel's (``lo`` for the default 127.0.0.1); None where a consumer's producer lies
        elsewhere or the address is on no interface here."""
        host = self.extra.side_channel_host
        if self.extra.peer and is_loopback(host) and not is_loopback(sc.parse_address(self.extra.peer)[0]):
            return None
        return interface_of(host)

    def layer_regions(self) -> list[Any]:
        return [sc.LayerRegion(name=n, base=b, block_stride=s, page=p) for n, (b, s, p) in self._regions.items()]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, P2PMetadata)
        if not meta.recv:
            return
        self._start_puller()
        for r in meta.recv:
            self._outbox.put(r)
        self._waker.wake()

    def _start_puller(self) -> None:
        if self._puller is None:
            self._puller = threading.Thread(target=self._pull_loop, name=f"kvconf-{self.config.name}-recv", daemon=True)
            self._puller.start()

    def connect(self, peer: str, timeout: float) -> bool:
        """Opens the connection to the producer at ``peer`` (the key's handshake, then Hello) before
        any request needs it, as an engine does at start-up; True once the producer answered. A
        request's first transfer then pays no handshake (3-5 ms here): what ``action=bench`` times
        is the transfers."""
        self._start_puller()
        self._outbox.put(Recv("", [], peer))
        self._waker.wake()
        deadline = time.monotonic() + timeout
        while peer not in self._ready and time.monotonic() < deadline:
            self._finished.wait(0.01)
        return peer in self._ready

    def wait_for_results(self, timeout: float) -> None:
        """Blocks until a load finishes or fails (or ``timeout`` passes): what an engine's step does."""
        self._finished.wait(timeout)
        self._finished.clear()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: the engine polls get_finished

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # the producer pushes when a consumer asks

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        with self._lock:
            done = self._done | set(self._failed)
            self._done = set()
            return None, done

    def take_failures(self) -> dict[str, str]:
        """Requests whose load failed since the last call, with the reason (vLLM's failed_recving)."""
        with self._lock:
            failed, self._failed = self._failed, {}
            return failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            ids, self._error_blocks = self._error_blocks, set()
            return ids

    def _fail(self, recv: Recv, reason: str) -> None:
        with self._lock:
            self._failed[recv.request_id] = reason
            self._error_blocks.update(recv.block_ids)
        self._finished.set()

    def _pull_loop(self) -> None:
        pull_loop(self)

    def shutdown(self) -> None:
        stop_bare_peer(self)
        self._stop.set()
        self._waker.wake()
        if self._puller is not None:
            self._puller.join(timeout=5)
            self._puller = None
        self._waker.close()
        if self.role is KVConnectorRole.WORKER:
            self._engine_stop()
        self._views = {}

    # ---- producer: action=serve ----------------------------------------------------------------
    def serve(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext,
              stop: Optional[threading.Event] = None, announce: bool = True) -> dict[str, Any]:
        """Serves consumers until SIGINT or SIGTERM (or ``stop``): prefills requests on demand and
        pushes their blocks into the consumer's memory."""
        server = Producer(self)
        server.verbose = announce
        stop = stop or threading.Event()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda *_: stop.set())
        key = self._auth or auth.AuthKey.generate()
        try:
            address = server.bind(key)
            if self._auth is None:  # consumers need it: a 0600 file, gone when serving ends
                key = auth.write_key_file(key, f"producer-{address.replace(':', '-')}.key")
            self._side_channel = int(address.rsplit(":", 1)[1])
            listeners = self.note_listeners()
            if announce:
                print(f"serving on {address} (key: {key.path or key.source})", flush=True)
                print("kvconf: listening on " + ", ".join(
                    f"{x['address']} ({x['what']}, {'authenticated' if x['authenticated'] else 'NOT authenticated'})"
                    for x in listeners), file=sys.stderr, flush=True)
                print(f"kvconf: {self.config.name} producer {address}, engine session {self._session}, transport "
                      f"{self.transport} ({self.transport_reason}); SIGINT or SIGTERM stops it",
                      file=sys.stderr, flush=True)
            server.run(stop)
        finally:
            server.close()
            if self._auth is None and key.path:
                Path(key.path).unlink(missing_ok=True)
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return {"address": address, "served_requests": server.served, "failed_requests": server.failed,
                "bytes": server.bytes, "rejected_messages": server.rejected, "expired_leases": server.expired,
                "refused_peers": server.refused, "disconnected_consumers": server.disconnected,
                "auth_key": key.path or key.source, "listeners": self.listeners(),
                "transport": self.transport,
                "transport_reason": self.transport_reason}

    def raw_path(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext,
                 runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """``action=bench``: the bare engine moving the same blocks between two processes."""
        if self.role is KVConnectorRole.SCHEDULER or not kv_caches or self.config.kv_role == "kv_producer":
            return None
        return bare_engine(self, ctx)

    # ---- action=run ----------------------------------------------------------------------------
    def self_test(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext) -> dict[str, Any]:
        if self.role is KVConnectorRole.SCHEDULER or kv_caches is None:
            return drive(self, kv_caches, ctx)  # the scheduler side alone: kvconf's engine
        if self.config.kv_role == "kv_producer":
            return run_as_producer(self, kv_caches, ctx)
        return run_as_consumer(self, kv_caches, ctx)

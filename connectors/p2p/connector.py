"""The peer-to-peer connector base that mooncake and nixl share: the scheduler side, the
consumer's request loop, and the worker's registered regions; the engines differ only in the
``_engine_*`` methods.

vLLM's prefill/decode protocol, in vLLM and under kvconf's engine simulator alike. The producer
(prefill) side keeps a request's blocks at ``request_finished`` when it asked for remote decode
(``kv_transfer_params.do_remote_decode``) and returns ``kv_transfer_params`` naming them (vLLM's
names, :func:`~kvconf_connectors.p2p.protocol.transfer_params`): its engine id, the request id, the
block ids group by group, its side channel's host and port, the lease. Its worker serves the side
channel (:mod:`kvconf_connectors.p2p.producer`), holds the blocks until the decode says it read
them or the lease ends, then reports the request finished (``get_finished``): vLLM frees them.
The consumer (decode) side reads those params in ``get_num_new_matched_tokens`` and loads
asynchronously: its worker reads the blocks straight from the producer's memory with the transfer
engine (:mod:`kvconf_connectors.p2p.consumer`), then notifies the producer. A read that fails,
fails a check or overruns ``transfer_timeout`` reports its blocks through
``get_block_ids_with_load_errors``: the request is recomputed, never decoded on garbage.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

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
from kvconf.errors import ConfigError, ContractError, Problem
from kvconf.runtime.engine import drive
from kvconf.runtime.listeners import interface_of, is_loopback, listening
from kvconf.runtime.views import byte_views

from . import auth
from . import protocol as sc
from .consumer import pull_loop
from .endpoint import Recv
from .producer import Producer, serve_producer
from .selftest import bare_engine, run_as_consumer, run_as_producer, stop_bare_peer
from .settings import P2PExtra, merged_regions

__all__ = ["P2PConnector", "P2PExtra", "P2PMetadata", "Recv"]

log = logging.getLogger("kvconf.p2p")


FAILURES_KEPT = 4096
"""Reasons of failed loads kept for ``take_failures`` (kvconf's self-test asks; vLLM never does)."""


@dataclass
class P2PMetadata(KVConnectorMetadata):
    """Scheduler -> worker, each step: the requests to read (decode), and the finished requests
    whose blocks to hold for their decode (prefill: id, block ids group by group)."""

    recv: list[Recv] = field(default_factory=list)
    hold: list[tuple[str, list[list[int]]]] = field(default_factory=list)


class P2PConnector(KVConnectorBase, SupportsHMA, ChecksConfig, ChecksEnvironment, ExportsToVLLM, SupportsSelfTest,
                   SupportsServe, SupportsRawPath, ReportsListeners):
    """A producer (prefill) holds a finished request's blocks; a consumer (decode) given the
    request's ``kv_transfer_params`` reads them from the producer's memory and releases them.
    Subclasses give the engine: ``_engine_start``, ``_engine_register``, ``_engine_read``,
    ``_engine_poll``, ``_engine_connect``, ``_engine_progress`` and ``_engine_stop``."""

    holds_finished_requests = True
    """Requests whose blocks ``request_finished`` kept are reported finished by ``get_finished``
    (their decode read them, or the lease ended), not at once."""
    needs_progress = False
    """True when a waiting side must drive the engine's progress itself (NIXL without its thread)."""

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        self.transport, self.transport_reason = "", ""
        self._engine_meta = b""
        """This side's engine metadata for the peer (a NIXL agent's; empty where the engine needs none)."""
        self._recv_pending: list[Recv] = []
        self._hold_pending: list[tuple[str, list[list[int]]]] = []
        self._loading: dict[str, tuple[int, sc.RemoteBlocks]] = {}
        """Scheduler, decode: requests whose remote blocks vLLM was told of (tokens computed here then)."""
        self._address: Optional[str] = None
        """Scheduler, prefill: the worker's side channel (vLLM's handshake metadata)."""
        self._server: Optional[Producer] = None
        """Worker, prefill in vLLM: the side-channel server holding finished requests' blocks."""
        self._server_stop = threading.Event()
        self._server_thread: Optional[threading.Thread] = None
        self._engine: Any = None
        self._session = ""
        self._regions: dict[str, tuple[int, int, int]] = {}
        self._read_pairs: dict[tuple[str, str, str], Any] = {}  # consumer.plan_read's, per producer
        self._registered: list[int] = []
        self._views: dict[str, Any] = {}
        self._done: set[str] = set()
        self._fingerprint: Optional[str] = None  # layout_fingerprint, once
        self._failed: dict[str, str] = {}  # reasons, until take_failures
        self._failed_unreported: set[str] = set()  # for get_finished, once each
        self._error_blocks: set[int] = set()
        self._unheld: set[str] = set()
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

    def _engine_read(self, peer: Any, src: list[int], dst: list[int], lens: list[int]) -> Any:
        """Consumer: starts reading the producer's ``src`` into local ``dst`` (``peer``: the
        producer's :class:`~kvconf_connectors.p2p.protocol.HelloAck`); a handle."""
        raise NotImplementedError

    def _engine_connect(self, peer: Any) -> None:
        """Consumer: opens the engine's connection to a producer whose handshake just arrived, so
        that its first read pays no connection set-up. Optional: an engine that connects on the
        first transfer leaves it a no-op."""

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
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for gi, g in enumerate(self.kv_cache_config.kv_cache_groups):
            for name in g.layer_names:
                h.update(f"{gi}:{name}:{g.kv_cache_spec.page_size_bytes};".encode())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        """Decode: the prompt's tokens the params' remote blocks hold, beyond those computed here,
        loaded asynchronously. Params a decode cannot read are logged and the request is computed."""
        params = request.kv_transfer_params
        if not (self.is_consumer and isinstance(params, dict) and params.get("do_remote_prefill")):
            return 0, False
        groups = self.kv_cache_config.kv_cache_groups
        remote = sc.read_params(params, len(groups))
        if isinstance(remote, str):
            log.warning("request %s is computed here, nothing is read: %s", request.request_id, remote)
            params["do_remote_prefill"] = False
            return 0, False
        bs = groups[0].kv_cache_spec.block_size
        avail = len(remote.block_ids[0]) * bs
        if remote.num_tokens:
            avail = min(avail, remote.num_tokens)
        n = min(request.num_tokens, avail) - num_computed_tokens
        if n <= 0:
            return 0, False
        self._loading[request.request_id] = (num_computed_tokens, remote)
        return n, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Decode: the request's blocks here paired with the remote ones at the same positions,
        from the first block not computed here; the params are spent (a failed load is
        recomputed, never read again)."""
        entry = self._loading.pop(request.request_id, None)
        if entry is None or num_external_tokens <= 0:
            return
        computed, remote = entry
        if isinstance(request.kv_transfer_params, dict):
            request.kv_transfer_params["do_remote_prefill"] = False
        local: list[list[int]] = []
        theirs: list[list[int]] = []
        for g, ids in enumerate(blocks.get_block_ids()):
            bs = self.kv_cache_config.kv_cache_groups[g].kv_cache_spec.block_size
            first, last = computed // bs, -(-(computed + num_external_tokens) // bs)
            local.append(list(ids[first:last]))
            theirs.append(list(remote.block_ids[g][first:last]))
        self._recv_pending.append(Recv(request.request_id, local, remote.peer, remote.request_id, theirs,
                                       remote.engine_id, remote.expires))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = P2PMetadata(self._recv_pending, self._hold_pending)
        self._recv_pending, self._hold_pending = [], []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        return self._keep_for_decode(request, [list(block_ids)])

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, Optional[dict[str, Any]]]:
        return self._keep_for_decode(request, [list(g) for g in block_ids])

    def _keep_for_decode(self, request: Request, block_ids: list[list[int]]) -> tuple[bool, Optional[dict[str, Any]]]:
        """Prefill: a request that asked for remote decode keeps its blocks for its decode, and
        its output carries the params naming them."""
        self._loading.pop(request.request_id, None)
        params = request.kv_transfer_params
        if not (isinstance(params, dict) and params.get("do_remote_decode")) or request.aborted:
            return False, None
        if not any(block_ids):
            return False, None
        if not self.is_producer:
            log.warning("request %s asks for remote decode, but this instance is a %s: its blocks are not kept",
                        request.request_id, self.config.kv_role)
            return False, None
        if self._address is None:
            log.warning("request %s asks for remote decode, but no worker serves a side channel: its blocks are "
                        "not kept", request.request_id)
            return False, None
        out = sc.transfer_params(str(self.config.engine_id), request.request_id, block_ids, self._address,
                                 request.num_computed_tokens or len(request.prompt_token_ids),
                                 self.extra.lease_seconds)
        self._hold_pending.append((request.request_id, block_ids))
        return True, out

    def set_handshake(self, metadata: dict[str, Any]) -> None:
        """Scheduler: what the worker's :meth:`handshake` returned (vLLM carries it over)."""
        self._address = metadata.get("address") or None

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Registers every layer's memory with the engine, once."""

        self._views = byte_views(kv_caches)
        self._read_pairs.clear()  # planned against the memory registered before
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

    def handshake(self) -> Optional[dict[str, Any]]:
        """Worker, in vLLM, once its KV cache is registered: a producer starts serving its side
        channel and returns its address for the scheduler (vLLM's handshake metadata). Both sides
        need the shared key: a :class:`ConfigError` where none is set."""
        if self._auth is None:
            raise ConfigError(Problem(
                "connector.extra.auth_key_file", f"the {self.config.name} connector in vLLM needs the shared key "
                "its prefill and decode instances prove to each other, and none is set",
                fix="write one key (16+ characters) into a 0600 file, and give it to both instances as "
                    "connector.extra.auth_key_file or $KVCONF_AUTH_KEY"))
        if not self.is_producer:
            return None
        if self._server is None:
            server = Producer(self)
            server.simulated = False
            address = server.bind(self._auth)
            self._side_channel = int(address.rsplit(":", 1)[1])
            self._server = server
            self._server_thread = threading.Thread(target=server.run, args=(self._server_stop,), daemon=True,
                                                   name=f"kvconf-{self.config.name}-side-channel")
            self._server_thread.start()
            self.note_listeners()
            log.info("kvconf: %s producer serving its side channel on %s", self.config.name, address)
            self._address = address
        return {"address": self._address, "engine_id": str(self.config.engine_id)}

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, P2PMetadata) and connector_metadata.hold:
            if self._server is None:  # no side channel: nobody can read them; vLLM frees them now
                with self._lock:
                    self._unheld.update(rid for rid, _ in connector_metadata.hold)
            else:
                for rid, ids in connector_metadata.hold:
                    self._server.hold(rid, ids, self.extra.lease_seconds)

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
        return None  # a decode reads the blocks of a finished request

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        """(requests whose held blocks may be freed, requests whose load ended: read or failed)."""
        sending = self._server.take_ended() if self._server is not None else set()
        with self._lock:
            done = self._done | self._failed_unreported
            self._done, self._failed_unreported = set(), set()
            sending |= self._unheld
            self._unheld = set()
        return sending or None, done

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
        then = ("it is recomputed" if self.config.kv_load_failure_policy == "recompute"
                else "it fails (connector.kv_load_failure_policy=fail)")
        log.warning("request %s: nothing was read, %s: %s", recv.request_id, then, reason)
        with self._lock:
            self._failed[recv.request_id] = reason
            self._failed_unreported.add(recv.request_id)
            while len(self._failed) > FAILURES_KEPT:  # nobody asks for reasons inside vLLM
                del self._failed[next(iter(self._failed))]
            self._error_blocks.update(b for ids in recv.block_ids for b in ids)
        self._finished.set()

    def _pull_loop(self) -> None:
        pull_loop(self)

    def shutdown(self) -> None:
        stop_bare_peer(self)
        if self._server is not None:
            self._server_stop.set()
            self._server.waker.wake()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server.close()
            self._server = None
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
        """Serves consumers until SIGINT or SIGTERM (or ``stop``): the engine simulator's prefill
        instance, which prefills requests on demand, answers with their ``kv_transfer_params`` and
        holds their blocks until their decode read them (:func:`.producer.serve_producer`)."""
        return serve_producer(self, stop or threading.Event(), announce)

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

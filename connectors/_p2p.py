"""What the peer-to-peer connectors (mooncake, nixl) share: the producer's side-channel server,
the consumer's request loop, the scheduler side, and the two-process self-test.

A consumer (decode) asks a producer (prefill) for a request's blocks over the typed side channel
(:mod:`kvconf.sidechannel`), naming its block ids and registered regions. In push mode the producer
writes the blocks into the consumer's memory and answers done or failed; in pull mode it answers
with where the blocks lie, the consumer reads them and releases them. A request whose answer does
not come within ``transfer_timeout`` fails; no block is reported loaded unless all its bytes
arrived. The engines differ only in the ``_engine_*`` methods.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from kvconf.connector import (
    KVCacheBlocks,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorRole,
    Request,
    SchedulerOutput,
    SelfTestContext,
)
from kvconf.errors import ConnectorRuntimeError, ContractError, Problem

log = logging.getLogger("kvconf.p2p")


class _Waker:
    """A pipe other threads write to, so that a zmq poll loop wakes at once."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        try:
            os.write(self.w, b"x")
        except BlockingIOError:  # already pending
            pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@dataclass
class _Recv:
    request_id: str
    block_ids: list[int]
    peer: str


@dataclass
class P2PMetadata(KVConnectorMetadata):
    recv: list[_Recv] = field(default_factory=list)


@dataclass
class _Pending:
    recv: _Recv
    deadline: float
    sent: bool = False


class P2PConnector(KVConnectorBase):
    """A producer (prefill) pushes, or lets a consumer (decode) read, a request's blocks on the
    consumer's request over the side channel. Subclasses give the engine: ``_engine_start``,
    ``_engine_register``, ``_engine_push``, ``_engine_read``/``_engine_poll`` (pull mode),
    ``_engine_progress`` and ``_engine_stop``."""

    can_serve = True
    pull = False
    """True: the consumer reads from the producer (NIXL's default); False: the producer writes."""
    needs_progress = False
    """True when a waiting side must drive the engine's progress itself (NIXL without its thread)."""

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        self.transport, self.transport_reason = "", ""
        self._engine_meta = b""
        """This side's engine metadata for the peer (a NIXL agent's; empty where the engine needs none)."""
        self._recv_pending: list[_Recv] = []
        self._engine: Any = None
        self._session = ""
        self._regions: dict[str, tuple[int, int, int]] = {}
        self._registered: list[int] = []
        self._views: dict[str, Any] = {}
        self._done: set[str] = set()
        self._failed: dict[str, str] = {}
        self._error_blocks: set[int] = set()
        self._lock = threading.Lock()
        self._outbox: "queue.Queue[_Recv]" = queue.Queue()
        self._waker = _Waker()
        self._finished = threading.Event()
        self._stop = threading.Event()
        self._puller: Optional[threading.Thread] = None
        if role is KVConnectorRole.WORKER:
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

    def _engine_poll(self, handle: Any) -> str:
        """``"DONE"``, ``"ERR"`` or ``"PROC"`` for a read started by ``_engine_read``."""
        raise NotImplementedError

    def _engine_progress(self) -> None:
        """Drives the engine's progress from a side that only waits (no-op where a thread does it)."""

    def _engine_stop(self) -> None:
        """Releases the engine and what it registered."""

    # ---- layout ----------------------------------------------------------------------------------
    def layout_fingerprint(self) -> str:
        """Layer names and page sizes: two peers must agree on it."""
        h = hashlib.sha256()
        for g in self.kv_cache_config.kv_cache_groups:
            for name in g.layer_names:
                h.update(f"{name}:{g.kv_cache_spec.page_size_bytes};".encode())
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
            block_ids = blocks.get_block_ids()[0]
            self._recv_pending.append(_Recv(params.get("remote_request_id", request.request_id),
                                            list(block_ids), peer))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta, self._recv_pending = P2PMetadata(self._recv_pending), []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        return False, None

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Registers every layer's memory with the engine, once."""
        import torch

        self._views = {n: t.flatten(1).view(torch.uint8) for n, t in kv_caches.items()}
        spans: dict[int, int] = {}
        for name, v in self._views.items():
            base, stride, page = v.data_ptr(), v.stride(0), v.shape[1]
            self._regions[name] = (base, stride, page)
            end = base + (v.shape[0] - 1) * stride + page
            spans[base] = max(spans.get(base, 0), end - base)
        ptrs, lens = list(spans), [spans[p] for p in spans]
        self._engine_register(ptrs, lens)

    def layer_regions(self) -> list[Any]:
        from kvconf.sidechannel import LayerRegion

        return [LayerRegion(name=n, base=b, block_stride=s, page=p) for n, (b, s, p) in self._regions.items()]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, P2PMetadata)
        if not meta.recv:
            return
        if self._puller is None:
            self._puller = threading.Thread(target=self._pull_loop, name=f"kvconf-{self.config.name}-recv", daemon=True)
            self._puller.start()
        for r in meta.recv:
            self._outbox.put(r)
        self._waker.wake()

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

    def _fail(self, recv: _Recv, reason: str) -> None:
        with self._lock:
            self._failed[recv.request_id] = reason
            self._error_blocks.update(recv.block_ids)
        self._finished.set()

    def _pull_loop(self) -> None:
        """Owns the consumer's DEALER sockets: sends transfer requests, collects results, fails a
        request whose result does not come in time."""
        import zmq

        from kvconf import sidechannel as sc

        ctx = zmq.Context.instance()
        socks: dict[str, Any] = {}
        acked: dict[str, float] = {}  # peer -> time the handshake was sent (0 once answered)
        peer_meta: dict[str, bytes] = {}
        pending: dict[str, _Pending] = {}
        reading: dict[str, tuple[Any, str]] = {}  # request -> (engine handle, peer), pull mode
        poller = zmq.Poller()
        poller.register(self._waker.r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._waker.drain()
                while True:
                    try:
                        r = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    if not r.peer:
                        self._fail(r, "no producer address: set connector.extra.peer=HOST:PORT")
                        continue
                    if r.peer not in socks:
                        try:
                            host, port = sc.parse_address(r.peer)
                        except ValueError as exc:
                            self._fail(r, f"bad producer address: {exc}")
                            continue
                        s = ctx.socket(zmq.DEALER)
                        s.setsockopt(zmq.LINGER, 0)
                        s.setsockopt(zmq.MAXMSGSIZE, sc.MAX_SOCKET_BYTES)
                        s.connect(f"tcp://{host}:{port}")
                        s.send(sc.encode(sc.Hello(engine_id=self.config.engine_id)))
                        socks[r.peer] = s
                        acked[r.peer] = time.monotonic()
                        poller.register(s, zmq.POLLIN)
                    pending[r.request_id] = _Pending(r, time.monotonic() + self.extra.transfer_timeout)
                now = time.monotonic()
                for rid, p in list(pending.items()):
                    peer = p.recv.peer
                    if acked.get(peer, 0) and now - acked[peer] > self.extra.handshake_timeout:
                        self._fail(p.recv, f"the producer at {peer} did not answer within "
                                           f"{self.extra.handshake_timeout:g} s (handshake_timeout)")
                        del pending[rid]
                    elif not acked.get(peer, 0) and not p.sent:
                        socks[peer].send(sc.encode(sc.Transfer(
                            request_id=rid, session=self._session, layout=self.layout_fingerprint(),
                            layers=self.layer_regions(), block_ids=p.recv.block_ids,
                            mode="pull" if self.pull else "push", meta=self._engine_meta)))
                        p.sent = True
                    elif now > p.deadline:
                        self._fail(p.recv, f"no transfer result from {peer} within "
                                           f"{self.extra.transfer_timeout:g} s (transfer_timeout)")
                        del pending[rid]
                self._engine_progress()
                for rid, (handle, peer) in list(reading.items()):
                    state = self._engine_poll(handle)
                    p = pending.get(rid)
                    if state == "PROC" and p is not None and now <= p.deadline:
                        continue
                    del reading[rid]
                    ok = state == "DONE"
                    socks[peer].send(sc.encode(sc.Release(request_id=rid, ok=ok)))
                    if p is None:
                        continue
                    del pending[rid]
                    if ok:
                        with self._lock:
                            self._done.add(rid)
                        self._finished.set()
                    else:
                        self._fail(p.recv, f"reading from the producer at {peer} failed (state {state})"
                                   if state != "PROC" else f"reading from {peer} took over "
                                   f"{self.extra.transfer_timeout:g} s (transfer_timeout)")
                timeout = min((p.deadline for p in pending.values()), default=now + 0.5) - now
                if reading or self.needs_progress:
                    timeout = min(timeout, 0.001)
                for sock, _ in poller.poll(timeout=max(1, min(int(timeout * 1000) + 1, 500))):
                    if sock == self._waker.r:
                        continue
                    peer = next(k for k, v in socks.items() if v is sock)
                    try:
                        msg = sc.decode(sock.recv())
                    except sc.BadMessage as exc:
                        log.warning("ignored a bad side-channel message from %s: %s", peer, exc)
                        continue
                    if isinstance(msg, sc.HelloAck):
                        if msg.layout != self.layout_fingerprint():
                            for rid, p in list(pending.items()):
                                if p.recv.peer == peer:
                                    self._fail(p.recv, f"the producer at {peer} has another KV layout "
                                                       f"({msg.layout}, here {self.layout_fingerprint()})")
                                    del pending[rid]
                        acked[peer] = 0
                        peer_meta[peer] = msg.meta
                    elif isinstance(msg, sc.PullSource):
                        p = pending.get(msg.request_id)
                        if p is None:
                            sock.send(sc.encode(sc.Release(request_id=msg.request_id, ok=False)))
                            continue
                        try:
                            reading[msg.request_id] = (self._engine_read(peer_meta.get(peer, b""), msg.src, msg.dst,
                                                                         msg.lens), peer)
                        except Exception as exc:  # the engine refused: the request fails
                            del pending[msg.request_id]
                            sock.send(sc.encode(sc.Release(request_id=msg.request_id, ok=False)))
                            self._fail(p.recv, f"reading from {peer} could not start: {exc}")
                    elif isinstance(msg, sc.TransferResult):
                        p = pending.pop(msg.request_id, None)
                        if p is None:
                            continue
                        if msg.status == "done":
                            with self._lock:
                                self._done.add(msg.request_id)
                            self._finished.set()
                        else:
                            self._fail(p.recv, f"the producer at {peer} failed the transfer: {msg.reason}")
                    elif isinstance(msg, sc.Rejected):
                        log.warning("the producer at %s rejected a message: %s", peer, msg.reason)
        finally:
            for s in socks.values():
                s.close(linger=0)

    def shutdown(self) -> None:
        self._stop.set()
        self._waker.wake()
        if self._puller is not None:
            self._puller.join(timeout=5)
            self._puller = None
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        if self.role is KVConnectorRole.WORKER:
            self._engine_stop()
        self._views = {}

    # ---- producer: action=serve ----------------------------------------------------------------
    def serve(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext,
              stop: Optional[threading.Event] = None, announce: bool = True) -> dict[str, Any]:
        """Serves consumers until SIGINT or SIGTERM (or ``stop``): prefills requests on demand and
        pushes their blocks into the consumer's memory."""
        server = _Producer(self)
        server.verbose = announce
        stop = stop or threading.Event()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            address = server.bind()
            if announce:
                print(f"serving on {address}", flush=True)
                print(f"kvconf: {self.config.name} producer {address}, engine session {self._session}, transport "
                      f"{self.transport} ({self.transport_reason}); SIGINT or SIGTERM stops it",
                      file=sys.stderr, flush=True)
            server.run(stop)
        finally:
            server.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return {"address": address, "served_requests": server.served, "failed_requests": server.failed,
                "bytes": server.bytes, "rejected_messages": server.rejected, "transport": self.transport,
                "transport_reason": self.transport_reason}

    def raw_path(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext,
                 runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """``action=bench``: the bare engine moving the same blocks between two processes."""
        if self.role is KVConnectorRole.SCHEDULER or not kv_caches or self.config.kv_role == "kv_producer":
            return None
        return _bare_engine(self, ctx)

    # ---- action=run ----------------------------------------------------------------------------
    def self_test(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext) -> dict[str, Any]:
        if self.role is KVConnectorRole.SCHEDULER or kv_caches is None:
            return super().self_test(kv_caches, ctx)
        if self.config.kv_role == "kv_producer":
            return _run_as_producer(self, kv_caches, ctx)
        return _run_as_consumer(self, kv_caches, ctx)


class _Producer:
    """The producer's side-channel server and sender pool."""

    def __init__(self, conn: P2PConnector) -> None:
        self.conn = conn
        self.num_blocks = conn.kv_cache_config.num_blocks
        self.free = collections.deque(range(self.num_blocks))
        self.prefilled: "collections.OrderedDict[str, list[int]]" = collections.OrderedDict()
        self.senders: list[tuple["queue.Queue[Any]", threading.Thread]] = []
        self.sender_of: dict[str, int] = {}
        self.results: "queue.Queue[tuple[bytes, bytes, str]]" = queue.Queue()
        self.waker = _Waker()
        self.sock: Any = None
        self.served = self.failed = self.bytes = self.rejected = 0
        self.busy: set[str] = set()
        self.pulling: dict[str, tuple[float, int, str]] = {}
        """Pull mode: requests whose blocks a consumer is reading (started, bytes, session)."""
        """One sender thread per consumer session (up to ``num_workers``; more sessions share them):
        pushes to one consumer go one at a time, as concurrent batches to the same peer contend for
        its lanes (measured: 4 at once gave a third of one's throughput), and threads that only wait
        for the same peer cost GIL hand-offs (10 threads cost 15% at 16 KiB blocks against 1)."""
        self.verbose = False
        """One line on stderr per request served (``action=serve``)."""

    def bind(self) -> str:
        import zmq

        from kvconf import sidechannel as sc

        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, sc.MAX_SOCKET_BYTES)
        host, port = self.conn.extra.side_channel_host, self.conn.extra.side_channel_port
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        return f"{host}:{port}"

    def close(self) -> None:
        for q, _ in self.senders:
            q.put(None)
        for _, t in self.senders:
            t.join()
        self.senders = []
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
            self.waker.close()

    def run(self, stop: threading.Event) -> None:
        import zmq

        from kvconf import sidechannel as sc

        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.waker.r, zmq.POLLIN)
        wait = 1 if self.conn.needs_progress else 100
        while not stop.is_set():
            self.send_results()
            self.conn._engine_progress()
            ready = dict(poller.poll(timeout=wait))
            if self.waker.r in ready:
                self.waker.drain()
            if self.sock not in ready:
                continue
            frames = self.sock.recv_multipart()
            if len(frames) != 2:
                self.rejected += 1
                log.warning("rejected a side-channel message of %d frames", len(frames))
                continue
            ident, raw = frames
            try:
                msg = sc.decode(raw)
            except sc.BadMessage as exc:
                self.rejected += 1
                log.warning("rejected a side-channel message: %s", exc)
                self.sock.send_multipart([ident, sc.encode(sc.Rejected(reason=str(exc)))])
                continue
            self.handle(ident, msg)
        self.send_results()

    def sender(self, session: str) -> "queue.Queue[Any]":
        """The queue of the thread that pushes to ``session``."""
        i = self.sender_of.get(session)
        if i is None:
            if len(self.senders) < self.conn.extra.num_workers:
                q: "queue.Queue[Any]" = queue.Queue()
                t = threading.Thread(target=self._send_loop, args=(q,), daemon=True,
                                     name=f"kvconf-{self.conn.config.name}-send-{len(self.senders)}")
                t.start()
                self.senders.append((q, t))
            i = self.sender_of[session] = len(self.sender_of) % len(self.senders)
        return self.senders[i][0]

    def _send_loop(self, q: "queue.Queue[Any]") -> None:
        while (item := q.get()) is not None:
            self.push(*item)

    def release(self, msg: Any) -> None:
        """Pull mode: the consumer finished reading (or gave up); the blocks are free again."""
        started, nbytes, session = self.pulling.pop(msg.request_id, (None, 0, ""))
        if started is None:
            return
        self.busy.discard(msg.request_id)
        self.free.extend(self.prefilled.pop(msg.request_id, []))
        if msg.ok:
            self.served += 1
            self.bytes += nbytes
            if self.verbose:
                print(f"served {msg.request_id}: {nbytes} B read in {(time.perf_counter() - started) * 1000:.1f} ms "
                      f"by {session}", file=sys.stderr, flush=True)
        else:
            self.failed += 1

    def send_results(self) -> None:
        """Answers finished transfers (only this thread touches the socket); in ``action=serve``
        logs one line per request once its answer is on its way."""
        while not self.results.empty():
            ident, payload, note = self.results.get()
            self.sock.send_multipart([ident, payload])
            if note and self.verbose:
                print(note, file=sys.stderr, flush=True)

    def handle(self, ident: bytes, msg: Any) -> None:
        from kvconf import sidechannel as sc

        conn = self.conn
        if isinstance(msg, sc.Hello):
            reply: Any = sc.HelloAck(engine_id=conn.config.engine_id, session=conn._session,
                                     layout=conn.layout_fingerprint(), transport=conn.transport,
                                     meta=conn._engine_meta)
        elif isinstance(msg, sc.Prefill):
            reply = self.prefill(msg)
        elif isinstance(msg, sc.Transfer):
            self.sender(msg.session).put((ident, msg))
            return
        elif isinstance(msg, sc.Release):
            self.release(msg)
            return
        else:
            self.rejected += 1
            reply = sc.Rejected(reason=f"a producer does not take {msg.type!r} messages")
        self.sock.send_multipart([ident, sc.encode(reply)])

    def prefill(self, msg: Any) -> Any:
        """Computes a request's KV into free blocks: the pattern of (seed, layer, block)."""
        from kvconf import sidechannel as sc
        from kvconf.pattern import block_pattern

        if msg.num_blocks > self.num_blocks:
            return sc.PrefillAck(request_id=msg.request_id, ok=False,
                                 reason=f"the request needs {msg.num_blocks} blocks; this producer has {self.num_blocks}")
        while len(self.free) < msg.num_blocks and self.prefilled:
            stale = next((r for r in self.prefilled if r not in self.busy), None)
            if stale is None:
                break
            self.free.extend(self.prefilled.pop(stale))  # never fetched: the oldest goes first
        if len(self.free) < msg.num_blocks:
            return sc.PrefillAck(request_id=msg.request_id, ok=False, reason="no free blocks: transfers in flight")
        if msg.request_id in self.prefilled:
            self.free.extend(self.prefilled.pop(msg.request_id))
        ids = [self.free.popleft() for _ in range(msg.num_blocks)]
        for li, (name, view) in enumerate(self.conn._views.items()):
            for j, b in enumerate(ids):
                view[b].copy_(block_pattern(msg.seed, li, j, view.shape[1]))
        self.prefilled[msg.request_id] = ids
        return sc.PrefillAck(request_id=msg.request_id, ok=True)

    def push(self, ident: bytes, msg: Any) -> None:
        """Pushes the request's blocks into the consumer's memory; answers done or failed."""
        from kvconf import sidechannel as sc

        conn = self.conn
        t0 = time.perf_counter()
        status, reason, nbytes = "failed", "", 0
        src_ids = self.prefilled.get(msg.request_id)
        try:
            if src_ids is None:
                reason = f"unknown request {msg.request_id!r}: it was never prefilled here"
            elif msg.layout != conn.layout_fingerprint():
                reason = f"layout mismatch: consumer {msg.layout}, producer {conn.layout_fingerprint()}"
            elif len(msg.block_ids) != len(src_ids):
                reason = f"the consumer asks for {len(msg.block_ids)} blocks; the request has {len(src_ids)}"
            else:
                self.busy.add(msg.request_id)
                src, dst, lens = [], [], []
                for region in msg.layers:
                    local = conn._regions.get(region.name)
                    if local is None or local[2] != region.page:
                        reason = f"layer {region.name!r} differs between the peers"
                        break
                    base, stride, page = local
                    _coalesce(src, dst, lens, base, stride, region.base, region.block_stride, page,
                              src_ids, msg.block_ids)
                else:  # every layer matches
                    if msg.mode == "pull":  # the consumer reads: tell it where; the blocks stay until released
                        self.pulling[msg.request_id] = (time.perf_counter(), sum(lens), msg.session)
                        self.results.put((ident, sc.encode(sc.PullSource(
                            request_id=msg.request_id, src=src, dst=dst, lens=lens)), ""))
                        self.waker.wake()
                        return
                    error = conn._engine_push(msg, src, dst, lens)
                    if error:
                        reason = error
                    else:
                        status, nbytes = "done", sum(lens)
        except Exception as exc:  # a sender thread must always answer
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            if msg.request_id not in self.pulling:
                self.busy.discard(msg.request_id)
        if status == "done":
            self.free.extend(self.prefilled.pop(msg.request_id, []))
            self.served += 1
            self.bytes += nbytes
            note = (f"served {msg.request_id}: {nbytes} B in {(time.perf_counter() - t0) * 1000:.1f} ms "
                    f"to {msg.session}")
        else:
            self.failed += 1
            note = ""
            log.warning("transfer of %s failed: %s", msg.request_id, reason)
        result = sc.TransferResult(request_id=msg.request_id, status=status, reason=reason, bytes=nbytes,
                                   seconds=time.perf_counter() - t0)
        self.results.put((ident, sc.encode(result), note))
        self.waker.wake()


def _coalesce(src: list[int], dst: list[int], lens: list[int], sbase: int, sstride: int, dbase: int,
              dstride: int, page: int, sids: list[int], dids: list[int]) -> None:
    """One entry per run of blocks that are contiguous on both sides (vectorised: a request can
    have thousands of blocks).

    >>> s, d, n = [], [], []
    >>> _coalesce(s, d, n, 1000, 10, 5000, 10, 10, [0, 1, 2, 7], [3, 4, 9, 10])
    >>> s, d, n
    ([1000, 1020, 1070], [5030, 5090, 5100], [20, 10, 10])
    """
    import numpy as np

    s_addr = sbase + np.asarray(sids, dtype=np.int64) * sstride
    d_addr = dbase + np.asarray(dids, dtype=np.int64) * dstride
    if len(s_addr) > 1 and sstride == page == dstride:
        breaks = np.nonzero((np.diff(s_addr) != page) | (np.diff(d_addr) != page))[0] + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(s_addr)]))
        src.extend(s_addr[starts].tolist())
        dst.extend(d_addr[starts].tolist())
        lens.extend(((ends - starts) * page).tolist())
    else:
        src.extend(s_addr.tolist())
        dst.extend(d_addr.tolist())
        lens.extend([page] * len(s_addr))


# ---- the two-process self-test --------------------------------------------------------------------


def _peer_data(ctx: SelfTestContext, kv_role: str, action: str, peer: Optional[str] = None) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(ctx.data)
    conn = data["connector"]
    conn["kv_role"] = kv_role
    conn["engine_id"] = None
    conn.setdefault("extra", {})["peer"] = peer
    if action == "serve":
        conn["extra"]["side_channel_port"] = 0
    data["action"] = action
    data["output"] = "json"
    data["role"] = "worker"
    return data


def _start_peer(data: dict[str, Any]) -> tuple[subprocess.Popen, str]:
    import json

    fd, path = tempfile.mkstemp(prefix="kvconf-peer-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    proc = subprocess.Popen([sys.executable, "-m", "kvconf.peer", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, path


def _wait_serving(proc: subprocess.Popen, timeout: float) -> str:
    """The address a serving peer prints as ``serving on HOST:PORT``."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            if line.startswith("serving on "):
                return line.split("serving on ", 1)[1].strip()
            if not line and proc.poll() is not None:
                break
    proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    raise ConnectorRuntimeError(Problem("self_test", f"the producer peer did not start serving within {timeout:g} s",
                                        details=tuple(err.strip().splitlines()[-6:]),
                                        fix="run the producer by hand: python -m kvconf connector=NAME "
                                            "connector.kv_role=kv_producer action=serve"))


def _stop_peer(proc: subprocess.Popen, path: str) -> int:
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode
    finally:
        os.unlink(path)


def _run_as_consumer(conn: P2PConnector, kv_caches: dict[str, Any], ctx: SelfTestContext) -> dict[str, Any]:
    """This process is the consumer: start (or reach) a producer, fetch rounds of requests, verify."""
    import torch
    import zmq

    from kvconf import sidechannel as sc
    from kvconf.pattern import block_pattern
    from kvconf.units import parse_bytes

    settings = ctx.settings
    proc = path = None
    peer = conn.extra.peer
    if peer is None:
        proc, path = _start_peer(_peer_data(ctx, "kv_producer", "serve"))
    try:
        if proc is not None:
            peer = _wait_serving(proc, settings.timeout)
        cfg = conn.kv_cache_config
        views = conn._views
        layers = list(views)
        per_block = sum(v.shape[1] for v in views.values())
        total_target = parse_bytes(settings.transfer_bytes)
        requests = max(1, min(int(ctx.concurrency or settings.requests), cfg.num_blocks))
        per_req = ctx.prompt_blocks or max(1, cfg.num_blocks // requests)
        if requests * per_req > cfg.num_blocks:
            from kvconf.errors import ConfigError

            raise ConfigError(Problem(
                "bench.prompt_blocks", f"{requests} requests in flight of {per_req} blocks need {requests * per_req} "
                f"blocks; the cache has {cfg.num_blocks}", value=per_req,
                fix="lower bench.prompt_blocks or bench.concurrency, or raise kv_cache.num_blocks / kv_cache.memory"))
        round_bytes = requests * per_req * per_block
        rounds = max(1, -(-total_target // round_bytes))
        scheduler = type(conn)(conn.config, KVConnectorRole.SCHEDULER, cfg)
        control = zmq.Context.instance().socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        host, port = sc.parse_address(peer)
        control.connect(f"tcp://{host}:{port}")

        def ask(msg: Any, timeout: float) -> Any:
            control.send(sc.encode(msg))
            if not control.poll(int(timeout * 1000)):
                raise TimeoutError
            return sc.decode(control.recv())

        try:
            ack = ask(sc.Hello(engine_id=conn.config.engine_id), conn.extra.handshake_timeout)
        except TimeoutError:
            raise ConnectorRuntimeError(Problem(
                "connector.extra.peer", f"the producer at {peer} did not answer within "
                f"{conn.extra.handshake_timeout:g} s", value=peer,
                fix="start it with action=serve, or check the address it printed")) from None
        if ack.layout != conn.layout_fingerprint():
            raise ConnectorRuntimeError(Problem("kv_cache", f"the producer at {peer} has another KV layout",
                                                fix="start both sides with the same kv_cache"))
        loaded = failed = 0
        bytes_ok = 0
        seconds = 0.0
        failures: dict[str, str] = {}
        recomputed: list[str] = []
        mismatched = 0
        deadline_total = time.monotonic() + settings.timeout
        producer_gone = False
        request_seconds: dict[str, float] = {}
        for rnd in range(rounds):
            if producer_gone:
                break
            reqs = []
            for r in range(requests):
                seed = rnd * requests + r
                rid = f"req-{conn.config.engine_id[:8]}-{seed}"
                ids = list(range(r * per_req, (r + 1) * per_req))
                if producer_gone:
                    failures[rid] = f"the producer at {peer} stopped answering"
                    failed += 1
                    continue
                try:
                    pack = ask(sc.Prefill(request_id=rid, seed=seed, num_blocks=per_req), conn.extra.transfer_timeout)
                except TimeoutError:
                    producer_gone = True
                    pack = sc.PrefillAck(request_id=rid, ok=False, reason=f"the producer at {peer} did not answer "
                                         f"the prefill within {conn.extra.transfer_timeout:g} s (transfer_timeout)")
                if not getattr(pack, "ok", False):
                    failures[rid] = getattr(pack, "reason", "prefill failed")
                    failed += 1
                    continue
                reqs.append((Request(rid, [seed] * (per_req * cfg.kv_cache_groups[0].kv_cache_spec.block_size),
                                     {"do_remote_prefill": True, "remote_address": peer}), ids, seed))
            if not reqs:
                if failures:
                    break
                continue
            n_groups = len(cfg.kv_cache_groups)
            for req, ids, _ in reqs:
                n, _async = scheduler.get_num_new_matched_tokens(req, 0)
                scheduler.update_state_after_alloc(req, KVCacheBlocks(tuple(list(ids) for _ in range(n_groups))), n or 0)
            meta = scheduler.build_connector_meta(SchedulerOutput([r.request_id for r, _, _ in reqs]))
            waiting = {r.request_id for r, _, _ in reqs}
            t0 = time.perf_counter()
            conn.bind_connector_metadata(meta)
            conn.start_load_kv(None)
            conn.clear_connector_metadata()
            finished: set[str] = set()
            while waiting - finished and time.monotonic() < deadline_total:
                _, recv = conn.get_finished(set())
                now_s = time.perf_counter() - t0
                for rid in (recv or set()) - finished:
                    request_seconds[rid] = now_s  # from the consumer's request to its last block
                finished |= recv or set()
                if waiting - finished:
                    conn.wait_for_results(0.05)
            seconds += time.perf_counter() - t0
            round_failures = conn.take_failures()
            conn.get_block_ids_with_load_errors()
            for rid in waiting - finished:
                round_failures.setdefault(rid, f"no result within the self-test's {settings.timeout:g} s")
            failures.update(round_failures)
            if any("within" in why for why in round_failures.values()):
                producer_gone = True  # it stopped answering: the remaining requests fail at once
            for req, ids, seed in reqs:
                if req.request_id in round_failures:
                    failed += 1
                    continue
                loaded += 1
                for li, name in enumerate(layers):
                    for j, b in enumerate(ids):
                        if not torch.equal(views[name][b], block_pattern(seed, li, j, views[name].shape[1])):
                            mismatched += 1
                bytes_ok += len(ids) * per_block
        control.close(linger=0)
        scheduler.shutdown()
        if conn.config.kv_load_failure_policy == "recompute":
            recomputed = sorted(failures)
        result = {
            "bytes": bytes_ok, "verified": mismatched == 0 and loaded > 0, "seconds": round(seconds, 6),
            "gbps": round(bytes_ok / seconds / 1e9, 3) if seconds > 0 else None,
            "loaded_bytes": bytes_ok, "load_seconds": round(seconds, 6),
            "request_seconds": [round(v, 6) for k, v in request_seconds.items() if k not in failures],
            "transport": conn.transport, "transport_reason": conn.transport_reason,
            "requests": loaded + failed, "loaded_requests": loaded, "failed_requests": failed,
            "recomputed": recomputed, "rounds": rounds, "blocks_per_request": per_req,
            "mismatched_blocks": mismatched, "peer": peer, "peer_started": proc is not None,
        }
        if mismatched:
            raise ConnectorRuntimeError(Problem("self_test", f"{mismatched} loaded block(s) differ from what the "
                                                "producer computed", fix="the transfer path is wrong"))
        if failures and conn.config.kv_load_failure_policy == "fail":
            first = sorted(failures.items())[:5]
            raise ConnectorRuntimeError(Problem(
                "self_test", f"{len(failures)} of {loaded + failed} requests failed to load (kv_load_failure_policy=fail)",
                details=tuple(f"{rid}: {why}" for rid, why in first),
                fix="check the producer; with connector.kv_load_failure_policy=recompute they are recomputed"))
        if failures:
            log.warning("%d request(s) will be recomputed: %s", len(failures), ", ".join(sorted(failures)[:5]))
        return result
    finally:
        if proc is not None:
            code = _stop_peer(proc, path)
            if code not in (0, None):
                log.warning("the producer peer exited with %s", code)


def _bare_engine(conn: P2PConnector, ctx: SelfTestContext) -> dict[str, Any]:
    """The engine alone on the blocks of one round of the self-test: a producer peer prefills the
    requests; in pull mode this process READs each request's regions with the engine call alone,
    in push mode the producer WRITEs them and reports the engine's own time."""
    import zmq

    from kvconf import sidechannel as sc

    proc, path = _start_peer(_peer_data(ctx, "kv_producer", "serve"))
    control = zmq.Context.instance().socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    try:
        peer = _wait_serving(proc, ctx.settings.timeout)
        host, port = sc.parse_address(peer)
        control.connect(f"tcp://{host}:{port}")

        def ask(msg: Any) -> Any:
            control.send(sc.encode(msg))
            if not control.poll(int(conn.extra.transfer_timeout * 1000)):
                raise ConnectorRuntimeError(Problem("bench", f"the producer at {peer} stopped answering"))
            return sc.decode(control.recv())

        hello = ask(sc.Hello(engine_id=conn.config.engine_id))
        cfg = conn.kv_cache_config
        requests = max(1, min(int(ctx.concurrency or ctx.settings.requests), cfg.num_blocks))
        per = min(ctx.prompt_blocks or cfg.num_blocks // requests, cfg.num_blocks // requests) or 1
        moved, seconds = 0, 0.0
        for r in range(requests):
            rid = f"bare-{r}"
            ask(sc.Prefill(request_id=rid, seed=r, num_blocks=per))
            ids = list(range(r * per, (r + 1) * per))
            reply = ask(sc.Transfer(request_id=rid, session=conn._session, layout=conn.layout_fingerprint(),
                                    layers=conn.layer_regions(), block_ids=ids, mode="pull" if conn.pull else "push",
                                    meta=conn._engine_meta))
            if isinstance(reply, sc.PullSource):
                t0 = time.perf_counter()
                handle = conn._engine_read(hello.meta, reply.src, reply.dst, reply.lens)
                while (state := conn._engine_poll(handle)) == "PROC":
                    pass
                seconds += time.perf_counter() - t0
                control.send(sc.encode(sc.Release(request_id=rid, ok=state == "DONE")))
                moved += sum(reply.lens) if state == "DONE" else 0
            elif isinstance(reply, sc.TransferResult) and reply.status == "done":
                moved += reply.bytes
                seconds += reply.seconds
        return {"path": f"the bare engine ({'READ by the consumer' if conn.pull else 'write by the producer'}), "
                        "same blocks, two processes", "bytes": moved,
                "gbps": round(moved / seconds / 1e9, 3) if seconds else None}
    finally:
        control.close(linger=0)
        _stop_peer(proc, path)


def _run_as_producer(conn: P2PConnector, kv_caches: dict[str, Any], ctx: SelfTestContext) -> dict[str, Any]:
    """This process is the producer: serve, start a consumer peer, report what it verified."""
    import json

    stop = threading.Event()
    server = _Producer(conn)
    address = server.bind()
    thread = threading.Thread(target=server.run, args=(stop,), name=f"kvconf-{conn.config.name}-serve", daemon=True)
    thread.start()
    proc, path = _start_peer(_peer_data(ctx, "kv_consumer", "run", peer=address))
    try:
        out, err = proc.communicate(timeout=ctx.settings.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
        os.unlink(path)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not report.get("ok"):
        problems = report.get("error", {}).get("problems", [])
        raise ConnectorRuntimeError(Problem(
            "self_test", f"the consumer peer exited {proc.returncode}",
            details=tuple(p.get("message", "") for p in problems) or tuple(err.strip().splitlines()[-6:])))
    st = dict(report["self_test"])
    st.update({"served_requests": server.served, "peer": "consumer process", "peer_started": True})
    return st

"""The producer (prefill) side of the peer-to-peer connectors: the side-channel server that holds
finished requests' blocks for the decodes that read them.

A held request (a hold) names its block ids, group by group, and its lease. Holds come from the
vLLM worker (the blocks vLLM kept at ``request_finished``, :meth:`Producer.hold`) or, under
kvconf's engine simulator, from a :class:`~.protocol.Prefill` message that computes a request's
KV first (the simulator's proxy part; its answer carries the request's ``kv_transfer_params``).
A decode reads the blocks itself, straight from this process's memory, then sends
:class:`~.protocol.Release`; the hold ends then, or when its lease runs out, or (a hold a
simulator consumer asked for) when that consumer's connection closes. Ended holds are reported to
the connector (:meth:`Producer.take_ended`): vLLM frees their blocks then.

Only peers that hold the shared key get through the socket's handshake
(:mod:`kvconf_connectors.p2p.auth`). An admitted peer says ``Hello`` (its engine id) before anything
else; a hold a consumer asked for is that consumer's alone.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kvconf.runtime.pattern import block_pattern
from kvconf.runtime.process import stop_on_signals

from . import auth
from . import protocol as sc

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["Hold", "Producer", "block_runs", "serve_producer"]

log = logging.getLogger("kvconf.p2p")

EARLY_RELEASES = 10000
"""Releases remembered for holds not known yet (a decode can read before the vLLM worker learns of
the hold, a step later); the oldest are forgotten first."""


@dataclass
class Hold:
    """A finished request's blocks kept for a decode: ids group by group, until ``expires``
    (``time.monotonic()``)."""

    request_id: str
    block_ids: list[list[int]]
    expires: float
    owner: Optional[str] = None
    """The engine id of the simulator consumer that asked for the prefill (None: anyone with the key)."""
    created: float = 0.0


class Producer:
    """The producer's side-channel server and its holds."""

    def __init__(self, conn: Endpoint) -> None:
        self.conn = conn
        self.num_blocks = conn.kv_cache_config.num_blocks
        self.groups = len(conn.kv_cache_config.kv_cache_groups)
        """A request holds ids in each group (a hybrid model's groups share one allocation, so each
        takes ids of its own)."""
        self.group_of = conn.kv_cache_config.group_of()
        self.free = collections.deque(range(self.num_blocks))
        """Blocks the simulator's prefills may use (vLLM's own pool in vLLM)."""
        self.holds: collections.OrderedDict[str, Hold] = collections.OrderedDict()
        self.early: collections.OrderedDict[str, tuple[float, bool]] = collections.OrderedDict()
        self.incoming: queue.Queue[Hold] = queue.Queue()
        self.ended: set[str] = set()
        self.ended_lock = threading.Lock()
        self.simulated = True
        """The simulator's prefills own the blocks they hold (freed here when the hold ends)."""
        self.waker = sc.Waker()
        self.sock: Any = None
        self.served = self.failed = self.bytes = self.rejected = self.expired = 0
        self.key: Optional[auth.AuthKey] = None
        self.monitor: Any = None
        self.peers: dict[bytes, str] = {}
        """Admitted peers (their socket identity) that said Hello: their engine id."""
        self.on_fd: dict[int, set[bytes]] = {}
        """The peers whose messages came on each connection: a closed connection ends their holds."""
        self.accepted: dict[int, str] = {}
        self.unattributed = 0
        self.refused = self.disconnected = 0
        self.verbose = False
        """One line on stderr per request served (``action=serve``)."""

    def bind(self, key: auth.AuthKey) -> str:
        """Binds the side channel, admitting holders of ``key`` only; ``HOST:PORT``."""
        import zmq

        ctx: Any = zmq.Context.instance()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, sc.MAX_SOCKET_BYTES)
        self.key = key
        auth.secure_server(self.sock, key)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        host, port = self.conn.extra.side_channel_host, self.conn.extra.side_channel_port
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.sock.close(linger=0)
            self.sock = None
            self.waker.close()
            auth.release_server()

    # ---- holds -----------------------------------------------------------------------------------
    def hold(self, request_id: str, block_ids: list[list[int]], lease: float) -> None:
        """Keeps a request's blocks for a decode for ``lease`` seconds (any thread: the vLLM
        worker's step hands them over)."""
        now = time.monotonic()
        self.incoming.put(Hold(request_id, [list(g) for g in block_ids], now + lease, None, now))
        self.waker.wake()

    def take_ended(self) -> set[str]:
        """The requests whose holds ended since the last call (read, expired or given up)."""
        with self.ended_lock:
            out, self.ended = self.ended, set()
        return out

    def _admit_holds(self) -> None:
        while True:
            try:
                h = self.incoming.get_nowait()
            except queue.Empty:
                return
            self.holds[h.request_id] = h
            early = self.early.pop(h.request_id, None)
            if early is not None:
                self.end(h.request_id, early[1])

    def end(self, request_id: str, ok: bool) -> None:
        """Ends a hold: its blocks are free again (here, or in vLLM once reported)."""
        h = self.holds.pop(request_id, None)
        if h is None:
            return
        if self.simulated:
            self.free.extend(b for g in h.block_ids for b in g)
        nbytes = sum(len(g) for g in h.block_ids) * self.bytes_per_block()
        if ok:
            self.served += 1
            self.bytes += nbytes
            if self.verbose:
                print(f"served {request_id}: {nbytes} B read in {(time.monotonic() - h.created) * 1000:.1f} ms "
                      "after its prefill", file=sys.stderr, flush=True)
        else:
            self.failed += 1
        with self.ended_lock:
            self.ended.add(request_id)
        self.conn._finished.set()

    def bytes_per_block(self) -> int:
        regions = self.conn._regions
        return sum(page for _, _, page in regions.values()) // max(1, self.groups)

    def expire_leases(self) -> None:
        """A hold no decode released within its lease (none came, or one died reading) ends: its
        blocks are free again; later decodes of it fail their read and recompute."""
        now = time.monotonic()
        while self.holds:
            oldest = min(self.holds.values(), key=lambda x: x.expires)
            if oldest.expires > now:
                return
            rid = oldest.request_id
            log.warning("the lease of %s expired after %g s: no decode released it; its blocks are free again",
                        rid, oldest.expires - oldest.created)
            self.expired += 1
            self.end(rid, False)

    # ---- the server ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.waker.r, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while not stop.is_set():
            self._admit_holds()
            self.expire_leases()
            self.conn._engine_progress()
            wait = 1 if self.conn.needs_progress else 100
            ready = dict(poller.poll(timeout=wait))
            if self.waker.r in ready:
                self.waker.drain()
            if self.monitor in ready:
                self.watch()
            if self.sock not in ready:
                continue
            for _ in range(256):  # what came meanwhile, a burst at once (bounded: a flood cannot starve the rest)
                if stop.is_set():  # a signal stops it between two messages, not after the burst
                    break
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.receive(frames)

    def receive(self, frames: list[Any]) -> None:
        """One message off the socket: checked, decoded and handled (or rejected, saying why)."""
        import zmq

        if len(frames) != 2:
            self.rejected += 1
            log.warning("rejected a side-channel message of %d frames", len(frames))
            return
        ident, raw = frames[0].bytes, frames[1].bytes
        try:
            fd = frames[1].get(zmq.SRCFD)
        except zmq.ZMQError:  # pragma: no cover - a libzmq without it: holds end at their lease
            fd = -1
        self.on_fd.setdefault(fd, set()).add(ident)
        try:
            msg = sc.decode(raw)
        except sc.BadMessage as exc:
            self.rejected += 1
            log.warning("rejected a side-channel message: %s", exc)
            self.sock.send_multipart([ident, sc.encode(sc.Rejected(reason=str(exc)))])
            return
        self.handle(ident, msg)

    def watch(self) -> None:
        """The socket's monitor: refused handshakes, and closed connections (their holds end)."""
        import socket

        import zmq
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)
            event, value = ev["event"], ev["value"]
            if event == zmq.EVENT_ACCEPTED:
                try:  # a duplicate of libzmq's descriptor, its family read from it (IPv4 or IPv6)
                    with socket.socket(fileno=os.dup(value)) as s:
                        host, port = s.getpeername()[:2]
                        self.accepted[value] = f"{host}:{port}"
                except OSError:
                    self.accepted[value] = "an unknown address"
            elif event == zmq.EVENT_DISCONNECTED:
                address = self.accepted.pop(value, "an unknown address")
                idents = self.on_fd.pop(value, set())
                if not idents and self.unattributed:
                    self.unattributed -= 1
                    if self.refused <= 10 or self.refused % 100 == 0:
                        log.warning("refused the peer at %s: authentication failed (it has no key or another "
                                    "one); %d refused so far", address, self.refused)
                for ident in idents:
                    self.gone(ident, address)
            else:  # a handshake that failed: no key, another key, or not kvconf at all
                self.refused += 1
                self.unattributed += 1

    def gone(self, ident: bytes, address: str) -> None:
        """A peer's connection closed: the holds it asked for are free again, unless another
        connection of the same engine is still open (the simulator's consumer asks on one socket
        and reads on another)."""
        engine = self.peers.pop(ident, None)
        if engine is None or engine in self.peers.values():
            return
        owned = [rid for rid, h in self.holds.items() if h.owner == engine]
        if owned:
            self.disconnected += 1
            log.warning("the consumer %s at %s disconnected holding %d request(s); their blocks are free again",
                        engine, address, len(owned))
        for rid in owned:
            self.end(rid, False)

    def handle(self, ident: bytes, msg: Any) -> None:
        conn = self.conn
        engine = self.peers.get(ident)
        if isinstance(msg, sc.Hello):
            self.peers[ident] = msg.engine_id
            reply: Any = sc.HelloAck(engine_id=str(conn.config.engine_id), session=conn._session,
                                     layout=conn.layout_fingerprint(), transport=conn.transport,
                                     meta=conn._engine_meta, num_blocks=self.num_blocks, layers=conn.layer_regions())
        elif engine is None:
            self.rejected += 1
            reply = sc.Rejected(reason=f"say hello first: a {msg.type!r} message before the peer's hello")
        elif isinstance(msg, sc.Prefill):
            reply = self.prefill(msg, engine)
        elif isinstance(msg, sc.Release):
            self._admit_holds()
            h = self.holds.get(msg.request_id)
            if h is not None and h.owner not in (None, engine):
                self.rejected += 1
                log.warning("refused the release of %s from %s: another consumer asked for that request",
                            msg.request_id, engine)
                reply = sc.Rejected(reason=f"request {msg.request_id!r} is not yours: another consumer prefilled it")
            elif h is None:  # the hold comes a step later (vLLM), or it ended already
                self.early[msg.request_id] = (time.monotonic(), msg.ok)
                while len(self.early) > EARLY_RELEASES:
                    self.early.popitem(last=False)
                return
            else:
                self.end(msg.request_id, msg.ok)
                return
        else:
            self.rejected += 1
            reply = sc.Rejected(reason=f"a producer does not take {msg.type!r} messages")
        self.sock.send_multipart([ident, sc.encode(reply)])

    def prefill(self, msg: Any, engine: str) -> Any:
        """The simulator: computes a request's KV into free blocks (the pattern of (seed, layer,
        block)) for the consumer ``engine`` and holds them for it; answers with the request's
        ``kv_transfer_params``."""
        held = self.holds.get(msg.request_id)
        if held is not None and held.owner != engine:
            return sc.PrefillAck(request_id=msg.request_id, ok=False,
                                 reason=f"request {msg.request_id!r} belongs to another consumer")
        need = msg.num_blocks * self.groups
        if need > self.num_blocks:
            return sc.PrefillAck(request_id=msg.request_id, ok=False,
                                 reason=f"the request needs {need} blocks; this producer has {self.num_blocks}")
        if held is not None:
            self.free.extend(b for g in self.holds.pop(msg.request_id).block_ids for b in g)
        if len(self.free) < need:
            return sc.PrefillAck(request_id=msg.request_id, ok=False,
                                 reason=f"no free blocks: {len(self.holds)} request(s) wait for their decode")
        n = msg.num_blocks
        ids = [[self.free.popleft() for _ in range(n)] for _ in range(self.groups)]
        for li, (name, view) in enumerate(self.conn._views.items()):
            for j, b in enumerate(ids[self.group_of[name]]):
                view[b].copy_(block_pattern(msg.seed, li, j, view.shape[1]))
        lease = self.conn.extra.lease_seconds
        now = time.monotonic()
        self.holds[msg.request_id] = Hold(msg.request_id, ids, now + lease, engine, now)
        self.early.pop(msg.request_id, None)
        spec = self.conn.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        address = f"{self.conn.extra.side_channel_host}:{self.conn._side_channel}"
        params = sc.transfer_params(str(self.conn.config.engine_id), msg.request_id, ids, address,
                                    n * spec.block_size, lease)
        return sc.PrefillAck(request_id=msg.request_id, ok=True, params=params)


def block_runs(sids: list[int], dids: list[int], sstride: int, dstride: int,
               page: int) -> tuple[list[int], list[int], list[int]]:
    """One engine entry per run of blocks that are contiguous on both sides (vectorised: a request
    can have thousands of blocks), as offsets from each side's base, with their lengths in bytes;
    one entry per block where the blocks are not packed. The same for every layer of a group whose
    strides are the same, so a request's layers share one computation (at 32 layers, planning a
    request took 1 ms one layer at a time).

    >>> block_runs([0, 1, 2, 7], [3, 4, 9, 10], 10, 10, 10)
    ([0, 20, 70], [30, 90, 100], [20, 10, 10])
    >>> ids = [0, 1, 2, 7] * 20  # past 64 blocks, numpy: the same runs
    >>> block_runs(ids, [3, 4, 9, 10] * 20, 10, 10, 10)[2][:3], len(block_runs(ids, ids, 10, 10, 10)[0])
    ([20, 10, 10], 40)
    """
    if len(sids) <= 64:  # a short request: plain Python is faster than numpy's set-up
        s_l: list[int] = []
        d_l: list[int] = []
        n_l: list[int] = []
        packed = sstride == page == dstride
        for s, d in zip(sids, dids):
            so, do = s * sstride, d * dstride
            if packed and s_l and so == s_l[-1] + n_l[-1] and do == d_l[-1] + n_l[-1]:
                n_l[-1] += page
            else:
                s_l.append(so)
                d_l.append(do)
                n_l.append(page)
        return s_l, d_l, n_l
    import numpy as np

    s_off = np.asarray(sids, dtype=np.int64) * sstride
    d_off = np.asarray(dids, dtype=np.int64) * dstride
    if len(s_off) > 1 and sstride == page == dstride:
        breaks = np.nonzero((np.diff(s_off) != page) | (np.diff(d_off) != page))[0] + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(s_off)]))
        return s_off[starts].tolist(), d_off[starts].tolist(), ((ends - starts) * page).tolist()
    return s_off.tolist(), d_off.tolist(), [page] * len(s_off)


def serve_producer(conn: Any, stop: threading.Event, announce: bool = True) -> dict[str, Any]:
    """``action=serve``: serves consumers until SIGINT or SIGTERM (or ``stop``), as the engine
    simulator's prefill instance: it prefills requests on demand, answers with their
    ``kv_transfer_params`` and holds their blocks until their decode read them; what it served."""
    server = Producer(conn)
    server.verbose = announce
    key = conn._auth or auth.AuthKey.generate()
    with stop_on_signals(stop):
        try:
            address = server.bind(key)
            if conn._auth is None:  # consumers need it: a 0600 file, gone when serving ends
                key = auth.write_key_file(key, f"producer-{address.replace(':', '-')}.key")
            conn._side_channel = int(address.rsplit(":", 1)[1])
            listeners = conn.note_listeners()
            if announce:
                print(f"serving on {address} (key: {key.path or key.source})", flush=True)
                print("kvconf: listening on " + ", ".join(
                    f"{x['address']} ({x['what']}, {'authenticated' if x['authenticated'] else 'NOT authenticated'})"
                    for x in listeners), file=sys.stderr, flush=True)
                print(f"kvconf: {conn.config.name} producer {address}, engine session {conn._session}, transport "
                      f"{conn.transport} ({conn.transport_reason}); SIGINT or SIGTERM stops it",
                      file=sys.stderr, flush=True)
            server.run(stop)
        finally:
            server.close()
            if conn._auth is None and key.path:
                Path(key.path).unlink(missing_ok=True)
    return {"address": address, "served_requests": server.served, "failed_requests": server.failed,
            "bytes": server.bytes, "rejected_messages": server.rejected, "expired_leases": server.expired,
            "refused_peers": server.refused, "disconnected_consumers": server.disconnected,
            "auth_key": key.path or key.source, "listeners": conn.listeners(),
            "transport": conn.transport,
            "transport_reason": conn.transport_reason}

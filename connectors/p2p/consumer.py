"""The consumer's request loop of the peer-to-peer connectors: one thread that owns the DEALER
sockets to the producers, asks each for the blocks of the requests the scheduler assigned, reads
them (pull mode) or waits for the producer's write (push mode), and reports every request done or
failed; nothing is reported loaded unless all its bytes arrived.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import auth
from . import protocol as sc

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint, Recv

__all__ = ["Pending", "pull_loop"]

log = logging.getLogger("kvconf.p2p")


@dataclass
class Pending:
    """A request asked of a producer: its deadline, and whether its transfer request left."""

    recv: Recv
    deadline: float
    sent: bool = False


def pull_loop(conn: Endpoint) -> None:
    """Owns the consumer's DEALER sockets: sends transfer requests, collects results, fails a
    request whose result does not come in time, or at once where the producer refused the key."""
    import zmq

    ctx: Any = zmq.Context.instance()
    socks: dict[str, Any] = {}
    acked: dict[str, float] = {}  # peer -> time the handshake was sent (0 once answered)
    peer_meta: dict[str, bytes] = {}
    pending: dict[str, Pending] = {}
    reading: dict[str, tuple[Any, str]] = {}  # request -> (engine handle, peer), pull mode
    watches: dict[Any, tuple[str, auth.Handshake]] = {}  # monitor socket -> (peer, its handshake)
    poller = zmq.Poller()
    poller.register(conn._waker.r, zmq.POLLIN)

    def refused(peer: str, why: str) -> None:
        """The producer refused the handshake: every request to it fails now, saying why."""
        for rid, p in list(pending.items()):
            if p.recv.peer == peer:
                conn._fail(p.recv, why)
                del pending[rid]
        s = socks.pop(peer)
        acked.pop(peer, None)
        for mon, (owner, hs) in list(watches.items()):
            if owner == peer:
                poller.unregister(mon)
                hs.close()
                del watches[mon]
        poller.unregister(s)
        s.close(linger=0)
    def settle(rid: str, now: float) -> None:
        """A read in flight: once it ended (or overran its deadline), released at the producer and
        reported done or failed."""
        handle, peer = reading[rid]
        state = conn._engine_poll(handle)
        waiting = pending.get(rid)
        if state == "PROC" and waiting is not None and now <= waiting.deadline:
            return
        del reading[rid]
        ok = state == "DONE"
        socks[peer].send(sc.encode(sc.Release(request_id=rid, ok=ok)))
        if waiting is None:
            return
        del pending[rid]
        if ok:
            with conn._lock:
                conn._done.add(rid)
            conn._finished.set()
        else:
            conn._fail(waiting.recv, f"reading from the producer at {peer} failed (state {state})"
                       if state != "PROC" else f"reading from {peer} took over "
                       f"{conn.extra.transfer_timeout:g} s (transfer_timeout)")

    try:
        while not conn._stop.is_set():
            conn._waker.drain()
            while True:
                try:
                    r = conn._outbox.get_nowait()
                except queue.Empty:
                    break
                if not r.peer:
                    conn._fail(r, "no producer address: set connector.extra.peer=HOST:PORT")
                    continue
                if r.peer not in socks:
                    try:
                        host, port = sc.parse_address(r.peer)
                    except ValueError as exc:
                        conn._fail(r, f"bad producer address: {exc}")
                        continue
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.MAXMSGSIZE, sc.MAX_SOCKET_BYTES)
                    hs = auth.secure_client(s, conn._auth)
                    watches[hs.monitor] = (r.peer, hs)
                    poller.register(hs.monitor, zmq.POLLIN)
                    s.connect(f"tcp://{host}:{port}")
                    s.send(sc.encode(sc.Hello(engine_id=str(conn.config.engine_id))))
                    socks[r.peer] = s
                    acked[r.peer] = time.monotonic()
                    poller.register(s, zmq.POLLIN)
                if not r.request_id:  # connect only (P2PConnector.connect)
                    continue
                pending[r.request_id] = Pending(r, time.monotonic() + conn.extra.transfer_timeout)
            now = time.monotonic()
            for rid, p in list(pending.items()):
                peer = p.recv.peer
                if acked.get(peer, 0) and now - acked[peer] > conn.extra.handshake_timeout:
                    conn._fail(p.recv, f"the producer at {peer} did not answer within "
                                       f"{conn.extra.handshake_timeout:g} s (handshake_timeout)")
                    del pending[rid]
                elif not acked.get(peer, 0) and not p.sent:
                    socks[peer].send(sc.encode(sc.Transfer(
                        request_id=rid, session=conn._session, layout=conn.layout_fingerprint(),
                        layers=conn.layer_regions(), block_ids=p.recv.block_ids,
                        mode="pull" if conn.pull else "push", meta=conn._engine_meta)))
                    p.sent = True
                elif now > p.deadline:
                    conn._fail(p.recv, f"no transfer result from {peer} within "
                                       f"{conn.extra.transfer_timeout:g} s (transfer_timeout)")
                    del pending[rid]
            conn._engine_progress()
            for rid in list(reading):
                settle(rid, now)
            timeout = min((p.deadline for p in pending.values()), default=now + 0.5) - now
            if reading or conn.needs_progress:
                timeout = min(timeout, 0.001)
            for sock, _ in poller.poll(timeout=max(1, min(int(timeout * 1000) + 1, 500))):
                if sock == conn._waker.r:
                    continue
                if sock in watches:
                    peer, hs = watches[sock]
                    why = hs.failure(peer)
                    if why is not None:
                        log.warning("%s", why)
                        refused(peer, why)
                    continue
                if sock not in socks.values():
                    continue  # closed above: its producer refused the key
                peer = next(k for k, v in socks.items() if v is sock)
                for _ in range(256):  # what came meanwhile, a burst at once (bounded)
                    try:
                        raw = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = sc.decode(raw)
                    except sc.BadMessage as exc:
                        log.warning("ignored a bad side-channel message from %s: %s", peer, exc)
                        continue
                    if isinstance(msg, sc.HelloAck):
                        if msg.layout != conn.layout_fingerprint():
                            for rid, p in list(pending.items()):
                                if p.recv.peer == peer:
                                    conn._fail(p.recv, f"the producer at {peer} has another KV layout "
                                                       f"({msg.layout}, here {conn.layout_fingerprint()})")
                                    del pending[rid]
                        acked[peer] = 0
                        peer_meta[peer] = msg.meta
                        if conn.pull:
                            try:
                                conn._engine_connect(msg.meta)
                            except Exception as exc:  # the first read connects, or fails with the reason
                                log.warning("could not connect the engine to the producer at %s ahead of "
                                            "the first read: %s", peer, exc)
                        conn._ready.add(peer)
                        conn._finished.set()
                    elif isinstance(msg, sc.PullSource):
                        asked = pending.get(msg.request_id)
                        if asked is None:
                            sock.send(sc.encode(sc.Release(request_id=msg.request_id, ok=False)))
                            continue
                        try:
                            reading[msg.request_id] = (conn._engine_read(peer_meta.get(peer, b""), msg.src, msg.dst,
                                                                         msg.lens), peer)
                        except Exception as exc:  # the engine refused: the request fails
                            del pending[msg.request_id]
                            sock.send(sc.encode(sc.Release(request_id=msg.request_id, ok=False)))
                            conn._fail(asked.recv, f"reading from {peer} could not start: {exc}")
                            continue
                        settle(msg.request_id, time.monotonic())  # a read often ends as it starts
                    elif isinstance(msg, sc.TransferResult):
                        result_for = pending.pop(msg.request_id, None)
                        if result_for is None:
                            continue
                        if msg.status == "done":
                            with conn._lock:
                                conn._done.add(msg.request_id)
                            conn._finished.set()
                        else:
                            conn._fail(result_for.recv, f"the producer at {peer} failed the transfer: {msg.reason}")
                    elif isinstance(msg, sc.Rejected):
                        log.warning("the producer at %s rejected a message: %s", peer, msg.reason)
    finally:
        for _, hs in watches.values():
            hs.close()
        for s in socks.values():
            s.close(linger=0)


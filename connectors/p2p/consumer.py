"""The consumer's request loop of the peer-to-peer connectors: one thread that owns the DEALER
sockets to the producers, reads each request's blocks straight from its producer's memory with
the block ids its ``kv_transfer_params`` name, tells the producer when it is done (a
:class:`~.protocol.Release`), and reports every request done or failed; nothing is reported loaded
unless all its bytes arrived.

The only exchange with a producer before a read is the handshake, once per producer (the shared
key, then ``Hello``/``HelloAck``: the producer's engine, its layout and where its layers lie).
A request is checked against that answer before anything is read: the engine id its params name,
its block ids against the producer's block count, the layers on both sides. A request that fails
a check, or whose read fails or overruns ``transfer_timeout``, is reported failed with its blocks
(vLLM recomputes it).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from . import auth
from . import protocol as sc
from .producer import block_runs

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint, Recv

__all__ = ["LEASE_MARGIN", "Pending", "lease_ended", "plan_read", "pull_loop"]

log = logging.getLogger("kvconf.p2p")


@dataclass
class Pending:
    """A request to read: its deadline, and the read in flight (an engine handle) once started."""

    recv: Recv
    deadline: float
    handle: Any = None
    nbytes: int = 0


LEASE_MARGIN = 1.0
"""Seconds before the producer's lease ends (``remote_blocks_expiry_time``) after which no read
starts: the producer frees the blocks then (hosts' clocks are assumed to agree to well within it)."""


def lease_ended(recv: Recv) -> str:
    """Why a request whose lease ended is not read (or its read not trusted)."""
    return (f"the producer's lease on its blocks ended at {recv.expires:.3f} (remote_blocks_expiry_time, epoch "
            f"seconds; now {time.time():.3f}): the producer at {recv.peer} may have given them to another request "
            "(raise connector.extra.lease_seconds on the prefill)")


def plan_read(conn: Endpoint, ack: Any, recv: Recv) -> tuple[list[int], list[int], list[int]] | str:
    """The engine entries ``(remote src, local dst, lens)`` that read ``recv``'s blocks from the
    producer that answered ``ack``; the reason as a string where the request cannot be read (and
    nothing is)."""
    if ack.layout != conn.layout_fingerprint():
        return f"the producer at {recv.peer} has another KV layout ({ack.layout}, here {conn.layout_fingerprint()})"
    if recv.remote_engine_id and recv.remote_engine_id != ack.engine_id:
        return (f"the producer at {recv.peer} is engine {ack.engine_id!r}, the request's kv_transfer_params name "
                f"{recv.remote_engine_id!r} (remote_engine_id): a stale or foreign request")
    if len(recv.remote_block_ids) != len(recv.block_ids):
        return (f"kv_transfer_params.remote_block_ids has {len(recv.remote_block_ids)} KV-cache group(s); this "
                f"instance has {len(recv.block_ids)}")
    for g, (local, remote) in enumerate(zip(recv.block_ids, recv.remote_block_ids)):
        if len(remote) < len(local):
            return (f"kv_transfer_params.remote_block_ids[{g}] names {len(remote)} block(s); the request loads "
                    f"{len(local)}")
        bad = [b for b in remote if not 0 <= b < ack.num_blocks]
        if bad:
            return (f"kv_transfer_params.remote_block_ids[{g}] holds {bad[:4]}: out of range, the producer at "
                    f"{recv.peer} has blocks 0..{ack.num_blocks - 1}")
    pairs = _layer_pairs(conn, ack)
    if isinstance(pairs, str):
        return f"{pairs} between the peers (the producer at {recv.peer})"
    src: list[int] = []
    dst: list[int] = []
    lens: list[int] = []
    runs: dict[tuple[int, int, int, int], tuple[list[int], list[int], list[int]]] = {}
    for g, base, stride, page, their_base, their_stride in pairs:
        local = recv.block_ids[g]
        if not local:
            continue
        shape = (g, their_stride, stride, page)
        if shape not in runs:  # the layers of a group share their runs
            runs[shape] = block_runs(recv.remote_block_ids[g][:len(local)], local, their_stride, stride, page)
        s_off, d_off, run_lens = runs[shape]
        src.extend([their_base + x for x in s_off])
        dst.extend([base + x for x in d_off])
        lens.extend(run_lens)
    return src, dst, lens


def _layer_pairs(conn: Endpoint, ack: Any) -> list[tuple[int, int, int, int, int, int]] | str:
    """Each local layer with the producer's region of it: ``(group, base, stride, page, their
    base, their stride)``; or what differs. Kept on the connector, per producer (its regions are
    the connector's own: a cache shared by connectors would hand one the other's memory)."""
    key = (ack.engine_id, ack.session, ack.layout)
    cache = conn._read_pairs
    if key not in cache:
        if len(cache) > 256:  # producers come and go: bounded
            cache.clear()
        theirs = {r.name: r for r in ack.layers}
        group_of = conn.kv_cache_config.group_of()
        pairs: list[tuple[int, int, int, int, int, int]] | str = []
        for name, (base, stride, page) in conn._regions.items():
            region = theirs.get(name)
            if region is None or region.page != page:
                pairs = f"layer {name!r} differs"
                break
            assert isinstance(pairs, list)
            pairs.append((group_of[name], base, stride, page, region.base, region.block_stride))
        cache[key] = pairs
    return cache[key]


def pull_loop(conn: Endpoint) -> None:
    """Owns the consumer's DEALER sockets: handshakes, reads, releases; fails a request whose read
    does not end in time, or at once where the producer refused the key or a check fails."""
    import zmq

    ctx: Any = zmq.Context.instance()
    socks: dict[str, Any] = {}
    asked: dict[str, float] = {}  # peer -> when its Hello left (until answered)
    acks: dict[str, Any] = {}  # peer -> its HelloAck
    pending: dict[str, Pending] = {}
    watches: dict[Any, tuple[str, auth.Handshake]] = {}  # monitor socket -> (peer, its handshake)
    poller = zmq.Poller()
    poller.register(conn._waker.r, zmq.POLLIN)

    def close_peer(peer: str) -> None:
        s = socks.pop(peer)
        asked.pop(peer, None)
        acks.pop(peer, None)
        for mon, (owner, hs) in list(watches.items()):
            if owner == peer:
                poller.unregister(mon)
                hs.close()
                del watches[mon]
        poller.unregister(s)
        s.close(linger=0)

    def refused(peer: str, why: str) -> None:
        """The producer refused the handshake: every request to it fails now, saying why."""
        for rid, p in list(pending.items()):
            if p.recv.peer == peer:
                conn._fail(p.recv, why)
                del pending[rid]
        close_peer(peer)

    outgoing: list[tuple[str, bytes]] = []  # releases, sent by flush()
    told = [False]  # a read ended well since the last flush()

    def finish(rid: str, ok: bool, why: str = "", release: Optional[bool] = None) -> None:
        p = pending.pop(rid)
        if ok:
            with conn._lock:
                conn._done.add(rid)
            told[0] = True
        else:
            conn._fail(p.recv, why)
        if release is not None:
            outgoing.append((p.recv.peer, sc.encode(sc.Release(request_id=p.recv.remote_request_id, ok=release))))

    def flush() -> None:
        """The loads that ended are told at once (one wake-up for all), then the producers are
        released (encrypted sends: they need not delay the requests)."""
        if told[0]:
            told[0] = False
            conn._finished.set()
        for peer, raw in outgoing:
            if peer in socks:
                socks[peer].send(raw)
        outgoing.clear()

    def start(rid: str, p: Pending) -> None:
        if p.recv.expires is not None and time.time() > p.recv.expires - LEASE_MARGIN:
            finish(rid, False, lease_ended(p.recv))
            return
        plan = plan_read(conn, acks[p.recv.peer], p.recv)
        if isinstance(plan, str):
            finish(rid, False, plan)
            return
        src, dst, lens = plan
        try:
            p.handle = conn._engine_read(acks[p.recv.peer], src, dst, lens)
        except Exception as exc:  # the engine refused: the request fails
            finish(rid, False, f"reading from {p.recv.peer} could not start: {exc}", release=False)
            return
        p.nbytes = sum(lens)

    def settle(rid: str, p: Pending, now: float) -> None:
        """A read in flight: once it ended (or overran its deadline), released at the producer
        and reported done or failed."""
        state = conn._engine_poll(p.handle)
        if state == "PROC" and now <= p.deadline:
            return
        if state == "DONE" and p.recv.expires is not None and time.time() > p.recv.expires:
            finish(rid, False, lease_ended(p.recv))  # read after the producer let the blocks go
        elif state == "DONE":
            finish(rid, True, release=True)
        else:
            finish(rid, False, f"reading from the producer at {p.recv.peer} failed (state {state})"
                   if state != "PROC" else f"reading from {p.recv.peer} took over "
                   f"{conn.extra.transfer_timeout:g} s (transfer_timeout)", release=False)

    try:
        while not conn._stop.is_set():
            conn._waker.drain()
            while True:
                try:
                    r = conn._outbox.get_nowait()
                except queue.Empty:
                    break
                if not r.peer:
                    conn._fail(r, "no producer address: the request's kv_transfer_params name none "
                                  "(remote_host, remote_port)")
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
                    asked[r.peer] = time.monotonic()
                    poller.register(s, zmq.POLLIN)
                if not r.request_id:  # connect only (P2PConnector.connect)
                    continue
                pending[r.request_id] = Pending(r, time.monotonic() + conn.extra.transfer_timeout)
            now = time.monotonic()
            for rid, p in list(pending.items()):
                peer = p.recv.peer
                if p.handle is not None:
                    settle(rid, p, now)
                elif peer in acks:
                    start(rid, p)
                elif now - asked.get(peer, now) > conn.extra.handshake_timeout:
                    finish(rid, False, f"the producer at {peer} did not answer within "
                                       f"{conn.extra.handshake_timeout:g} s (handshake_timeout)")
                elif now > p.deadline:
                    finish(rid, False, f"nothing from {peer} within {conn.extra.transfer_timeout:g} s "
                                       "(transfer_timeout)")
            for rid, p in list(pending.items()):  # reads started above often ended as they started
                if p.handle is not None:
                    settle(rid, p, now)
            flush()
            for peer in [x for x, t in asked.items() if x not in acks and now - t > conn.extra.handshake_timeout]:
                if not any(p.recv.peer == peer for p in pending.values()):
                    close_peer(peer)  # a later request asks again (the producer may have restarted)
            conn._engine_progress()
            timeout = min((p.deadline for p in pending.values()), default=now + 0.5) - now
            wait_ms = max(1, min(int(timeout * 1000) + 1, 500))
            if any(p.handle is not None for p in pending.values()):
                wait_ms = 0  # reads in flight: spin on the engine, as the bare engine's caller does
            elif conn.needs_progress:
                wait_ms = 1
            for sock, _ in poller.poll(timeout=wait_ms):
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
                        acks[peer] = msg
                        asked.pop(peer, None)
                        try:
                            conn._engine_connect(msg)
                        except Exception as exc:  # the first read connects, or fails with the reason
                            log.warning("could not connect the engine to the producer at %s ahead of "
                                        "the first read: %s", peer, exc)
                        conn._ready.add(peer)
                        conn._finished.set()
                        for rid, p in list(pending.items()):
                            if p.recv.peer == peer and p.handle is None:
                                start(rid, p)
                    elif isinstance(msg, sc.Rejected):
                        log.warning("the producer at %s rejected a message: %s", peer, msg.reason)
    finally:
        for _, hs in watches.values():
            hs.close()
        for s in socks.values():
            s.close(linger=0)

"""The producer (prefill) side of the peer-to-peer connectors: the side-channel server that
prefills requests on demand and pushes their blocks into a consumer's memory (push mode), or tells
the consumer where they lie and frees them once read (pull mode).

Only peers that hold the shared key get through the socket's handshake
(:mod:`kvconf_connectors.p2p.auth`). An admitted peer says ``Hello`` (its engine id) before anything
else, and may only name the requests it prefilled: a request belongs to the engine id that asked for
it. A pull lease (blocks pinned while a consumer reads them) ends when its consumer releases it, when
the consumer's connection closes (it died, or gave up), or at ``transfer_timeout``, whichever comes
first.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, Optional

from kvconf.runtime.pattern import block_pattern

from . import auth
from . import protocol as sc

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["Producer", "block_runs"]

log = logging.getLogger("kvconf.p2p")


class Producer:
    """The producer's side-channel server and sender pool."""

    def __init__(self, conn: Endpoint) -> None:
        self.conn = conn
        self.num_blocks = conn.kv_cache_config.num_blocks
        self.groups = len(conn.kv_cache_config.kv_cache_groups)
        """A request holds ``num_blocks`` ids in each group, group after group (a hybrid model's
        groups share one allocation, so each takes ids of its own)."""
        self.group_of = conn.kv_cache_config.group_of()
        self.free = collections.deque(range(self.num_blocks))
        self.prefilled: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self.senders: list[tuple[queue.Queue[Any], threading.Thread]] = []
        self.sender_of: dict[str, int] = {}
        self.results: queue.Queue[tuple[bytes, bytes, str]] = queue.Queue()
        self.waker = sc.Waker()
        self.sock: Any = None
        self.served = self.failed = self.bytes = self.rejected = self.expired = 0
        self.busy: set[str] = set()
        self.pulling: dict[str, tuple[float, int, str, bytes]] = {}
        """Pull mode: requests whose blocks a consumer is reading (started, bytes, session, peer)."""
        self.key: Optional[auth.AuthKey] = None
        self.monitor: Any = None
        self.peers: dict[bytes, str] = {}
        """Admitted peers (their socket identity) that said Hello: their engine id."""
        self.owner: dict[str, str] = {}
        """Prefilled requests: the engine id that asked for each."""
        self.on_fd: dict[int, set[bytes]] = {}
        """The peers whose messages came on each connection: a closed connection ends their leases."""
        self.accepted: dict[int, str] = {}
        self.unattributed = 0
        self.refused = self.disconnected = 0
        """One sender thread per consumer session (up to ``num_workers``; more sessions share them):
        pushes to one consumer go one at a time, as concurrent batches to the same peer contend for
        its lanes (measured: 4 at once gave a third of one's throughput), and threads that only wait
        for the same peer cost GIL hand-offs (10 threads cost 15% at 16 KiB blocks against 1)."""
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
        return f"{host}:{port}"

    def close(self) -> None:
        for q, _ in self.senders:
            q.put(None)
        for _, t in self.senders:
            t.join()
        self.senders = []
        if self.sock is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.sock.close(linger=0)
            self.sock = None
            self.waker.close()
            auth.release_server()

    def run(self, stop: threading.Event) -> None:
        import zmq


        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.waker.r, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        wait = 1 if self.conn.needs_progress else 100
        while not stop.is_set():
            self.send_results()
            self.expire_leases()
            self.conn._engine_progress()
            ready = dict(poller.poll(timeout=wait))
            if self.waker.r in ready:
                self.waker.drain()
            if self.monitor in ready:
                self.watch()
            if self.sock not in ready:
                continue
            for _ in range(256):  # what came meanwhile, a burst at once (bounded: a flood cannot starve the rest)
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.receive(frames)
                self.send_results()  # an answer leaves at once, not after the rest of the burst
        self.send_results()

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
        except zmq.ZMQError:  # pragma: no cover - a libzmq without it: leases end at their timeout
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
        """The socket's monitor: refused handshakes, and closed connections (their leases end)."""
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
        """A peer's connection closed: the blocks it was reading are free again."""
        engine = self.peers.pop(ident, None)
        held = [rid for rid, lease in self.pulling.items() if lease[3] == ident]
        if held:
            self.disconnected += 1
            log.warning("the consumer %s at %s disconnected while reading %d request(s); their blocks are free "
                        "again", engine, address, len(held))
        for rid in held:
            self.release(sc.Release(request_id=rid, ok=False))

    def sender(self, session: str) -> queue.Queue[Any]:
        """The queue of the thread that pushes to ``session``."""
        i = self.sender_of.get(session)
        if i is None:
            if len(self.senders) < self.conn.extra.num_workers:
                q: queue.Queue[Any] = queue.Queue()
                t = threading.Thread(target=self._send_loop, args=(q,), daemon=True,
                                     name=f"kvconf-{self.conn.config.name}-send-{len(self.senders)}")
                t.start()
                self.senders.append((q, t))
            i = self.sender_of[session] = len(self.sender_of) % len(self.senders)
        return self.senders[i][0]

    def _send_loop(self, q: queue.Queue[Any]) -> None:
        """Pushes what the queue holds until its ``None``: the requests that queued while one was
        pushed go together (64 at most; a request named twice waits for the next batch)."""
        item = q.get()
        while item is not None:
            batch, names = [item], {item[1].request_id}
            while len(batch) < 64:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = q
                    break
                if item is None or item[1].request_id in names:
                    break
                batch.append(item)
                names.add(item[1].request_id)
            else:
                item = q
            self.push(batch)
            if item is q:
                item = q.get()

    def expire_leases(self) -> None:
        """Pull mode: a consumer that never releases what it read (it died between the answer and
        its release, or never meant to) holds the blocks for ``transfer_timeout`` at most: by then
        it has given up on them too. Later consumers are never refused because of it."""
        if not self.pulling:
            return
        limit = self.conn.extra.transfer_timeout
        now = time.perf_counter()
        for rid, (started, _, session, _) in list(self.pulling.items()):
            if now - started > limit:
                log.warning("the lease of %s expired after %g s: %s never released it; its blocks are free again",
                            rid, limit, session)
                self.expired += 1
                self.release(sc.Release(request_id=rid, ok=False))

    def release(self, msg: Any) -> None:
        """Pull mode: the consumer finished reading (or gave up); the blocks are free again."""
        started, nbytes, session, _ = self.pulling.pop(msg.request_id, (None, 0, "", b""))
        if started is None:
            return
        self.busy.discard(msg.request_id)
        self.owner.pop(msg.request_id, None)
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

        conn = self.conn
        engine = self.peers.get(ident)
        if isinstance(msg, sc.Hello):
            self.peers[ident] = msg.engine_id
            reply: Any = sc.HelloAck(engine_id=str(conn.config.engine_id), session=conn._session,
                                     layout=conn.layout_fingerprint(), transport=conn.transport,
                                     meta=conn._engine_meta)
        elif engine is None:
            self.rejected += 1
            reply = sc.Rejected(reason=f"say hello first: a {msg.type!r} message before the peer's hello")
        elif isinstance(msg, sc.Prefill):
            reply = self.prefill(msg, engine)
        elif isinstance(msg, (sc.Transfer, sc.Release)) and self.owner.get(msg.request_id, engine) != engine:
            self.rejected += 1
            log.warning("refused %s of %s from %s: another consumer asked for that request", msg.type,
                        msg.request_id, engine)
            reason = f"request {msg.request_id!r} is not yours: another consumer prefilled it"
            reply = (sc.TransferResult(request_id=msg.request_id, status="failed", reason=reason)
                     if isinstance(msg, sc.Transfer) else sc.Rejected(reason=reason))
        elif isinstance(msg, sc.Transfer):
            if msg.mode == "pull":  # nothing moves here: answered from this thread, without a hand-off
                self.push([(ident, msg)])
            else:
                self.sender(msg.session).put((ident, msg))
            return
        elif isinstance(msg, sc.Release):
            if msg.request_id in self.pulling and self.pulling[msg.request_id][3] != ident:
                self.rejected += 1
                reply = sc.Rejected(reason=f"request {msg.request_id!r} is being read on another connection")
            else:
                self.release(msg)
                return
        else:
            self.rejected += 1
            reply = sc.Rejected(reason=f"a producer does not take {msg.type!r} messages")
        self.sock.send_multipart([ident, sc.encode(reply)])

    def prefill(self, msg: Any, engine: str) -> Any:
        """Computes a request's KV into free blocks (the pattern of (seed, layer, block)) for the
        consumer ``engine``; the request is that consumer's alone."""
        held = self.owner.get(msg.request_id)
        if held is not None and held != engine:
            return sc.PrefillAck(request_id=msg.request_id, ok=False,
                                 reason=f"request {msg.request_id!r} belongs to another consumer")

        need = msg.num_blocks * self.groups
        if need > self.num_blocks:
            return sc.PrefillAck(request_id=msg.request_id, ok=False,
                                 reason=f"the request needs {need} blocks; this producer has {self.num_blocks}")
        while len(self.free) < need and self.prefilled:
            stale = next((r for r in self.prefilled if r not in self.busy), None)
            if stale is None:
                break
            self.free.extend(self.prefilled.pop(stale))  # never fetched: the oldest goes first
            self.owner.pop(stale, None)
        if len(self.free) < need:
            return sc.PrefillAck(request_id=msg.request_id, ok=False, reason="no free blocks: transfers in flight")
        if msg.request_id in self.prefilled:
            self.free.extend(self.prefilled.pop(msg.request_id))
        ids = [self.free.popleft() for _ in range(need)]
        n = msg.num_blocks
        for li, (name, view) in enumerate(self.conn._views.items()):
            g = self.group_of[name]
            for j, b in enumerate(ids[g * n:(g + 1) * n]):
                view[b].copy_(block_pattern(msg.seed, li, j, view.shape[1]))
        self.prefilled[msg.request_id] = ids
        self.owner[msg.request_id] = engine
        return sc.PrefillAck(request_id=msg.request_id, ok=True)

    def push(self, batch: list[tuple[bytes, Any]]) -> None:
        """Pushes the blocks of a batch of transfer requests into their consumers' memory, the
        requests of one consumer in one engine call (at 8 KiB pages a request's transfer is short
        and the engine's per-call cost dominates); answers each done or failed."""
        t0 = time.perf_counter()
        planned: dict[tuple[str, Any], list[tuple[bytes, Any, list[int], list[int], list[int]]]] = {}
        for ident, msg in batch:
            try:
                plan = self.plan(ident, msg)
            except Exception as exc:  # a sender thread must always answer
                plan = f"{type(exc).__name__}: {exc}"
            if isinstance(plan, str):
                self.answer(ident, msg, plan, 0, t0)
            elif plan is not None:
                planned.setdefault((msg.session, msg.meta), []).append((ident, msg, *plan))
        for items in planned.values():
            src = [a for item in items for a in item[2]]
            dst = [a for item in items for a in item[3]]
            lens = [n for item in items for n in item[4]]
            try:
                error = self.conn._engine_push(items[0][1], src, dst, lens)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            for ident, msg, _, _, item_lens in items:
                self.answer(ident, msg, error or "", 0 if error else sum(item_lens), t0)

    def plan(self, ident: bytes, msg: Any) -> Any:
        """A transfer request's engine entries ``(src, dst, lens)``; None when it is a pull (its
        answer is on its way); the reason as a string when it cannot be served."""
        conn = self.conn
        src_ids = self.prefilled.get(msg.request_id)
        if src_ids is None:
            return f"unknown request {msg.request_id!r}: it was never prefilled here"
        if msg.layout != conn.layout_fingerprint():
            return f"layout mismatch: consumer {msg.layout}, producer {conn.layout_fingerprint()}"
        if len(msg.block_ids) != len(src_ids):
            return f"the consumer asks for {len(msg.block_ids)} blocks; the request has {len(src_ids)}"
        self.busy.add(msg.request_id)
        src: list[int] = []
        dst: list[int] = []
        lens: list[int] = []
        runs: dict[tuple[int, int, int, int], tuple[list[int], list[int], list[int]]] = {}
        n = len(src_ids) // self.groups
        for region in msg.layers:
            local = conn._regions.get(region.name)
            if local is None or local[2] != region.page:
                return f"layer {region.name!r} differs between the peers"
            base, stride, page = local
            g = self.group_of[region.name]
            shape = (g, stride, region.block_stride, page)
            if shape not in runs:  # the layers of a group share their runs
                runs[shape] = block_runs(src_ids[g * n:(g + 1) * n], msg.block_ids[g * n:(g + 1) * n], stride,
                                         region.block_stride, page)
            s_off, d_off, run_lens = runs[shape]
            src.extend([base + x for x in s_off])
            dst.extend([region.base + x for x in d_off])
            lens.extend(run_lens)
        if msg.mode == "pull":  # the consumer reads: tell it where; the blocks stay until released
            self.pulling[msg.request_id] = (time.perf_counter(), sum(lens), msg.session, ident)
            self.results.put((ident, sc.encode(sc.PullSource(request_id=msg.request_id, src=src, dst=dst,
                                                             lens=lens)), ""))
            self.waker.wake()
            return None
        return src, dst, lens

    def answer(self, ident: bytes, msg: Any, reason: str, nbytes: int, t0: float) -> None:
        """Ends a pushed request: done (its blocks are free again) or failed with ``reason``."""
        self.busy.discard(msg.request_id)
        status: Literal["done", "failed"] = "failed" if reason else "done"
        if status == "done":
            self.owner.pop(msg.request_id, None)
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


def block_runs(sids: list[int], dids: list[int], sstride: int, dstride: int,
               page: int) -> tuple[list[int], list[int], list[int]]:
    """One engine entry per run of blocks that are contiguous on both sides (vectorised: a request
    can have thousands of blocks), as offsets from each side's base, with their lengths in bytes;
    one entry per block where the blocks are not packed. The same for every layer of a group whose
    strides are the same, so a request's layers share one computation (at 32 layers, planning a
    request took 1 ms one layer at a time).

    >>> block_runs([0, 1, 2, 7], [3, 4, 9, 10], 10, 10, 10)
    ([0, 20, 70], [30, 90, 100], [20, 10, 10])
    """
    import numpy as np

    s_off = np.asarray(sids, dtype=np.int64) * sstride
    d_off = np.asarray(dids, dtype=np.int64) * dstride
    if len(s_off) > 1 and sstride == page == dstride:
        breaks = np.nonzero((np.diff(s_off) != page) | (np.diff(d_off) != page))[0] + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(s_off)]))
        return s_off[starts].tolist(), d_off[starts].tolist(), ((ends - starts) * page).tolist()
    return s_off.tolist(), d_off.tolist(), [page] * len(s_off)

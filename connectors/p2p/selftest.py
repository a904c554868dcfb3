"""The two-process self-test of the peer-to-peer connectors: this process is one side (consumer or
producer), a peer process started with the job's own config (``python -m kvconf.cli.peer``) is the
other; every block that arrives is verified against the pattern the producer computed. Also the
bare engine on the same blocks, the raw path of ``action=bench``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, cast

from kvconf.contract.api import KVCacheBlocks, KVConnectorRole, Request, SchedulerOutput
from kvconf.contract.capabilities import SelfTestContext
from kvconf.errors import ConfigError, ConnectorRuntimeError, Problem
from kvconf.runtime.pattern import block_pattern
from kvconf.runtime.process import PARENT_ENV
from kvconf.units import parse_bytes

from . import auth
from . import protocol as sc
from .consumer import plan_read
from .endpoint import Recv
from .producer import Producer

if TYPE_CHECKING:  # pragma: no cover
    from kvconf.contract.base import KVConnectorBase

    from .endpoint import Endpoint

__all__ = ["PEER_MODULE", "Control", "bare_engine", "peer_config", "peer_log", "run_as_consumer", "run_as_producer", "start_peer",
           "stop_peer", "wait_serving"]

log = logging.getLogger("kvconf.p2p")

MAX_ROUNDS = 1000
"""Most rounds one self-test moves (``min_seconds`` asks for more than the bytes do)."""

FULL_RETRY_SECONDS = 2.0
"""How long a prefill the producer refused for want of free blocks is asked again: the releases
of the round before travel on the connector's own socket and may reach the producer after it."""

PEER_MODULE = "kvconf.cli.peer"
"""What a peer process runs: one job from a composed config written as JSON (``-m``)."""


def peer_config(ctx: SelfTestContext, kv_role: str, action: str, peer: Optional[str] = None) -> dict[str, Any]:
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


def start_peer(data: dict[str, Any], key: auth.AuthKey) -> tuple[subprocess.Popen, str]:
    """Starts the peer process with the job's config and this side's key (in its environment).
    A serving peer's stderr is read as it comes, its last lines kept (:func:`peer_log`): it logs
    a line per request served, and a pipe nobody reads holds 64 KiB, after which the peer blocked
    in its next log line and stopped answering (about 830 requests in)."""
    fd, path = tempfile.mkstemp(prefix="kvconf-peer-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    env = {**os.environ, PARENT_ENV: str(os.getpid()), auth.ENV: key.text}
    proc = subprocess.Popen([sys.executable, "-m", PEER_MODULE, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    if data.get("action") == "serve":
        tail: collections.deque[str] = collections.deque(maxlen=PEER_LOG_LINES)
        _PEER_LOGS[proc.pid] = tail
        threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True,
                         name=f"kvconf-peer-{proc.pid}-stderr").start()
    return proc, path


PEER_LOG_LINES = 40
"""The last lines of a serving peer's stderr kept for an error message."""

_PEER_LOGS: dict[int, collections.deque[str]] = {}


def _drain(stream: Any, tail: collections.deque[str]) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line.rstrip("\n"))


def peer_log(proc: subprocess.Popen) -> list[str]:
    """The last lines a serving peer wrote to stderr, as read so far."""
    return list(_PEER_LOGS.get(proc.pid, ()))


def wait_serving(proc: subprocess.Popen, timeout: float) -> str:
    """The address a serving peer prints as ``serving on HOST:PORT``."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            if line.startswith("serving on "):  # serving on HOST:PORT (key: ...)
                return line.split("serving on ", 1)[1].split()[0]
            if not line and proc.poll() is not None:
                break
    proc.kill()
    proc.wait()
    time.sleep(0.05)  # the stderr reader takes the last lines
    raise ConnectorRuntimeError(Problem("self_test", f"the producer peer did not start serving within {timeout:g} s",
                                        details=tuple(peer_log(proc)[-6:]),
                                        fix="run the producer by hand: python -m kvconf connector=NAME "
                                            "connector.kv_role=kv_producer action=serve"))


def stop_peer(proc: subprocess.Popen, path: str) -> int:
    try:
        _PEER_LOGS.pop(proc.pid, None)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode
    finally:
        with contextlib.suppress(FileNotFoundError):  # the peer removes it once read
            os.unlink(path)


class Control:
    """A DEALER socket to the producer at ``peer`` that proves this side's key."""

    def __init__(self, conn: Endpoint, peer: str) -> None:
        import zmq

        self.conn, self.peer = conn, peer
        self.sock: Any = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.hs = auth.secure_client(self.sock, conn._auth)
        host, port = sc.parse_address(peer)
        self.sock.connect(f"tcp://{host}:{port}")

    def send(self, msg: Any) -> None:
        self.sock.send(sc.encode(msg))

    def ask(self, msg: Any, timeout: float) -> Any:
        """The producer's answer to ``msg``; a :class:`ConnectorRuntimeError` (exit 1) where it
        refused this side's key, :class:`TimeoutError` where it did not answer within ``timeout`` s."""
        self.send(msg)
        why = self.hs.wait(self.sock, self.peer, timeout)
        if why is not None:
            message, _, fix = why.partition("; fix: ")
            where = self.conn.extra.auth_key_file
            raise ConnectorRuntimeError(Problem("connector.extra.auth_key_file", message, fix=fix)
                                        if where is None else
                                        Problem("connector.extra.auth_key_file", message, value=where, fix=fix))
        if not self.sock.poll(0):
            raise TimeoutError
        return sc.decode(self.sock.recv())

    def close(self) -> None:
        self.hs.close()
        self.sock.close(linger=0)


def run_as_consumer(conn: Endpoint, kv_caches: dict[str, Any], ctx: SelfTestContext) -> dict[str, Any]:
    """This process is the consumer: start (or reach) a producer, fetch rounds of requests, verify."""
    import torch

    settings = ctx.settings
    proc = path = None
    peer = conn.extra.peer
    if peer is None:
        conn._auth = conn._auth or auth.AuthKey.generate()  # the peer gets it: nobody else can ask
        proc, path = start_peer(peer_config(ctx, "kv_producer", "serve"), conn._auth)
    try:
        if proc is not None:
            peer = wait_serving(proc, settings.timeout)
        cfg = conn.kv_cache_config
        views = conn._views
        layers = list(views)
        per_block = sum(v.shape[1] for v in views.values())
        total_target = parse_bytes(settings.transfer_bytes)
        requests = max(1, min(int(ctx.concurrency or settings.requests), cfg.num_blocks))
        n_groups = len(cfg.kv_cache_groups)  # each group holds its own ids for a request
        group_of = cfg.group_of()
        per_req = ctx.prompt_blocks or max(1, cfg.num_blocks // (requests * n_groups))
        if requests * per_req * n_groups > cfg.num_blocks:
            raise ConfigError(Problem(
                "bench.prompt_blocks", f"{requests} requests in flight of {per_req} blocks need "
                f"{requests * per_req * n_groups} blocks (in {n_groups} KV-cache group(s)); the cache has "
                f"{cfg.num_blocks}", value=per_req,
                fix="lower bench.prompt_blocks or bench.concurrency, or raise kv_cache.num_blocks / kv_cache.memory"))
        round_bytes = requests * per_req * per_block
        rounds = max(1, -(-total_target // round_bytes))
        scheduler: KVConnectorBase = cast("type[KVConnectorBase]", type(conn))(conn.config, KVConnectorRole.SCHEDULER, cfg)
        control = Control(conn, peer)
        ask = control.ask
        try:
            ack = ask(sc.Hello(engine_id=str(conn.config.engine_id)), conn.extra.handshake_timeout)
        except TimeoutError:
            raise ConnectorRuntimeError(Problem(
                "connector.extra.peer", f"the producer at {peer} did not answer within "
                f"{conn.extra.handshake_timeout:g} s", value=peer,
                fix="start it with action=serve, or check the address it printed")) from None
        if ack.layout != conn.layout_fingerprint():
            raise ConnectorRuntimeError(Problem("kv_cache", f"the producer at {peer} has another KV layout",
                                                fix="start both sides with the same kv_cache"))
        conn.connect(peer, conn.extra.handshake_timeout)  # as an engine at start-up: the rounds time transfers
        loaded = failed = 0
        bytes_ok = 0
        seconds = 0.0
        failures: dict[str, str] = {}
        recomputed: list[str] = []
        mismatched = 0
        deadline_total = time.monotonic() + settings.timeout
        producer_gone = False
        request_seconds: dict[str, float] = {}
        rnd = -1
        while (rnd := rnd + 1) < rounds or (seconds < ctx.min_seconds and rnd < MAX_ROUNDS
                                             and time.monotonic() < deadline_total):
            if producer_gone:
                break
            reqs = []
            for r in range(requests):
                seed = rnd * requests + r
                rid = f"req-{str(conn.config.engine_id)[:8]}-{seed}"
                ids = tuple([(g * requests + r) * per_req + j for j in range(per_req)] for g in range(n_groups))
                if producer_gone:
                    failures[rid] = f"the producer at {peer} stopped answering"
                    failed += 1
                    continue
                # the previous round's releases go from the connector's own socket, this prefill from
                # the driver's: the producer may see it first and find its blocks still held, for a moment
                full_until = time.monotonic() + FULL_RETRY_SECONDS
                while True:
                    try:
                        pack = ask(sc.Prefill(request_id=rid, seed=seed, num_blocks=per_req), conn.extra.transfer_timeout)
                    except TimeoutError:
                        producer_gone = True
                        pack = sc.PrefillAck(request_id=rid, ok=False, reason=f"the producer at {peer} did not answer "
                                             f"the prefill within {conn.extra.transfer_timeout:g} s (transfer_timeout)")
                    if (getattr(pack, "ok", False) or not str(getattr(pack, "reason", "")).startswith("no free blocks")
                            or time.monotonic() > full_until):
                        break
                    time.sleep(0.01)
                if not getattr(pack, "ok", False):
                    failures[rid] = getattr(pack, "reason", "prefill failed")
                    failed += 1
                    continue
                reqs.append((Request(rid, [seed] * (per_req * cfg.kv_cache_groups[0].kv_cache_spec.block_size),
                                     dict(pack.params)), ids, seed))
            if not reqs:
                if failures:
                    break
                continue
            for req, ids, _ in reqs:
                n, _async = scheduler.get_num_new_matched_tokens(req, 0)
                scheduler.update_state_after_alloc(req, KVCacheBlocks(tuple(list(x) for x in ids)), n or 0)
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
                    for j, b in enumerate(ids[group_of[name]]):
                        if not torch.equal(views[name][b], block_pattern(seed, li, j, views[name].shape[1])):
                            mismatched += 1
                bytes_ok += per_req * per_block
        control.close()
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
            "recomputed": recomputed, "rounds": rnd, "blocks_per_request": per_req,
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
            log.warning("%d request(s) will be recomputed: %s", len(failures),
                        "; ".join(f"{rid} ({why})" for rid, why in sorted(failures.items())[:5]))
        return result
    finally:
        if proc is not None and path is not None:
            code = stop_peer(proc, path)
            if code not in (0, None):
                log.warning("the producer peer exited with %s", code)


@dataclasses.dataclass
class BarePeer:
    """The producer peer of :func:`bare_engine`, kept for a whole bench: one is started on the
    first repetition and serves every later one (a peer's start costs seconds, several times a
    repetition's transfers), then :func:`stop_bare_peer` ends it (the connector's shutdown)."""

    proc: subprocess.Popen
    path: str
    peer: str
    control: Control
    hello: Any
    calls: int = 0


def bare_engine(conn: Endpoint, ctx: SelfTestContext) -> dict[str, Any]:
    """The engine alone on the blocks of the self-test's rounds: a producer peer prefills the
    requests; this process READs each request's regions with the engine call alone (timed). Rounds repeat until
    the engine has run ``bench.min_seconds`` (one round of small blocks takes milliseconds: too
    short to time). The peer is kept on the connector for the next call (the bench's next
    repetition)."""
    bare = conn._bare
    if bare is not None and bare.proc.poll() is not None:
        stop_bare_peer(conn)
        bare = None
    if bare is None:
        conn._auth = conn._auth or auth.AuthKey.generate()
        proc, path = start_peer(peer_config(ctx, "kv_producer", "serve"), conn._auth)
        try:
            peer = wait_serving(proc, ctx.settings.timeout)
            control = Control(conn, peer)
        except BaseException:
            stop_peer(proc, path)
            raise
        bare = conn._bare = BarePeer(proc, path, peer, control, None)
    bare.calls += 1
    proc, peer, control = bare.proc, bare.peer, bare.control

    def ask(msg: Any) -> Any:
        try:
            return control.ask(msg, conn.extra.transfer_timeout)
        except TimeoutError:
            state = "it exited with " + str(proc.returncode) if proc.poll() is not None else "it still runs"
            stop_bare_peer(conn)
            raise ConnectorRuntimeError(Problem(
                "bench", f"the producer at {peer} stopped answering ({state})",
                details=tuple(peer_log(proc)[-6:]))) from None

    if bare.hello is None:
        bare.hello = ask(sc.Hello(engine_id=str(conn.config.engine_id)))
    cfg = conn.kv_cache_config
    n_groups = len(cfg.kv_cache_groups)
    requests = max(1, min(int(ctx.concurrency or ctx.settings.requests), cfg.num_blocks // n_groups))
    room = cfg.num_blocks // (requests * n_groups)
    per = min(ctx.prompt_blocks or room, room) or 1
    moved, seconds, rounds = 0, 0.0, 0
    deadline = time.monotonic() + ctx.settings.timeout
    while not rounds or (seconds < ctx.min_seconds and rounds < MAX_ROUNDS and time.monotonic() < deadline):
        rounds += 1
        moved, seconds = _bare_round(conn, ask, control, bare.hello, requests, per, n_groups,
                                     f"{bare.calls}-{rounds}", moved, seconds)
    return {"path": "the bare engine (READ by the consumer), same blocks, two processes", "bytes": moved, "rounds": rounds,
            "gbps": round(moved / seconds / 1e9, 3) if seconds else None}


def stop_bare_peer(conn: Endpoint) -> None:
    """Ends the peer :func:`bare_engine` keeps, if one runs."""
    bare, conn._bare = conn._bare, None
    if bare is not None:
        bare.control.close()
        stop_peer(bare.proc, bare.path)


def _bare_round(conn: Endpoint, ask: Any, control: Control, hello: Any, requests: int, per: int,
                n_groups: int, rnd: str, moved: int, seconds: float) -> tuple[int, float]:
    """One round of :func:`bare_engine`: every request prefilled, then each read by the engine
    alone from the blocks its ``kv_transfer_params`` name, in the order of the connector's rounds
    (reading a request right after its prefill would find part of it still in the CPU's cache,
    which the connector's reads never do), and released."""
    params = []
    for r in range(requests):
        ack = ask(sc.Prefill(request_id=f"bare-{rnd}-{r}", seed=r, num_blocks=per))
        if not getattr(ack, "ok", False):
            raise ConnectorRuntimeError(Problem("bench", f"the producer did not prefill: {getattr(ack, 'reason', ack)}"))
        params.append(ack.params)
    for r in range(requests):
        rid = f"bare-{rnd}-{r}"
        local = [[(g * requests + r) * per + j for j in range(per)] for g in range(n_groups)]
        recv = Recv(rid, local, control.peer, rid, params[r]["remote_block_ids"], params[r]["remote_engine_id"])
        plan = plan_read(conn, hello, recv)
        if isinstance(plan, str):
            raise ConnectorRuntimeError(Problem("bench", plan))
        src, dst, lens = plan
        t0 = time.perf_counter()
        handle = conn._engine_read(hello, src, dst, lens)
        while (state := conn._engine_poll(handle)) == "PROC":
            pass
        seconds += time.perf_counter() - t0
        control.send(sc.Release(request_id=rid, ok=state == "DONE"))
        moved += sum(lens) if state == "DONE" else 0
    return moved, seconds


def run_as_producer(conn: Endpoint, kv_caches: dict[str, Any], ctx: SelfTestContext) -> dict[str, Any]:
    """This process is the producer: serve, start a consumer peer, report what it verified."""
    stop = threading.Event()
    server = Producer(conn)
    key = conn._auth or auth.AuthKey.generate()
    address = server.bind(key)
    conn._side_channel = int(address.rsplit(":", 1)[1])
    conn.note_listeners()
    thread = threading.Thread(target=server.run, args=(stop,), name=f"kvconf-{conn.config.name}-serve", daemon=True)
    thread.start()
    proc, path = start_peer(peer_config(ctx, "kv_consumer", "run", peer=address), key)
    try:
        out, err = proc.communicate(timeout=ctx.settings.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
        with contextlib.suppress(FileNotFoundError):  # the peer removes it once read
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

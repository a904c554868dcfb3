"""The mooncake connector: prefill-to-decode KV transfer over the Mooncake Transfer Engine.

As vLLM's MooncakeConnector (``vllm/distributed/kv_transfer/kv_connector/v1/mooncake_connector.py``): the engine runs in
P2P-handshake mode (no metadata server); each worker registers its KV-cache memory once; the
consumer (decode) sends the producer (prefill) a request's block ids with its registered base
addresses and block sizes over the side channel; the producer pushes the blocks with
``batch_transfer_sync_write`` into the consumer's memory and answers per request: done, or failed
with a reason. The side channel, the scheduler side and the self-test are shared with the nixl
connector (:mod:`kvconf_connectors.p2p`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from typing import Any, Literal

from kvconf.errors import ConnectorRuntimeError, ContractError, Problem
from kvconf_connectors.p2p.connector import P2PConnector, P2PExtra

log = logging.getLogger("kvconf.p2p")

Auto = Literal["auto"]
Tcp = Literal["tcp"]
Rdma = Literal["rdma"]
Protocol = Literal[Auto, Tcp, Rdma]

INSTALL = ("pip install mooncake-transfer-engine-non-cuda==0.3.13.post1 (CPU hosts; on CUDA 12 hosts "
           "mooncake-transfer-engine, on CUDA 13 mooncake-transfer-engine-cuda13) and "
           "apt-get install libibverbs1 librdmacm1 libnuma1 (or run scripts/setup.sh)")
MAX_BATCH = 1024
"""Entries per batch call: the engine's TCP queue rejects larger batches silently (rc -1)."""


class MooncakeExtra(P2PExtra):
    """Settings of the mooncake connector: its engine's, beside the peer-to-peer ones."""

    protocol: Protocol = "auto"
    """Transport: ``rdma``, ``tcp``, or ``auto`` (RDMA when an RDMA device exists, else TCP; the
    report says which was chosen and why). vLLM's ``mooncake_protocol``."""
    device_name: str = ""
    """RDMA device(s) to use, e.g. ``mlx5_0,mlx5_1``; empty lets the engine choose."""


def rdma_available() -> bool:
    """Whether this machine has an RDMA device (``/sys/class/infiniband`` is not empty)."""
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def choose_transport(protocol: str) -> tuple[str, str]:
    """(transport, why): ``auto`` takes RDMA when a device exists, else TCP."""
    if protocol != "auto":
        return protocol, f"protocol={protocol} was set"
    if rdma_available():
        return "rdma", "auto: an RDMA device exists under /sys/class/infiniband"
    return "tcp", "auto: no RDMA device under /sys/class/infiniband"


def transfer_engine_class() -> Any:
    """Mooncake's ``TransferEngine``, imported with its log switches set first (they are read when
    the library loads); a :class:`ContractError` with the install command when it is missing.

    ``MC_TCP_ENABLE_CONNECTION_POOL=0``: with its pool, the TCP transport keeps every connection to
    every consumer it ever wrote to, even after the consumer closed its end (CLOSE-WAIT): a producer
    gained about 3 descriptors per consumer (119 after 40) until ``accept()`` failed with "Too many
    open files". Without it the count stays flat, and throughput did not drop (llama3_8b, two runs
    each: 1.27 and 1.37 GB/s with the pool, 1.67 and 1.58 without). A user's own setting wins."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "16384")
    os.environ.setdefault("MC_TCP_ENABLE_CONNECTION_POOL", "0")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise ContractError(Problem(
            "connector.name", f"the mooncake connector needs the Mooncake Transfer Engine, which does not "
            f"import here ({exc})", value="mooncake", fix=INSTALL)) from None
    return TransferEngine


def _quiet_fd2(fn: Any) -> Any:
    """Runs ``fn`` with file descriptor 2 sent to /dev/null: the engine prints two harmless lines
    at initialisation that no log level silences."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        return fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class MooncakeConnector(P2PConnector):
    """Prefill-to-decode transfer over the Mooncake Transfer Engine (P2P handshake): the decode reads."""

    extra_config = MooncakeExtra
    vllm_name = "MooncakeConnector"
    vllm_extra_keys = {"protocol": "mooncake_protocol", "device_name": "device_name", "num_workers": "num_workers"}
    vllm_differences = (
        "vLLM's MooncakeConnector finds its producer through a bootstrap server (VLLM_MOONCAKE_BOOTSTRAP_PORT, "
        "or bootstrap_server_address), and the producer pushes; kvconf's consumer reads from the producer that "
        "the kv_transfer_params name (remote_host, remote_port), as vLLM's NixlConnector does. The "
        "side_channel_*, peer, lease_seconds and timeout settings are kvconf's alone and are not exported "
        "(export.target=kvconf runs kvconf's connector in vLLM instead).",
        "protocol=auto is exported as no mooncake_protocol: vLLM then uses rdma (it has no auto); set "
        "connector.extra.protocol=tcp to export tcp.",
    )

    _engine_import = staticmethod(transfer_engine_class)

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        out = super().vllm_extra_config(extra)
        if out.get("mooncake_protocol") == "auto":
            # what vLLM will do, not what this machine detected: vLLM has no auto and defaults to rdma
            del out["mooncake_protocol"]
        if not out.get("device_name"):
            out.pop("device_name", None)
        return out

    # ---- the engine ------------------------------------------------------------------------------
    def _new_engine(self) -> Any:
        engine = transfer_engine_class()()
        host = self.extra.side_channel_host
        rc = _quiet_fd2(lambda: engine.initialize(host, "P2PHANDSHAKE", self.transport, self.extra.device_name))
        if rc != 0:
            raise ConnectorRuntimeError(Problem(
                "connector.extra.protocol", f"the Mooncake Transfer Engine did not initialise over "
                f"{self.transport} on {host} (rc {rc}; {self.transport_reason})", value=self.extra.protocol,
                fix="check connector.extra.protocol and device_name (tcp works on any machine)"))
        return engine

    def _engine_start(self) -> None:
        self.transport, self.transport_reason = choose_transport(self.extra.protocol)
        self._engine = self._new_engine()
        self._engines: list[tuple[Any, dict[str, bytes]]] = [(self._engine, {})]
        """The engines a consumer reads with, each with the producer sessions it has read from
        (and their engine's name): see :meth:`_engine_for`."""
        self._engines_lock = threading.Lock()
        self._registered: list[int] = []
        self._registered_lens: list[int] = []
        self._session = f"{self.extra.side_channel_host}:{self._engine.get_rpc_port()}"
        self._engine_meta = f"mooncake-engine:{uuid.uuid4().hex}".encode()
        """Sent in the producer's HelloAck: which engine instance the session belongs to."""

    def _engine_register(self, ptrs: list[int], lens: list[int], engine: Any = None) -> None:
        rc = (engine or self._engine).batch_register_memory(ptrs, lens)
        if rc != 0:
            raise ConnectorRuntimeError(Problem("connector", f"Mooncake batch memory registration failed (rc {rc})",
                                                fix="check the device and protocol settings"))
        self._registered, self._registered_lens = ptrs, lens

    def _engine_for(self, session: str, meta: bytes) -> Any:
        """The engine to read from ``session`` with. A session is ``HOST:RPC_PORT``, and an engine
        keeps what it learnt of a session for good: a producer that drew the RPC port of one that
        is gone (measured: 12 of 300 peers on one host) would be read with the old one's ports and
        memory map and fail. Each producer's engine names itself in its ``HelloAck.meta``; a
        producer on a session another engine had is read by an engine that never saw that session
        (made, with the same memory registered, when none is left): rare, and correct."""
        with self._engines_lock:
            for engine, seen in self._engines:
                if seen.setdefault(session, meta) == meta:
                    return engine
            engine = self._new_engine()
            self._engine_register(self._registered, self._registered_lens, engine)
            self._engines.append((engine, {session: meta}))
        log.info("a new producer took the RPC port of an earlier one (%s): reading from it with engine %d",
                 session, len(self._engines))
        return engine

    def _engine_read(self, peer: Any, src: list[int], dst: list[int], lens: list[int]) -> Any:
        """Reads synchronously (the engine's batch read); the handle is the outcome."""
        engine = self._engine_for(peer.session, peer.meta)
        for i in range(0, len(src), MAX_BATCH):
            rc = engine.batch_transfer_sync_read(peer.session, dst[i:i + MAX_BATCH], src[i:i + MAX_BATCH],
                                                 lens[i:i + MAX_BATCH])
            if rc != 0:
                log.warning("the Mooncake Transfer Engine returned %s reading from %s (the producer is gone, or "
                            "the addresses are outside its registered memory)", rc, peer.session)
                return "ERR"
        return "DONE"

    def _engine_poll(self, handle: Any) -> str:
        return str(handle)

    def _engine_stop(self) -> None:
        if self._engine is not None:
            for engine, _ in self._engines:
                for ptr in self._registered:
                    engine.unregister_memory(ptr)
            self._registered = []
            self._engines = []
            self._engine = None

"""The nixl connector: prefill-to-decode KV transfer over NVIDIA NIXL with its UCX backend, the engine
behind vLLM's NixlConnector.

A NIXL agent registers the KV-cache memory once; peers exchange agent metadata and block regions
over the same typed side channel as the mooncake connector (:mod:`kvconf_connectors.p2p`). The
consumer READs a request's blocks from the producer, as vLLM's NixlConnector (pull mode) does. A
transfer in state ``ERR`` fails its request; no block is reported loaded unless its transfer
completed.

NIXL's traps, handled: every process that created a UCX agent segfaults at interpreter exit inside
a bundled library, so kvconf's processes end with ``os._exit`` after a clean shutdown
(:func:`kvconf.runtime.process.request_hard_exit`); and NIXL's progress thread busy-polls a core per
agent, so it is off by default and the side that waits drives progress itself.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any, Literal

from pydantic import Field

from kvconf.errors import ConnectorRuntimeError, ContractError, Problem
from kvconf.runtime.process import request_hard_exit
from kvconf_connectors.p2p.connector import P2PConnector, P2PExtra

INSTALL = ("pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 on top of the CPU build of torch (CPU hosts: "
           "plain pip install nixl drags in a CUDA build of torch, about 6 GB); pip install nixl on a CUDA host; "
           "or bash scripts/setup.sh")

Pull = Literal["pull"]
Backend = Literal["UCX", "UCX_MO", "GDS", "GDS_MT", "POSIX", "OBJ", "HF3FS", "Mooncake", "LIBFABRIC", "UCCL",
                  "GPUNETIO", "GUSLI", "AZURE_BLOB"]
"""The backend plugins NIXL 1.5 ships (``nixl_agent.get_plugin_list()`` lists what this install has)."""
Mode = Pull


class NixlExtra(P2PExtra):
    """Settings of the nixl connector (vLLM's names where vLLM has them)."""

    backends: list[Backend] = Field(default_factory=lambda: list[Backend](["UCX"]), min_length=1)
    """NIXL backends to create (vLLM's ``backends``)."""
    num_threads: int = Field(0, ge=0)
    """Worker threads of the UCX backend (vLLM's ``num_threads``; 0: NIXL's default)."""
    mode: Mode = "pull"
    """``pull``: the consumer reads from the producer (vLLM's NixlConnector). The one mode: a
    producer writing (vLLM's push mode) needs a per-request exchange before the write."""
    progress_thread: bool = False
    """NIXL's own progress thread. It busy-polls a core per agent (on a 2-core machine, two agents
    take both cores); off, the side that waits drives progress itself."""


def nixl_api() -> tuple[Any, Any]:
    """NIXL's ``nixl_agent`` and ``nixl_agent_config``, with its log level set first; a
    :class:`ContractError` with the install command when NIXL does not import."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "ERROR")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        raise ContractError(Problem(
            "connector.name", f"the nixl connector needs NIXL, which does not import here ({exc})", value="nixl",
            fix=INSTALL)) from None
    return nixl_agent, nixl_agent_config


class NixlConnector(P2PConnector):
    """Prefill-to-decode transfer over NIXL (UCX): the decode reads."""

    extra_config = NixlExtra
    vllm_name = "NixlConnector"
    vllm_extra_keys = {"backends": "backends", "num_threads": "num_threads"}

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        self.needs_progress = not self.extra.progress_thread

    _engine_import = staticmethod(nixl_api)

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        out = super().vllm_extra_config(extra)
        if not out.get("num_threads"):
            out.pop("num_threads", None)
        return out

    # ---- the engine ------------------------------------------------------------------------------
    def _engine_start(self) -> None:
        nixl_agent, nixl_agent_config = nixl_api()
        device = self._engine_interface()
        chose = bool(device) and "UCX_NET_DEVICES" not in os.environ
        if chose:
            # UCX listens on every network device unless told; the side channel's suffices (measured:
            # with lo only, the 192.0.2.2 listener went away and transfers were unchanged). A user's wins.
            os.environ["UCX_NET_DEVICES"] = str(device)
        cfg = nixl_agent_config(enable_prog_thread=self.extra.progress_thread, backends=list(self.extra.backends),
                                num_threads=self.extra.num_threads)
        name = f"kvconf-{str(self.config.engine_id)[:8]}-{uuid.uuid4().hex[:8]}"
        try:
            try:
                self._agent = nixl_agent(name, cfg)
            except Exception:
                if not chose:
                    raise
                os.environ.pop("UCX_NET_DEVICES")  # UCX cannot use that device: let it choose, as before
                self._agent = nixl_agent(name, cfg)
        except Exception as exc:
            raise ConnectorRuntimeError(Problem(
                "connector.extra.backends", f"NIXL could not create an agent with backends {self.extra.backends}: {exc}",
                value=list(self.extra.backends), fix="use backends [UCX]")) from exc
        request_hard_exit()  # a UCX agent crashes the interpreter's exit: end with os._exit instead
        self._lock_agent = threading.Lock()
        """One thread at a time in the agent: a producer's side-channel thread drives progress while
        the vLLM worker's consumer loop reads, and a UCX worker is not to be driven from two threads
        at once."""
        self._remotes: dict[bytes, str] = {}
        self._reg: Any = None
        self._session = name
        self.transport = "nixl-" + "+".join(self.extra.backends).lower()
        tls = os.environ.get("UCX_TLS")
        self.transport_reason = (f"NIXL {', '.join(self.extra.backends)} backend, the decode reads; UCX picks the "
                                 "transport (cma on one host, else tcp or rdma)" + (f"; UCX_TLS={tls}" if tls else ""))

    def _mem_type(self) -> str:
        return "VRAM" if self.config.kv_buffer_device == "cuda" else "DRAM"

    def _engine_register(self, ptrs: list[int], lens: list[int]) -> None:
        try:
            self._reg = self._agent.register_memory([(p, n, 0, "") for p, n in zip(ptrs, lens)], self._mem_type())
        except Exception as exc:
            raise ConnectorRuntimeError(Problem("connector", f"NIXL memory registration failed: {exc}")) from exc
        self._engine_meta = self._agent.get_agent_metadata()

    def _remote(self, meta: bytes) -> str:
        name = self._remotes.get(meta)
        if name is None:
            name = self._remotes[meta] = self._agent.add_remote_agent(meta)
        return name

    def _xfer(self, op: str, meta: bytes, local: list[int], remote: list[int], lens: list[int]) -> Any:
        mem = self._mem_type()
        with self._lock_agent:
            peer = self._remote(meta)
            ld = self._agent.get_xfer_descs([(a, n, 0) for a, n in zip(local, lens)], mem)
            rd = self._agent.get_xfer_descs([(a, n, 0) for a, n in zip(remote, lens)], mem)
            handle = self._agent.initialize_xfer(op, ld, rd, peer, b"")
            state = self._agent.transfer(handle)
            if state == "ERR":
                self._agent.release_xfer_handle(handle)
                raise RuntimeError(f"NIXL refused the {op}")
        return handle

    def _engine_connect(self, peer: Any) -> None:
        # vLLM's NixlConnector adds the remote agent at its handshake too; UCX then wires the
        # endpoint up (a first read otherwise took 15-20 ms instead of 6 at 64 MiB, measured)
        with self._lock_agent:
            self._agent.make_connection(self._remote(peer.meta))

    def _engine_read(self, peer: Any, src: list[int], dst: list[int], lens: list[int]) -> Any:
        return self._xfer("READ", peer.meta, dst, src, lens)

    def _engine_poll(self, handle: Any) -> str:
        with self._lock_agent:
            state = self._agent.check_xfer_state(handle)
            if state in ("DONE", "ERR"):
                self._agent.release_xfer_handle(handle)
        return state

    def _engine_progress(self) -> None:
        if self.needs_progress and getattr(self, "_agent", None) is not None:
            with self._lock_agent:
                self._agent.get_new_notifs()

    def _engine_stop(self) -> None:
        agent = getattr(self, "_agent", None)
        if agent is None:
            return
        for name in self._remotes.values():
            try:
                agent.remove_remote_agent(name)
            except Exception:  # a peer that is already gone
                pass
        self._remotes = {}
        if self._reg is not None:
            agent.deregister_memory(self._reg)
            self._reg = None
        self._agent = None

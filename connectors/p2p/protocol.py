"""The side channel of the peer-to-peer connectors: typed, versioned messages over pyzmq.

A producer (prefill side) binds a ROUTER socket; a consumer (decode side) connects a DEALER.
The protocol is vLLM's: a prefill keeps a finished request's blocks under a lease and returns
``kv_transfer_params`` naming them (:func:`transfer_params`); a decode given those params reads the
blocks straight from the producer's memory with its transfer engine (where each layer lies comes
once per producer, in :class:`HelloAck`), then sends :class:`Release`, on which the producer frees
them. No message travels per request before the read.

Every message is one msgpack map with ``v`` (the protocol version) and ``type``; :func:`decode`
checks both, the size, and the fields of the type, so a malformed, foreign or oversized message is
rejected with a reason (and the server goes on serving) instead of reaching the data path.

>>> raw = encode(Hello(engine_id="e1"))
>>> decode(raw)
Hello(v=2, type='hello', engine_id='e1')
>>> decode(b"garbage")
Traceback (most recent call last):
...
kvconf_connectors.p2p.protocol.BadMessage: not a msgpack message: ...
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, TypeAdapter, ValidationError

from kvconf.config.base import StrictModel

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_SOCKET_BYTES",
    "PROTOCOL_VERSION",
    "BadMessage",
    "Hello",
    "HelloAck",
    "LayerRegion",
    "Message",
    "Prefill",
    "PrefillAck",
    "Rejected",
    "Release",
    "RemoteBlocks",
    "Waker",
    "decode",
    "encode",
    "free_port",
    "parse_address",
    "read_params",
    "transfer_params",
]

PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 4 << 20
"""Largest message accepted: a transfer request of 100k blocks is about 1 MiB. A larger one is
rejected with a reason (and logged by the server)."""
MAX_SOCKET_BYTES = 16 * MAX_MESSAGE_BYTES
"""Beyond this zmq drops the connection without reading the message: memory stays bounded."""


class _Msg(StrictModel):
    v: Literal[2] = 2


class Hello(_Msg):
    """Consumer -> producer: who I am; the producer answers with :class:`HelloAck`."""

    type: Literal["hello"] = "hello"
    engine_id: str


class LayerRegion(_Msg):
    """Where one layer's blocks lie in a process's registered memory."""

    type: Literal["layer"] = "layer"
    name: str
    base: int = Field(ge=0)
    block_stride: int = Field(gt=0)
    page: int = Field(gt=0)


class HelloAck(_Msg):
    """Producer -> consumer: its engine, its transfer-engine session, its layout and where each
    layer's blocks lie in its memory (a consumer reads a request's blocks from there with the
    block ids of the request's ``kv_transfer_params``, asking nothing more)."""

    type: Literal["hello_ack"] = "hello_ack"
    engine_id: str
    session: str
    layout: str
    """Fingerprint of the producer's KV layout (layer names and page sizes)."""
    transport: str
    meta: bytes = b""
    """The producer's engine metadata (a NIXL agent's), for a consumer that reads from it."""
    num_blocks: int = Field(0, ge=0)
    """Blocks in each of the producer's layers: remote block ids at or past it are refused."""
    layers: list[LayerRegion] = Field(default_factory=list)


class Prefill(_Msg):
    """The simulator's proxy part: asks the producer to compute a request's KV (the pattern of
    ``seed``); the answer carries the request's ``kv_transfer_params``, as vLLM's prefill
    instance returns them."""

    type: Literal["prefill"] = "prefill"
    request_id: str = Field(min_length=1, max_length=256)
    seed: int = Field(ge=0)
    num_blocks: int = Field(gt=0)


class PrefillAck(_Msg):
    type: Literal["prefill_ack"] = "prefill_ack"
    request_id: str
    ok: bool
    reason: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    """The request's ``kv_transfer_params`` (vLLM's names; :func:`transfer_params`)."""


class Release(_Msg):
    """Consumer -> producer: I have read request ``request_id``'s blocks (``ok``), or gave up on
    them; either way the producer may free them. No answer."""

    type: Literal["release"] = "release"
    request_id: str = Field(min_length=1, max_length=256)
    ok: bool


class Rejected(_Msg):
    """Producer -> consumer: a message was rejected."""

    type: Literal["rejected"] = "rejected"
    reason: str


Message = Annotated[Union[Hello, HelloAck, Prefill, PrefillAck, Rejected, Release],
                    Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


class BadMessage(ValueError):
    """A side-channel message that is not one of ours."""


def encode(msg: _Msg) -> bytes:
    import msgpack

    return msgpack.packb(msg.model_dump(), use_bin_type=True)


def decode(raw: bytes) -> _Msg:
    """The typed message in ``raw``; :class:`BadMessage` saying why it is not one."""
    import msgpack

    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(raw)} B is over the {MAX_MESSAGE_BYTES} B limit")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise BadMessage(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise BadMessage(f"not a message map but a {type(data).__name__}")
    if data.get("v") != PROTOCOL_VERSION:
        raise BadMessage(f"protocol version {data.get('v')!r}, expected {PROTOCOL_VERSION}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadMessage(f"invalid {data.get('type')!r} message: {where}: {first['msg']}") from None


PARAMS_REQUIRED = ("remote_engine_id", "remote_request_id", "remote_block_ids", "remote_host", "remote_port")
"""The ``kv_transfer_params`` a decode needs to read a prefilled request (vLLM's names)."""


def transfer_params(engine_id: str, request_id: str, block_ids: list[list[int]], address: str, num_tokens: int,
                    lease_seconds: float) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill returns for a request whose blocks it holds: vLLM's
    names and meanings (its NixlConnector returns the same keys), ``remote_block_ids`` one list per
    KV-cache group, ``remote_blocks_expiry_time`` in seconds since the epoch (when the lease ends),
    ``kvconf_protocol`` beside them.

    >>> p = transfer_params("e1", "r1", [[4, 5]], "127.0.0.1:5000", 40, 30.0)
    >>> p["do_remote_prefill"], p["remote_block_ids"], p["remote_host"], p["remote_port"]
    (True, [[4, 5]], '127.0.0.1', 5000)
    """
    import time

    host, port = parse_address(address)
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": engine_id,
            "remote_request_id": request_id, "remote_block_ids": [list(g) for g in block_ids],
            "remote_host": host, "remote_port": port, "tp_size": 1, "remote_num_tokens": num_tokens,
            "remote_blocks_expiry_time": round(time.time() + lease_seconds, 3),
            "kvconf_protocol": PROTOCOL_VERSION}


@dataclass
class RemoteBlocks:
    """What a decode reads for a request, from its ``kv_transfer_params`` (:func:`read_params`)."""

    engine_id: str
    request_id: str
    block_ids: list[list[int]]
    peer: str
    num_tokens: Optional[int]
    expires: Optional[float] = None
    """``remote_blocks_expiry_time``: when the producer's lease on the blocks ends (epoch seconds)."""


def read_params(params: Any, groups: int) -> RemoteBlocks | str:
    """The remote blocks ``params`` name, or why they name none a decode can read (a reason a
    log line and the recompute carry).

    >>> read_params(transfer_params("e1", "r1", [[4, 5]], "127.0.0.1:5000", 40, 30.0), 1).peer
    '127.0.0.1:5000'
    >>> read_params({"do_remote_prefill": True, "remote_engine_id": "e1"}, 1)
    'kv_transfer_params lack remote_request_id, remote_block_ids, remote_host, remote_port'
    >>> read_params({**transfer_params("e", "r", [[1]], "h:1", 8, 1.0), "remote_block_ids": [[-1]]}, 1)
    'kv_transfer_params.remote_block_ids: expected one list of block ids (integers >= 0) per KV-cache group (1), got [[-1]]'
    """
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return "no remote prefill asked (kv_transfer_params.do_remote_prefill is not true)"
    missing = [k for k in PARAMS_REQUIRED if k not in params]
    if missing:
        return f"kv_transfer_params lack {', '.join(missing)}"
    ids = params["remote_block_ids"]
    if (not isinstance(ids, list) or len(ids) != groups
            or not all(isinstance(g, list) and all(type(b) is int and b >= 0 for b in g) for g in ids)):
        return (f"kv_transfer_params.remote_block_ids: expected one list of block ids (integers >= 0) per "
                f"KV-cache group ({groups}), got {str(ids)[:80]}")
    host, port, rid, eid = (params["remote_host"], params["remote_port"], params["remote_request_id"],
                            params["remote_engine_id"])
    if not isinstance(host, str) or not host or type(port) is not int or not 0 < port < 65536:
        return f"kv_transfer_params.remote_host/remote_port: expected a host and a port, got {host!r}, {port!r}"
    if not isinstance(rid, str) or not 0 < len(rid) <= 256 or not isinstance(eid, str):
        return "kv_transfer_params.remote_request_id/remote_engine_id: expected strings"
    n = params.get("remote_num_tokens")
    expires = params.get("remote_blocks_expiry_time")
    host = f"[{host}]" if ":" in host else host
    return RemoteBlocks(eid, rid, ids, f"{host}:{port}", n if type(n) is int and n > 0 else None,
                        float(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``ValueError`` saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Waker:
    """A pipe other threads write to, so that a zmq poll loop wakes at once."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        if self.w < 0:  # closed: nobody waits any more
            return
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
        """Closes the pipe (once; a second call does nothing)."""
        if self.r < 0:
            return
        os.close(self.r)
        os.close(self.w)
        self.r = self.w = -1

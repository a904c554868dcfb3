"""The side channel of the peer-to-peer connectors: typed, versioned messages over pyzmq.

A producer (prefill side) binds a ROUTER socket; a consumer (decode side) connects a DEALER.
Every message is one msgpack map with ``v`` (the protocol version) and ``type``; :func:`decode`
checks both, the size, and the fields of the type, so a malformed, foreign or oversized message is
rejected with a reason (and the server goes on serving) instead of reaching the data path.

>>> raw = encode(Hello(engine_id="e1"))
>>> decode(raw)
Hello(v=1, type='hello', engine_id='e1')
>>> decode(b"garbage")
Traceback (most recent call last):
...
kvconf_connectors.p2p.protocol.BadMessage: not a msgpack message: ...
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal, Union

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
    "PullSource",
    "Rejected",
    "Release",
    "Transfer",
    "TransferResult",
    "Waker",
    "decode",
    "encode",
    "free_port",
    "parse_address",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 << 20
"""Largest message accepted: a transfer request of 100k blocks is about 1 MiB. A larger one is
rejected with a reason (and logged by the server)."""
MAX_SOCKET_BYTES = 16 * MAX_MESSAGE_BYTES
"""Beyond this zmq drops the connection without reading the message: memory stays bounded."""


class _Msg(StrictModel):
    v: Literal[1] = 1


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
    """Producer -> consumer: its engine, its transfer-engine session and its layout."""

    type: Literal["hello_ack"] = "hello_ack"
    engine_id: str
    session: str
    layout: str
    """Fingerprint of the producer's KV layout (layer names and page sizes)."""
    transport: str
    meta: bytes = b""
    """The producer's engine metadata (a NIXL agent's), for a consumer that reads from it."""


class Prefill(_Msg):
    """The proxy's part: asks the producer to compute a request's KV (the pattern of ``seed``)."""

    type: Literal["prefill"] = "prefill"
    request_id: str = Field(min_length=1, max_length=256)
    seed: int = Field(ge=0)
    num_blocks: int = Field(gt=0)


class PrefillAck(_Msg):
    type: Literal["prefill_ack"] = "prefill_ack"
    request_id: str
    ok: bool
    reason: str = ""


class Transfer(_Msg):
    """Consumer -> producer: push request ``request_id``'s blocks into these blocks of mine."""

    type: Literal["transfer"] = "transfer"
    request_id: str = Field(min_length=1, max_length=256)
    session: str
    """The consumer's transfer-engine session (``host:rpc_port``)."""
    layout: str
    layers: list[LayerRegion] = Field(min_length=1)
    block_ids: list[int] = Field(min_length=1)
    mode: Literal["push", "pull"] = "push"
    """``push``: the producer writes and answers done; ``pull``: it answers with a :class:`PullSource`."""
    meta: bytes = b""
    """The consumer's engine metadata (a NIXL agent's), for a producer that writes to it."""


class PullSource(_Msg):
    """Producer -> consumer (pull mode): read these regions of mine into these of yours, then release."""

    type: Literal["pull_source"] = "pull_source"
    request_id: str
    src: list[int]
    dst: list[int]
    lens: list[int]


class Release(_Msg):
    """Consumer -> producer (pull mode): I am done reading the request's blocks."""

    type: Literal["release"] = "release"
    request_id: str = Field(min_length=1, max_length=256)
    ok: bool


class TransferResult(_Msg):
    """Producer -> consumer: the request's blocks all arrived (``done``), or why not."""

    type: Literal["transfer_result"] = "transfer_result"
    request_id: str
    status: Literal["done", "failed"]
    reason: str = ""
    bytes: int = 0
    seconds: float = 0.0


class Rejected(_Msg):
    """Producer -> consumer: a message was rejected."""

    type: Literal["rejected"] = "rejected"
    reason: str


Message = Annotated[Union[Hello, HelloAck, Prefill, PrefillAck, PullSource, Rejected, Release, Transfer,
                          TransferResult],
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

"""The settings every peer-to-peer connector has (``connector.extra.*``; a connector's own model
adds its engine's), and how a worker registers its layers' memory."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from kvconf.config.base import StrictModel

__all__ = ["HOST", "HOST_PORT", "P2PExtra", "merged_regions"]


HOST = re.compile(r"^(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[?[0-9a-fA-F:]+\]?|"
                  r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                  r"[A-Za-z0-9])?)*)$")
"""An IPv4 or IPv6 address, or a host name (RFC 1123)."""
HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[^:\s]+):(?P<port>[0-9]{1,5})$")


class P2PExtra(StrictModel):
    """The settings every peer-to-peer connector has (a connector's own model adds its engine's)."""

    side_channel_host: str = "127.0.0.1"
    """Address a producer's side channel binds to (and a Mooncake engine advertises); loopback
    unless told otherwise."""
    side_channel_port: int = Field(0, ge=0, le=65535)
    """Port of a producer's side channel; 0 picks a free one."""
    num_workers: PositiveInt = 10
    """vLLM's ``num_workers`` (exported with vLLM's own connector; kvconf's decode reads on one thread)."""
    handshake_timeout: PositiveFloat = Field(10.0, allow_inf_nan=False)
    """Seconds to wait for a producer's side channel to answer the first message (finite)."""
    transfer_timeout: PositiveFloat = Field(30.0, allow_inf_nan=False)
    """Seconds a request's blocks may take to arrive before the request fails and is recomputed (finite)."""
    lease_seconds: PositiveFloat = Field(60.0, allow_inf_nan=False)
    """Seconds a producer keeps a finished request's blocks for its decode (vLLM's NIXL lease,
    ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``): freed when the decode has read them, or after this when
    none came (finite)."""
    peer: Optional[str] = Field(None, json_schema_extra={"pattern": HOST_PORT.pattern})
    """``HOST:PORT`` of a serving producer (what it printed as ``serving on HOST:PORT``), for a
    consumer started separately; unset, ``action=run`` starts its own peer process."""
    auth_key_file: Optional[str] = Field(None, min_length=1, max_length=4096)
    """File holding the secret every peer proves it knows (16 to 4096 characters; mode 0600).
    Unset: ``$KVCONF_AUTH_KEY``; where neither is set, ``action=serve`` generates a key into a 0600
    file and prints its path beside ``serving on HOST:PORT``, and ``action=run`` hands a key of its
    own to the peer it starts."""

    @field_validator("side_channel_host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST.match(v):
            raise ValueError(f"{v!r} is not an IP address or a host name; fix: give one, e.g. 127.0.0.1")
        return v

    @field_validator("peer")
    @classmethod
    def _peer(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        m = HOST_PORT.match(v)
        if not m or not 1 <= int(m.group("port")) <= 65535:
            raise ValueError(f"{v!r} is not HOST:PORT; fix: give what the producer printed as "
                             "'serving on HOST:PORT', e.g. 127.0.0.1:40123")
        return v


def merged_regions(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(addresses, lengths) of the distinct memory regions that ``[start, end)`` spans cover:
    layers that share an allocation (a hybrid model's groups, a block-outermost layout) are
    registered once, as the engines refuse overlapping registrations.

    >>> merged_regions([(0, 100), (50, 150), (200, 300), (200, 300)])
    ([0, 200], [150, 100])
    """
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [s for s, _ in out], [e - s for s, e in out]

"""The mooncake connector: prefill-to-decode KV transfer over the Mooncake Transfer Engine.

Settings and export are final; the transfer path is tracked by issue #3.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from ._unfinished import UnfinishedConnector

Auto = Literal["auto"]
Tcp = Literal["tcp"]
Rdma = Literal["rdma"]
Protocol = Literal[Auto, Tcp, Rdma]


class MooncakeExtra(BaseModel):
    """Settings of the mooncake connector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Protocol = "auto"
    """Transport: ``rdma``, ``tcp``, or ``auto`` (RDMA when an RDMA device exists, else TCP; the
    report says which was chosen and why). vLLM's ``mooncake_protocol``."""
    device_name: str = ""
    """RDMA device(s) to use, e.g. ``mlx5_0,mlx5_1``; empty lets the engine choose."""
    side_channel_host: str = "127.0.0.1"
    """Address the side channel binds to; loopback unless told otherwise."""
    side_channel_port: int = Field(0, ge=0, le=65535)
    """Port of the side channel; 0 picks a free one."""
    num_workers: PositiveInt = 10
    """Sender threads of a producer (vLLM's ``num_workers``)."""
    handshake_timeout: PositiveFloat = 10.0
    """Seconds to wait for a peer's side channel to answer."""
    transfer_timeout: PositiveFloat = 30.0
    """Seconds a request's blocks may take to arrive before the request fails."""
    peer: str | None = None
    """``HOST:PORT`` of a serving producer, for a consumer started separately."""


def rdma_available() -> bool:
    """Whether this machine has an RDMA device (``/sys/class/infiniband`` is not empty)."""
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


class MooncakeConnector(UnfinishedConnector):
    """Prefill-to-decode transfer over the Mooncake Transfer Engine (P2P handshake)."""

    extra_config = MooncakeExtra
    vllm_name = "MooncakeConnector"
    vllm_extra_keys = {"protocol": "mooncake_protocol", "device_name": "device_name", "num_workers": "num_workers"}
    issue = "issue #3"

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        out = super().vllm_extra_config(extra)
        if out.get("mooncake_protocol") == "auto":
            out["mooncake_protocol"] = "rdma" if rdma_available() else "tcp"
        if not out.get("device_name"):
            out.pop("device_name", None)
        return out

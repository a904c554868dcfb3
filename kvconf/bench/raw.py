"""The raw paths under the connectors and the machine's ceilings, measured on the same bytes as a
benchmark: the fastest plain torch gather and scatter (what a host-memory tier does at best), one
raw file written with fsync and read back (what a disk tier does at best), a memcpy and one
loopback TCP stream (what any transfer on this machine does at best).
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import threading
import time
from typing import Any

from kvconf.runtime.views import byte_views

__all__ = ["ceilings", "raw_file_io", "raw_torch_copy"]


def _memcpy_gbps(nbytes: int = 256 << 20, reps: int = 3) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return round(nbytes / statistics.median(times) / 1e9, 3)


def _loopback_tcp_gbps(nbytes: int = 256 << 20, chunk: int = 4 << 20) -> float:
    """One stream over 127.0.0.1, 4 MiB sends (the loopback ceiling of a socket engine)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(chunk)
        with conn:
            while got[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    payload = memoryview(bytearray(chunk))
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            c.sendall(payload)
            sent += chunk
        t.join()
        dt = time.perf_counter() - t0
    server.close()
    return round(nbytes / dt / 1e9, 3)


def ceilings() -> dict[str, float]:
    """What this machine can do at best: memcpy and one loopback TCP stream."""
    return {"memcpy_gbps": _memcpy_gbps(), "loopback_tcp_gbps": _loopback_tcp_gbps()}


def raw_torch_copy(kv_caches: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """The fastest plain torch gather plus scatter of ``nbytes`` (half gathered, half scattered) of
    scattered blocks in every layer: what a host-memory tier does at best (``index_select`` gathers
    at memcpy speed; a loop of ``copy_`` scatters faster here than ``index_copy_`` or ``index_put_``)."""
    import torch

    layers = list(byte_views(kv_caches).values())
    per_block = sum(r.shape[1] for r in layers)
    num_blocks = layers[0].shape[0]
    n = max(1, min(num_blocks // 2, nbytes // 2 // per_block))
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    src, dst = torch.tensor(ids[:n]), ids[n:2 * n] or ids[:n]
    stages = [torch.zeros((n, r.shape[1]), dtype=torch.uint8) for r in layers]  # touched, as a tier's pool is
    t0 = time.perf_counter()
    for rows, stage in zip(layers, stages):
        torch.index_select(rows, 0, src, out=stage)
    t_gather = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rows, stage in zip(layers, stages):
        for j, b in enumerate(dst):
            rows[b].copy_(stage[j])
    t_scatter = time.perf_counter() - t0
    moved = 2 * n * per_block
    return {"path": "torch index_select gather + copy_ scatter, every layer", "bytes": moved,
            "gbps": round(moved / (t_gather + t_scatter) / 1e9, 3)}


def raw_file_io(kv_caches: dict[str, Any], nbytes: int, folder: str) -> dict[str, Any]:
    """Writing ``nbytes / 2`` of the cache's blocks as one raw file (write + fsync) and reading them
    back (hot): what a disk tier does at best."""
    import torch

    layers = list(byte_views(kv_caches).values())
    per_block = sum(r.shape[1] for r in layers)
    n = max(1, min(layers[0].shape[0], nbytes // 2 // per_block))
    data = torch.cat([r[:n].reshape(-1) for r in layers])
    back = torch.zeros_like(data)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".kvconf-raw-{os.getpid()}.bin")
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data.numpy().data.cast("B"))
        os.fsync(fd)
        os.close(fd)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            f.readinto(back.numpy().data.cast("B"))
        t_read = time.perf_counter() - t0
    finally:
        if os.path.exists(path):
            os.unlink(path)
    moved = 2 * data.numel()
    return {"path": "one raw file: write + fsync, read", "bytes": moved,
            "gbps": round(moved / (t_write + t_read) / 1e9, 3), "write_seconds": t_write, "read_seconds": t_read}

"""The raw paths under the connectors and the machine's ceilings, measured on the same bytes as a
benchmark: the fastest plain torch gather and scatter (what a host-memory tier does at best), one
raw file written with fsync and read back, cold and warm (what a disk tier does at best), a memcpy
and one loopback TCP stream (what any transfer on this machine does at best).

The memcpy ceiling copies as many bytes as one repetition moved, but at least
:data:`MEMCPY_MIN_BYTES`: a smaller copy runs inside the CPU's caches (4 MiB copy at 78 GB/s
here, 256 MiB at 15), which measures the cache rather than the memory a real tier's gigabytes live
in.
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

__all__ = ["MEMCPY_MIN_BYTES", "ceilings", "raw_file_io", "raw_torch_copy"]

MEMCPY_MIN_BYTES = 256 << 20
"""The smallest memcpy ceiling measured: larger than this machine's last-level cache (32 MiB)."""


def _memcpy_gbps(nbytes: int, reps: int = 5) -> float:
    """One ``copy_`` of ``nbytes`` between two buffers touched beforehand (fresh pages would
    fault in during the copy); the median of ``reps``, with torch's threads."""
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


def ceilings(nbytes: int) -> dict[str, Any]:
    """What this machine can do at best with ``nbytes`` (one repetition's): memcpy and one
    loopback TCP stream."""
    copied = max(nbytes, MEMCPY_MIN_BYTES)
    return {"memcpy_gbps": _memcpy_gbps(copied), "memcpy_bytes": copied,
            "loopback_tcp_gbps": _loopback_tcp_gbps(max(nbytes, 64 << 20))}


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


def raw_file_io(kv_caches: dict[str, Any], nbytes: int, folder: str, cold: bool = True, reps: int = 3) -> dict[str, Any]:
    """Writing ``nbytes / 2`` of the cache's blocks as one raw file (write + fsync) and reading them
    back into the blocks' memory, cold (after ``posix_fadvise(DONTNEED)``: from the device) and
    warm (from the page cache): what a disk tier does at best. ``reps`` times (a disk's speed
    varies from one write to the next): medians, with each repetition's figures kept.
    ``gbps`` is write plus the cold read (the warm one where ``cold`` is false)."""
    import torch

    layers = list(byte_views(kv_caches).values())
    per_block = sum(r.shape[1] for r in layers)
    n = max(1, min(layers[0].shape[0], nbytes // 2 // per_block))
    data = torch.cat([r[:n].reshape(-1) for r in layers])
    back = torch.zeros_like(data)
    into = back.numpy().data.cast("B")
    size = data.numel()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".kvconf-raw-{os.getpid()}.bin")
    runs: dict[str, list[float]] = {"gbps": [], "write_gbps": [], "read_cold_gbps": [], "read_warm_gbps": []}
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data.numpy().data.cast("B"))
                os.fsync(fd)
            finally:
                os.close(fd)
            t_write = time.perf_counter() - t0
            reads = {}
            for kind in ("cold", "warm"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    if kind == "cold":
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    t0 = time.perf_counter()
                    got = os.preadv(fd, [into], 0)
                    reads[kind] = time.perf_counter() - t0
                finally:
                    os.close(fd)
                if got != len(into) or not torch.equal(back, data):
                    raise OSError(f"{path}: read back {got} of {len(into)} B, or different bytes")
            runs["gbps"].append(round(2 * size / (t_write + reads["cold" if cold else "warm"]) / 1e9, 3))
            runs["write_gbps"].append(round(size / t_write / 1e9, 3))
            runs["read_cold_gbps"].append(round(size / reads["cold"] / 1e9, 3))
            runs["read_warm_gbps"].append(round(size / reads["warm"] / 1e9, 3))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"path": f"one raw file: write + fsync, read {'cold' if cold else 'warm'}", "bytes": 2 * size,
            **{k: statistics.median(v) for k, v in runs.items()}, "by_repetition": runs}

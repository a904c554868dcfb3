"""The raw paths under the connectors and the machine's ceilings, measured on the same bytes as a
benchmark: the fastest plain torch gather and scatter (what a host-memory tier does at best), one
raw file written with fsync and read back, cold and warm (what a disk tier does at best), a memcpy
and one loopback TCP stream (what any transfer on this machine does at best).

The memcpy ceiling copies as many bytes as one repetition moved, but at least
:data:`MEMCPY_MIN_BYTES`: a smaller copy runs inside the CPU's caches (4 MiB copy at 78 GB/s
here, 256 MiB at 15), which measures the cache rather than the memory a real tier's gigabytes live
in.

:class:`Limits` measures the limit that bounds a connector right after each of its repetitions,
so that a ratio divides two figures taken at the same moment. A shared VM's memory and disk slow
down together for minutes at a time (memcpy from 16 to 13.5 GB/s here, one raw write from 1.9 to
0.46 GB/s from one repetition to the next); a limit measured once, minutes away from the
repetitions, made the ratio follow the noise.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import statistics
import threading
import time
from typing import Any

from kvconf.runtime.views import byte_views

__all__ = ["MEMCPY_MIN_BYTES", "Limits", "ceilings", "memcpy_gbps", "merge_file_io", "raw_file_io", "raw_torch_copy",
           "remove_files"]

MEMCPY_MIN_BYTES = 256 << 20
"""The smallest memcpy ceiling measured: larger than this machine's last-level cache (32 MiB)."""


def memcpy_gbps(nbytes: int, reps: int = 5, buffers: Any = None) -> float:
    """One ``copy_`` of ``nbytes`` between two buffers touched beforehand (fresh pages would
    fault in during the copy; ``buffers``, a pair of them, are reused); the median of ``reps``,
    with torch's threads."""
    import torch

    if buffers is not None and buffers[0].numel() == nbytes:
        src, dst = buffers
    else:
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
    loopback TCP stream, measured once (:class:`Limits` pairs them with repetitions)."""
    return Limits(None, {}, None, False).ceilings(nbytes)


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


def raw_file_io(kv_caches: dict[str, Any], nbytes: int, folder: str, cold: bool = True, reps: int = 3,
                warmup: int = 0) -> dict[str, Any]:
    """Writing ``nbytes / 2`` of the cache's blocks as one raw file (write + fsync) and reading them
    back into the blocks' memory, cold (after ``posix_fadvise(DONTNEED)``: from the device) and
    warm (from the page cache): what a disk tier does at best. ``reps`` times (a disk's speed
    varies from one write to the next): medians, with each repetition's figures kept.
    ``gbps`` is write plus the cold read (the warm one where ``cold`` is false).

    Each repetition removes the previous file and writes a new one, as a disk tier writes new
    files (rewriting one with ``O_TRUNC`` ran at 1.5-1.7 GB/s here, a new file at 2.0-2.3); the
    memory the removed file's pages held is reused, and ``warmup`` untimed writes come first. (A
    first write, or one to a new file while the old ones are kept, went into the page cache at
    0.44 GB/s here instead of 4.7: on this VM a page the guest never touched costs the hypervisor
    a fault on first use. That limit is the VM's, not the disk's.)

    Beside it, ``write_direct_gbps``: the same bytes written with ``O_DIRECT`` (past the page
    cache; where the file system takes it), the device's own write speed."""
    import torch

    layers = list(byte_views(kv_caches).values())
    per_block = sum(r.shape[1] for r in layers)
    n = max(1, min(layers[0].shape[0], nbytes // 2 // per_block))
    data = torch.cat([r[:n].reshape(-1) for r in layers])
    back = torch.zeros_like(data)
    into = back.numpy().data.cast("B")
    size = data.numel()
    os.makedirs(folder, exist_ok=True)
    runs: dict[str, list[float]] = {"gbps": [], "write_gbps": [], "read_cold_gbps": [], "read_warm_gbps": []}
    path = os.path.join(folder, f".kvconf-raw-{os.getpid()}.bin")
    direct = _aligned_copy(data) if hasattr(os, "O_DIRECT") else None
    try:
        for i in range(warmup + reps):
            remove_files([path])
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data.numpy().data.cast("B"))
                os.fsync(fd)
            finally:
                os.close(fd)
            t_write = time.perf_counter() - t0
            if i < warmup:
                continue
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
            if direct is not None:
                seconds = _write_direct(path + ".direct", direct)
                if seconds is None:
                    direct = None  # the file system does not take O_DIRECT
                else:
                    runs.setdefault("write_direct_gbps", []).append(round(size / seconds / 1e9, 3))
    finally:
        remove_files([path, path + ".direct"])
    return {"path": f"one raw file: write + fsync, read {'cold' if cold else 'warm'}", "bytes": 2 * size,
            **{k: statistics.median(v) for k, v in runs.items()}, "by_repetition": runs}


def _aligned_copy(data: Any) -> Any:
    """``data``'s bytes in page-aligned memory (what ``O_DIRECT`` needs), or None where its size
    is not a whole number of 4 KiB blocks."""
    import mmap

    size = data.numel()
    if not size or size % 4096:
        return None
    buf = mmap.mmap(-1, size)
    buf.write(data.numpy().data.cast("B"))
    return buf


def _write_direct(path: str, buf: Any) -> float | None:
    """Seconds to write ``buf`` as a new file with ``O_DIRECT`` and fsync it; None where the file
    system refuses ``O_DIRECT`` (tmpfs)."""
    import errno

    remove_files([path])
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    try:
        os.write(fd, buf)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    remove_files([path])
    return seconds


def remove_files(paths: list[str]) -> None:
    """Removes the files at ``paths`` that exist."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def merge_file_io(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One :func:`raw_file_io` result from several (one repetition each): medians, with every
    repetition's figures kept.

    >>> one = lambda g: {"path": "p", "bytes": 8, "gbps": g, "write_gbps": g, "read_cold_gbps": g,
    ...                  "read_warm_gbps": g, "by_repetition": {k: [g] for k in ("gbps", "write_gbps",
    ...                  "read_cold_gbps", "read_warm_gbps")}}
    >>> m = merge_file_io([one(1.0), one(3.0), one(2.0)]); m["write_gbps"], m["by_repetition"]["gbps"]
    (2.0, [1.0, 3.0, 2.0])
    """
    names = dict.fromkeys(k for r in results for k in r["by_repetition"])
    runs = {k: [x for r in results for x in r["by_repetition"].get(k, [])] for k in names}
    return {**results[-1], **{k: statistics.median(v) for k, v in runs.items()}, "by_repetition": runs}


class Limits:
    """The limit that bounds a connector of ``kind`` (``memcpy``, ``file``, ``network``),
    measured by :meth:`after` right after each repetition on that repetition's bytes; the other
    limits once, by :meth:`ceilings`, for context. ``memcpy``'s buffers are kept from one
    repetition to the next (touching 2 x 256 MiB afresh took longer than the copies)."""

    def __init__(self, kind: str | None, kv_caches: dict[str, Any], folder: str | None, cold: bool) -> None:
        self.kind, self.kv_caches, self.folder, self.cold = kind, kv_caches, folder, cold
        self.runs: list[dict[str, Any]] = []
        self.file: list[dict[str, Any]] = []
        self._buffers: Any = None

    def after(self, nbytes: int) -> dict[str, Any]:
        """This repetition's limit; also kept for :meth:`ceilings`."""
        out: dict[str, Any] = {}
        if self.kind == "memcpy":
            out["memcpy_gbps"] = self._memcpy(nbytes)
        elif self.kind == "network":
            out["loopback_tcp_gbps"] = _loopback_tcp_gbps(max(nbytes, 64 << 20))
        elif self.kind == "file" and self.folder is not None:
            io = raw_file_io(self.kv_caches, nbytes, self.folder, self.cold, reps=1, warmup=1)
            self.file.append(io)
            out.update({"file_write_gbps": io["write_gbps"], "file_read_cold_gbps": io["read_cold_gbps"],
                        "file_read_warm_gbps": io["read_warm_gbps"]})
            if "write_direct_gbps" in io:
                out["file_write_direct_gbps"] = io["write_direct_gbps"]
        self.runs.append(out)
        return out

    def _memcpy(self, nbytes: int) -> float:
        import torch

        copied = max(nbytes, MEMCPY_MIN_BYTES)
        if self._buffers is None or self._buffers[0].numel() != copied:
            self._buffers = None  # the old pair goes before the new one is touched
            self._buffers = (torch.ones(copied, dtype=torch.uint8), torch.zeros(copied, dtype=torch.uint8))
        return memcpy_gbps(copied, reps=3, buffers=self._buffers)

    def ceilings(self, nbytes: int) -> dict[str, Any]:
        """Every limit: the medians of the repetitions' where they were measured after each (each
        repetition's kept in ``by_repetition``), the others once on ``nbytes``."""
        spread = {k: [r[k] for r in self.runs if k in r] for k in {k for r in self.runs for k in r}}
        copied = max(nbytes, MEMCPY_MIN_BYTES)
        out: dict[str, Any] = {
            "memcpy_gbps": (round(statistics.median(spread["memcpy_gbps"]), 3) if spread.get("memcpy_gbps")
                            else self._memcpy(nbytes)),
            "memcpy_bytes": copied,
            "loopback_tcp_gbps": (round(statistics.median(spread["loopback_tcp_gbps"]), 3)
                                  if spread.get("loopback_tcp_gbps") else _loopback_tcp_gbps(max(nbytes, 64 << 20))),
        }
        self._buffers = None
        for k in ("file_write_gbps", "file_read_cold_gbps", "file_read_warm_gbps", "file_write_direct_gbps"):
            if spread.get(k):
                out[k] = statistics.median(spread[k])
        out["by_repetition"] = {k: v for k, v in sorted(spread.items())}
        return out

    def close(self) -> None:
        """Lets the memcpy buffers go."""
        self._buffers = None

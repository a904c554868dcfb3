"""``action=bench``: a connector measured through the same config, against the raw path under it.

The connector's own self-test runs ``bench.warmup`` times unmeasured, then ``bench.repetitions``
times; every loaded byte is verified each time (a wrong byte fails the benchmark). Figures: save
and load throughput (GB/s), per-request latency (p50, p90, p99; for the peer-to-peer connectors the
time from a consumer's request to its last block arriving), and, where the connector names one, the
raw path on the same bytes with the ratio connector/raw, beside the machine's ceilings (memcpy,
loopback TCP). The CLI writes the result as ``results.json`` into the job's directory.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import threading
import time
from typing import Any, Optional

__all__ = ["RESULTS_SCHEMA", "Progress", "ceilings", "environment", "percentiles", "run_bench"]

RESULTS_SCHEMA = "kvconf-bench/1"


def percentiles(values: list[float]) -> dict[str, Optional[float]]:
    """p50, p90 and p99 (nearest rank) in milliseconds.

    >>> percentiles([0.001 * i for i in range(1, 101)])
    {'p50': 50.0, 'p90': 90.0, 'p99': 99.0}
    """
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, int(round(q * len(v))) - 1))] * 1000, 4)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99)}


def environment(device: str) -> dict[str, Any]:
    """Versions, CPU and device: what a result was measured on."""
    import importlib.metadata as md

    def version(name: str) -> Optional[str]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "device": device,
        "versions": {n: version(n) for n in ("kvconf", "torch", "hydra-core", "pydantic", "pyzmq",
                                              "mooncake-transfer-engine-non-cuda", "nixl")},
    }


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


class Progress:
    """A one-line progress bar on a terminal, shown once a task has run 2 s; silent when the
    stream is not a terminal (a pipe, a file, CI) or the output is JSON.

    >>> import io
    >>> p = Progress(3, "bench", stream=io.StringIO(), enabled=True, after=0.0)
    >>> p.step("warm-up"); p.step("1/2"); p.done(); p.stream.getvalue().count("bench")
    2
    >>> quiet = Progress(3, "bench", stream=io.StringIO())  # a StringIO is not a terminal
    >>> quiet.step("warm-up"); quiet.stream.getvalue()
    ''
    """

    def __init__(self, total: int, label: str, stream: Any = None, enabled: Optional[bool] = None,
                 after: float = 2.0) -> None:
        self.total, self.label, self.n = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.after, self.t0, self.shown = after, time.monotonic(), False

    def step(self, what: str) -> None:
        self.n += 1
        if self.enabled and time.monotonic() - self.t0 >= self.after:
            filled = int(20 * self.n / max(self.total, 1))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.n}/{self.total} {what}   ")
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def run_bench(connector: Any, kv_caches: Any, ctx: Any) -> dict[str, Any]:
    """Warm-up, repetitions and the raw path; the figures of ``results.json``."""
    from .errors import ConnectorRuntimeError, Problem

    import dataclasses

    bench = ctx.bench
    if bench.requests is not None:
        ctx = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"requests": bench.requests}))
    ctx = dataclasses.replace(ctx, prompt_blocks=bench.prompt_blocks, concurrency=bench.concurrency)
    runs = []
    total = bench.warmup + bench.repetitions
    progress = Progress(total + int(bench.raw) + int(bench.ceilings), f"kvconf bench {connector.config.name}",
                        enabled=None if ctx.output != "json" else False)
    for i in range(total):
        progress.step("warm-up" if i < bench.warmup else f"repetition {i - bench.warmup + 1}")
        result = connector.self_test(kv_caches, dataclasses.replace(ctx, salt=ctx.salt * 1000 + i + 1))
        if not result.get("verified"):
            raise ConnectorRuntimeError(Problem("bench", "a loaded byte differs from what was saved",
                                                fix="the connector's data path is wrong"))
        if i >= bench.warmup:
            runs.append(result)
    moved = sum(r["bytes"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    latencies = [s for r in runs for s in r.get("request_seconds", [])]
    figures: dict[str, Any] = {
        "bytes": moved, "seconds": round(seconds, 6), "verified": True,
        "gbps": round(moved / seconds / 1e9, 3) if seconds else None,
        "save_gbps": _rate(runs, "saved_bytes", "save_seconds"),
        "load_gbps": _rate(runs, "loaded_bytes", "load_seconds"),
        "latency_ms": percentiles(latencies), "requests": sum(r.get("requests", 0) for r in runs),
        "repetitions": bench.repetitions, "warmup": bench.warmup,
        "transport": runs[-1].get("transport") if runs else None,
    }
    if bench.raw:
        progress.step("raw path")
    raw = connector.raw_path(kv_caches, ctx, runs) if bench.raw else None
    if bench.ceilings:
        progress.step("ceilings")
    out = {"figures": figures, "raw": raw,
           "ratio": round(figures["gbps"] / raw["gbps"], 3) if raw and raw.get("gbps") and figures["gbps"] else None,
           "ceilings": ceilings() if bench.ceilings else None}
    progress.done()
    return out


def _rate(runs: list[dict[str, Any]], key_bytes: str, key_seconds: str) -> Optional[float]:
    b = sum(r.get(key_bytes, 0) or 0 for r in runs)
    s = sum(r.get(key_seconds, 0) or 0 for r in runs)
    return round(b / s / 1e9, 3) if b and s else None


def _layer_rows(kv_caches: dict[str, Any]) -> list[Any]:
    """Every layer as ``(num_blocks, page bytes)`` uint8: the rows the raw paths move."""
    import torch

    return [t.flatten(1).view(torch.uint8) for t in kv_caches.values()]


def raw_torch_copy(kv_caches: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """The fastest plain torch gather plus scatter of ``nbytes`` (half gathered, half scattered) of
    scattered blocks in every layer: what a host-memory tier does at best (``index_select`` gathers
    at memcpy speed; a loop of ``copy_`` scatters faster here than ``index_copy_`` or ``index_put_``)."""
    import random

    import torch

    layers = _layer_rows(kv_caches)
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

    layers = _layer_rows(kv_caches)
    per_block = sum(r.shape[1] for r in layers)
    n = max(1, min(layers[0].shape[0], nbytes // 2 // per_block))
    data = torch.cat([r[:n].reshape(-1) for r in layers])
    back = torch.zeros_like(data)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".kvconf-raw-{os.getpid()}.bin")
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, memoryview(data.numpy()).cast("B"))
        os.fsync(fd)
        os.close(fd)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            f.readinto(memoryview(back.numpy()).cast("B"))
        t_read = time.perf_counter() - t0
    finally:
        if os.path.exists(path):
            os.unlink(path)
    moved = 2 * data.numel()
    return {"path": "one raw file: write + fsync, read", "bytes": moved,
            "gbps": round(moved / (t_write + t_read) / 1e9, 3), "write_seconds": t_write, "read_seconds": t_read}

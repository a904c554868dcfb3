"""``action=bench``: a connector measured through the same config, against the raw path under it.

The connector's own self-test runs ``bench.warmup`` times unmeasured, then ``bench.repetitions``
times; every loaded byte is verified each time (a wrong byte fails the benchmark). Figures: save
and load throughput (GB/s), per-request latency (p50, p90, p99; for the peer-to-peer connectors the
time from a consumer's request to its last block arriving), and the raw path on the same bytes with
the ratio connector/raw (the connector's own, :class:`~kvconf.contract.capabilities.SupportsRawPath`,
or the baseline it names, :class:`~kvconf.contract.capabilities.ComparesToBaseline`), beside the
machine's ceilings (memcpy, loopback TCP). The CLI writes the result as ``results.json`` into the
job's directory (:mod:`kvconf.bench.results`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Optional

from kvconf.contract.capabilities import ComparesToBaseline, SelfTestContext, SupportsRawPath
from kvconf.errors import ConnectorRuntimeError, Problem
from kvconf.runtime.engine import self_test

from .raw import ceilings, raw_file_io, raw_torch_copy

__all__ = ["Progress", "percentiles", "raw_path", "run_bench"]


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
        result = self_test(connector, kv_caches, dataclasses.replace(ctx, salt=ctx.salt * 1000 + i + 1))
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
    raw = raw_path(connector, kv_caches, ctx, runs) if bench.raw else None
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


def raw_path(connector: Any, kv_caches: Any, ctx: SelfTestContext, runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The raw path under ``connector`` on as many bytes as its largest measured run, or None."""
    if isinstance(connector, SupportsRawPath):
        return connector.raw_path(kv_caches, ctx, runs)
    if not (isinstance(connector, ComparesToBaseline) and runs and kv_caches):
        return None
    nbytes = max(r["bytes"] for r in runs)
    if connector.baseline == "file_io":
        return raw_file_io(kv_caches, nbytes, connector.baseline_dir())
    return raw_torch_copy(kv_caches, nbytes)

"""``action=bench``: a connector measured through the same config, against the raw path under it.

The connector's own self-test runs ``bench.warmup`` times unmeasured, then ``bench.repetitions``
times; every loaded byte is verified each time (a wrong byte fails the benchmark). Figures: save
and load throughput (GB/s), per-request latency (p50, p90, p99; for the peer-to-peer connectors the
time from a consumer's request to its last block arriving), and the raw path on the same bytes with
the ratio connector/raw (the connector's own, :class:`~kvconf.contract.capabilities.SupportsRawPath`,
or the baseline it names, :class:`~kvconf.contract.capabilities.ComparesToBaseline`), beside the
machine's ceilings on the same bytes (memcpy, raw file I/O cold and warm, loopback TCP) and
``ceiling_ratio``: the connector over the physical limit that bounds it, so that a slow raw path
cannot hide a gap. That limit is measured right after each repetition, and each repetition is
divided by its own (:class:`~kvconf.bench.raw.Limits`): the ratio is the median of those. Each
repetition's throughput is kept (``by_repetition``): their spread is what ``kvconf bench-compare``
calls noise. The raw path is measured right after each repetition as well, and ``ratio`` is the
median of the paired ratios. A peer-to-peer connector's repetition moves ``bench.min_seconds`` of
transfers with one peer process. A figure that was not measured is left out. The CLI
writes the result as ``results.json`` into the job's directory (:mod:`kvconf.bench.results`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from typing import Any, Optional

from kvconf.contract.capabilities import (
    ColdLoads,
    ComparesToBaseline,
    KeepsStore,
    SelfTestContext,
    SupportsRawPath,
)
from kvconf.errors import ConnectorRuntimeError, Problem
from kvconf.runtime.engine import self_test

from .raw import Limits, merge_file_io, raw_file_io, raw_torch_copy

__all__ = ["CEILING_NAMES", "Progress", "ceiling_kind", "ceiling_ratio", "percentiles", "raw_path", "run_bench"]


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
    """Warm-up, repetitions, the raw path and the ceilings; the figures of ``results.json``. A
    connector that keeps a store (:class:`KeepsStore`) runs in a fresh private one unless
    ``bench.reuse_store``."""
    private = isinstance(connector, KeepsStore) and not ctx.bench.reuse_store
    with connector.private_store() if private else contextlib.nullcontext(None) as where:
        out = _bench(connector, kv_caches, ctx)
    if isinstance(connector, KeepsStore):
        out["store"] = {"private": private, "path": where} if private else {"private": False}
    return out


def _bench(connector: Any, kv_caches: Any, ctx: Any) -> dict[str, Any]:
    bench = ctx.bench
    if bench.requests is not None:
        ctx = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"requests": bench.requests}))
    ctx = dataclasses.replace(ctx, prompt_blocks=bench.prompt_blocks, concurrency=bench.concurrency, batch_steps=True,
                              min_seconds=bench.min_seconds)
    runs = []
    total = bench.warmup + bench.repetitions
    progress = Progress(total + int(bench.raw) + int(bench.ceilings), f"kvconf bench {connector.config.name}",
                        enabled=None if ctx.output != "json" else False)
    kind = ceiling_kind(connector)
    cold = bool(bench.cold_loads and isinstance(connector, ColdLoads))
    file_raw = bench.raw and kind == "file" and bool(kv_caches)  # the raw path is the disk's limit: measured alike
    limits = Limits(kind if bench.ceilings or file_raw else None, kv_caches,
                    connector.baseline_dir() if kind == "file" else None, cold)
    raws: list[dict[str, Any]] = []
    try:
        for i in range(total):
            progress.step("warm-up" if i < bench.warmup else f"repetition {i - bench.warmup + 1}")
            rounds: list[dict[str, Any]] = []
            started = time.monotonic()
            while not rounds or (time.monotonic() - started < bench.min_seconds and len(rounds) < MAX_ROUNDS):
                salt = (ctx.salt * 1000 + i + 1) * MAX_ROUNDS + len(rounds)
                result = self_test(connector, kv_caches, dataclasses.replace(ctx, salt=salt))
                if not result.get("verified"):
                    raise ConnectorRuntimeError(Problem("bench", "a loaded byte differs from what was saved",
                                                        fix="the connector's data path is wrong"))
                rounds.append(result)
            if i >= bench.warmup:
                runs.append(merge_rounds(rounds))
                if limits.kind is not None:  # the limit right away: the same moment as the repetition
                    limits.after(runs[-1]["bytes"])
                if bench.raw and not file_raw:  # the raw path too (a disk's is its limit, measured above)
                    one = raw_path(connector, kv_caches, ctx, runs[-1:], cold)
                    if one is not None:
                        raws.append(one)
        figures = _figures(runs, bench)
        if bench.raw:
            progress.step("raw path")
        raw = merge_file_io(limits.file) if file_raw and limits.file else merge_raw(raws) if raws else None
        ceilings = None
        if bench.ceilings:
            progress.step("ceilings")
            ceilings = limits.ceilings(max((r["bytes"] for r in runs), default=0))
        out = {"figures": figures, "raw": raw, "ratio": paired_ratio(runs, raw),
               "ceilings": ceilings,
               "ceiling_ratio": ceiling_ratio(kind, runs, limits.runs, cold) if ceilings else None}
        progress.done()
        return out
    finally:
        limits.close()


MAX_ROUNDS = 1000
"""Most rounds of the workload in one repetition."""

SUMMED = ("bytes", "seconds", "saved_bytes", "save_seconds", "loaded_bytes", "load_seconds", "prefix_bytes",
          "prefix_seconds", "requests", "hits", "misses", "prefix_hits")


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One repetition's figures from its rounds: byte counts, times and counts summed, per-request
    latencies joined, the rest as the last round has them.

    >>> merge_rounds([{"bytes": 2, "seconds": 1.0, "request_seconds": [0.5], "transport": "tcp"},
    ...               {"bytes": 4, "seconds": 1.0, "request_seconds": [0.25], "transport": "tcp"}])
    {'bytes': 6, 'seconds': 2.0, 'request_seconds': [0.5, 0.25], 'transport': 'tcp', 'rounds': 2}
    """
    out = dict(rounds[-1])
    for key in SUMMED:
        if key in out:
            out[key] = sum(r.get(key) or 0 for r in rounds)
    if "request_seconds" in out:
        out["request_seconds"] = [s for r in rounds for s in r.get("request_seconds", [])]
    out["rounds"] = len(rounds)
    return out


def _figures(runs: list[dict[str, Any]], bench: Any) -> dict[str, Any]:
    """Throughput (``gbps``, ``save_gbps``, ``load_gbps``: the median of the repetitions' rates,
    so that one repetition that met a disk's writeback stall does not stand for the others),
    latency and each repetition's throughput (their spread); a figure that was not measured (no
    save side, say) is left out.

    >>> class B: repetitions, warmup = 3, 0
    >>> runs = [{"bytes": 10**9, "seconds": s} for s in (1.0, 0.5, 4.0)]  # 1, 2 and 0.25 GB/s
    >>> f = _figures(runs, B()); f["gbps"], f["by_repetition"]["gbps"]
    (1.0, [1.0, 2.0, 0.25])
    """
    moved = sum(r["bytes"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    latencies = [s for r in runs for s in r.get("request_seconds", [])]
    spread = {k: [x for x in (_rate([r], b, s) for r in runs) if x is not None]
              for k, b, s in (("gbps", "bytes", "seconds"), ("save_gbps", "saved_bytes", "save_seconds"),
                              ("load_gbps", "loaded_bytes", "load_seconds"))}
    figures: dict[str, Any] = {
        "bytes": moved, "seconds": round(seconds, 6), "verified": True,
        "gbps": _median(spread["gbps"]), "save_gbps": _median(spread["save_gbps"]),
        "load_gbps": _median(spread["load_gbps"]),
        "latency_ms": percentiles(latencies), "requests": sum(r.get("requests", 0) for r in runs),
        "repetitions": bench.repetitions, "warmup": bench.warmup,
        "transport": runs[-1].get("transport") if runs else None,
    }
    figures["by_repetition"] = {k: v for k, v in spread.items() if v and figures.get(k) is not None}
    return {k: v for k, v in figures.items() if v is not None}


def _median(values: list[float]) -> Optional[float]:
    return round(statistics.median(values), 3) if values else None


def ceiling_kind(connector: Any) -> Optional[str]:
    """Which physical limit bounds ``connector``: ``memcpy`` (a host-memory tier), ``file`` (a
    disk tier: raw write + fsync, raw read), ``network`` (a peer-to-peer transfer: one loopback
    TCP stream), or None (unknown: a composite)."""
    if isinstance(connector, ComparesToBaseline):
        return "file" if connector.baseline == "file_io" else "memcpy"
    if isinstance(connector, SupportsRawPath):
        return "network"
    return None


CEILING_NAMES = {"memcpy": "memcpy", "file": "raw file: write + fsync, read", "network": "loopback TCP"}


def ceiling_ratio(kind: Optional[str], runs: list[dict[str, Any]], limits: list[dict[str, Any]],
                  cold: bool) -> Optional[dict[str, Any]]:
    """Connector / physical limit for save, load and overall (the time the limit would take for
    the same saved and loaded bytes over the connector's time), each repetition over the limit
    measured right after it (``limits[i]``; a single one stands for every repetition): the
    median of the repetitions' ratios, each kept in ``by_repetition``. None where a side does
    not apply.

    >>> runs = [{"bytes": 4e9, "seconds": 1.0, "saved_bytes": 2e9, "save_seconds": 0.5,
    ...          "loaded_bytes": 2e9, "load_seconds": 0.5}] * 2
    >>> cr = ceiling_ratio("memcpy", runs, [{"memcpy_gbps": 8.0}, {"memcpy_gbps": 4.0}], False)
    >>> cr["save"], cr["by_repetition"]["save"], cr["overall"]
    (0.75, [0.5, 1.0], 0.75)
    """
    if kind is None or not limits:
        return None

    def at(lim: dict[str, Any]) -> tuple[Optional[float], Optional[float], Optional[float]]:
        return {
            "memcpy": (lim.get("memcpy_gbps"),) * 3,
            "file": (lim.get("file_write_gbps"), lim.get("file_read_cold_gbps" if cold else "file_read_warm_gbps"),
                     lim.get("file_read_warm_gbps")),
            "network": (None, lim.get("loopback_tcp_gbps"), lim.get("loopback_tcp_gbps")),
        }[kind]

    sides: dict[str, list[float]] = {"save": [], "load": [], "overall": []}
    whole = True  # whole: every byte moved has a limit to go by
    for i, r in enumerate(runs):
        save_at, load_at, prefix_at = at(limits[min(i, len(limits) - 1)])
        for side, b, s, limit in (("save", "saved_bytes", "save_seconds", save_at),
                                  ("load", "loaded_bytes", "load_seconds", load_at)):
            rate = _rate([r], b, s)
            if rate and limit:
                sides[side].append(rate / limit)
        ideal = 0.0
        saved, loaded = r.get("saved_bytes") or 0, r.get("loaded_bytes") or 0
        prefix = r.get("prefix_bytes") or 0
        other = max(0, r["bytes"] - saved - loaded - prefix)  # moved, not split by side (a transfer)
        for n, limit in ((saved, save_at), (loaded + other, load_at), (prefix, prefix_at)):
            if n and limit:
                ideal += n / (limit * 1e9)
            elif n:
                whole = False
        if r["seconds"]:
            sides["overall"].append(ideal / r["seconds"])
    if not whole:
        sides["overall"] = []
    return {"save": _median(sides["save"]), "load": _median(sides["load"]), "overall": _median(sides["overall"]),
            "against": CEILING_NAMES[kind],
            "by_repetition": {k: [round(x, 3) for x in v] for k, v in sides.items() if v}}


def _rate(runs: list[dict[str, Any]], key_bytes: str, key_seconds: str) -> Optional[float]:
    b = sum(r.get(key_bytes, 0) or 0 for r in runs)
    s = sum(r.get(key_seconds, 0) or 0 for r in runs)
    return round(b / s / 1e9, 3) if b and s else None


def merge_raw(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """The raw path measured after each repetition, as one: the median throughput, each
    repetition's in ``by_repetition``.

    >>> merge_raw([{"path": "p", "bytes": 2, "gbps": 1.0}, {"path": "p", "bytes": 2, "gbps": 3.0}])
    {'path': 'p', 'bytes': 4, 'gbps': 2.0, 'by_repetition': {'gbps': [1.0, 3.0]}}
    """
    gbps = [r["gbps"] for r in raws if r.get("gbps")]
    return {**raws[-1], "bytes": sum(r.get("bytes", 0) for r in raws), "gbps": _median(gbps),
            "by_repetition": {"gbps": gbps}}


def paired_ratio(runs: list[dict[str, Any]], raw: Optional[dict[str, Any]]) -> Optional[float]:
    """Connector / raw path: each repetition over the raw path measured right after it, the
    median of those (where every repetition has its own); else the medians' ratio.

    >>> runs = [{"bytes": 10**9, "seconds": 1.0}, {"bytes": 10**9, "seconds": 0.5}]
    >>> paired_ratio(runs, {"gbps": 1.5, "by_repetition": {"gbps": [1.0, 4.0]}})
    0.75
    """
    if not raw or not raw.get("gbps"):
        return None
    mine = [_rate([r], "bytes", "seconds") for r in runs]
    theirs = (raw.get("by_repetition") or {}).get("gbps") or []
    if len(theirs) == len(mine) and all(mine) and all(theirs):
        return _median([m / t for m, t in zip(mine, theirs)])
    gbps = _median([m for m in mine if m])
    return round(gbps / raw["gbps"], 3) if gbps else None


def raw_path(connector: Any, kv_caches: Any, ctx: SelfTestContext, runs: list[dict[str, Any]],
             cold: bool = False) -> Optional[dict[str, Any]]:
    """The raw path under ``connector`` on as many bytes as its largest measured run, or None."""
    if isinstance(connector, SupportsRawPath):
        return connector.raw_path(kv_caches, ctx, runs)
    if not (isinstance(connector, ComparesToBaseline) and runs and kv_caches):
        return None
    nbytes = max(r["bytes"] for r in runs)
    if connector.baseline == "file_io":
        return raw_file_io(kv_caches, nbytes, connector.baseline_dir(), cold)
    return raw_torch_copy(kv_caches, nbytes)

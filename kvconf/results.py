"""Benchmark results: ``results.json`` per job, the sweep summary (CSV, table, PNG), and
``kvconf bench-compare A B``.

``results.json`` holds the composed config, the environment (versions, CPU, device) and the
figures; its JSON Schema is ``schemas/results.schema.json`` (generated from :class:`BenchResults`).
A multirun sweep of ``action=bench`` ends with ``summary.csv``, a table on the terminal and
``summary.png`` (throughput by connector and layout, the raw path beside it) in the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

__all__ = ["BenchResults", "compare_main", "summarize", "write_results"]


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
    gbps: Optional[float]
    save_gbps: Optional[float]
    load_gbps: Optional[float]
    latency_ms: Latency
    requests: int
    repetitions: int
    warmup: int


class Raw(_Open):
    path: str
    """What the raw path is (a torch copy, raw file I/O, the bare engine)."""
    gbps: float


class Ceilings(BaseModel):
    memcpy_gbps: float
    loopback_tcp_gbps: float


class Environment(_Open):
    python: str
    cpu: str
    cpu_count: Optional[int]
    device: str
    versions: dict[str, Optional[str]]


class BenchResults(BaseModel):
    """One ``action=bench`` job's ``results.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["kvconf-bench/1"] = "kvconf-bench/1"
    connector: str
    kv_cache: str
    """The layout's label: its config-group option where known, else its bytes per block."""
    bytes_per_block: int
    role: str
    kv_role: str
    config: dict[str, Any]
    """The composed config, as run."""
    environment: Environment
    figures: Figures
    raw: Optional[Raw]
    ratio: Optional[float]
    """figures.gbps / raw.gbps."""
    ceilings: Optional[Ceilings]
    timings: dict[str, float]


def write_results(report: dict[str, Any], data: dict[str, Any], out_dir: Path, kv_label: str) -> Path:
    """Writes ``results.json`` for one bench job; its path."""
    from .bench import environment

    bench = report["bench"]
    doc = {
        "schema_": "kvconf-bench/1", "connector": report["connector"]["name"], "kv_cache": kv_label,
        "bytes_per_block": report["plan"]["bytes_per_block"], "role": report["role"], "kv_role": report["kv_role"],
        "config": data, "environment": environment(report["device"]), "figures": bench["figures"],
        "raw": bench["raw"], "ratio": bench["ratio"], "ceilings": bench["ceilings"], "timings": report["timings"],
    }
    BenchResults.model_validate(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


COLUMNS = ["job", "connector", "kv_cache", "status", "gbps", "save_gbps", "load_gbps", "raw_gbps", "ratio",
           "p50_ms", "p99_ms", "raw_path"]


def _row(job: str, doc: dict[str, Any]) -> dict[str, Any]:
    f, raw = doc["figures"], doc.get("raw") or {}
    return {"job": job, "connector": doc["connector"], "kv_cache": doc["kv_cache"], "status": "ok",
            "gbps": f.get("gbps"), "save_gbps": f.get("save_gbps"), "load_gbps": f.get("load_gbps"),
            "raw_gbps": raw.get("gbps"), "ratio": doc.get("ratio"), "p50_ms": f["latency_ms"]["p50"],
            "p99_ms": f["latency_ms"]["p99"], "raw_path": raw.get("path", "")}


def summarize(sweep_dir: Path, out=sys.stdout) -> list[dict[str, Any]]:
    """``summary.csv``, a terminal table and ``summary.png`` for the jobs under ``sweep_dir``."""
    rows = []
    for job in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        res, err = job / "results.json", job / "error.json"
        if res.exists():
            rows.append(_row(job.name, json.loads(res.read_text())))
        elif err.exists():
            e = json.loads(err.read_text())
            rows.append({"job": job.name, "connector": e.get("connector", ""), "kv_cache": e.get("kv_cache", ""),
                         "status": f"failed (exit {e.get('exit_code')}): {e.get('message', '')}"})
    if not rows:
        return rows
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    shown = ["job", "connector", "kv_cache", "gbps", "raw_gbps", "ratio", "p50_ms", "p99_ms", "status"]
    cells = [[("" if r.get(c) is None else str(r.get(c, ""))) for c in shown] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(shown)]
    print("  ".join(c.ljust(w) for c, w in zip(shown, widths)), file=out)
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)), file=out)
    _plot(rows, sweep_dir / "summary.png")
    print(f"kvconf: sweep summary in {sweep_dir / 'summary.csv'} and {sweep_dir / 'summary.png'}", file=out)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the CSV and the table are still there
        return
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    labels = [f"{r['connector']}\n{r['kv_cache']}" for r in ok]
    xs = range(len(ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r["gbps"] or 0 for r in ok], 0.4, label="connector")
    ax.bar([x + 0.2 for x in xs], [r["raw_gbps"] or 0 for r in ok], 0.4, label="raw path", alpha=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB/s (save + load, or transfer)")
    ax.set_title("kvconf bench: throughput by connector and KV layout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """``label -> figures`` from a results.json or a sweep folder of them."""
    files = [path] if path.is_file() else sorted(path.glob("*/results.json"))
    out = {}
    for f in files:
        doc = json.loads(f.read_text())
        out[f"{doc['connector']} {doc['kv_cache']}"] = {**doc["figures"], "raw_gbps": (doc.get("raw") or {}).get("gbps"),
                                                        "ratio": doc.get("ratio")}
    return out


def compare_main(argv: list[str] | None = None) -> int:
    """``kvconf bench-compare A B``: the change of each figure from A to B."""
    p = argparse.ArgumentParser(prog="kvconf bench-compare",
                                description="Compare two results.json files, or two sweep folders of them.")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--format", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    for x in (args.a, args.b):
        if not x.exists():
            p.error(f"{x}: no such file or folder")
    a, b = _load(args.a), _load(args.b)
    keys = ["gbps", "save_gbps", "load_gbps", "raw_gbps", "ratio"]
    rows = []
    for label in sorted(set(a) & set(b)):
        for k in keys:
            va, vb = a[label].get(k), b[label].get(k)
            if va is None or vb is None:
                continue
            rows.append({"job": label, "figure": k, "a": va, "b": vb,
                         "change_pct": round((vb - va) / va * 100, 1) if va else None})
        for q in ("p50", "p99"):
            va, vb = a[label]["latency_ms"].get(q), b[label]["latency_ms"].get(q)
            if va is not None and vb is not None:
                rows.append({"job": label, "figure": f"latency_{q}_ms", "a": va, "b": vb,
                             "change_pct": round((vb - va) / va * 100, 1) if va else None})
    if args.format == "json":
        print(json.dumps({"rows": rows, "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a))}))
    else:
        for r in rows:
            pct = "" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
            print(f"{r['job']:<28} {r['figure']:<16} {r['a']:>10} -> {r['b']:<10} {pct}")
        for label in sorted(set(a) ^ set(b)):
            print(f"{label:<28} only in {'A' if label in a else 'B'}")
    return 0 if rows or not (a or b) else 1


from hydra.experimental.callback import Callback  # noqa: E402  (only the CLI imports this module)


class SweepSummary(Callback):
    """A Hydra callback (``hydra.callbacks`` in conf/config.yaml): the summary at the end of a
    multirun sweep of ``action=bench`` jobs."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from .cli import _state

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        for err in sorted(sweep_dir.glob("*/error.json")):  # jobs a launcher ran elsewhere report here
            _state.swept_failures.append((str(err.parent), int(json.loads(err.read_text()).get("exit_code", 1))))
        if any(sweep_dir.glob("*/results.json")):
            summarize(sweep_dir)

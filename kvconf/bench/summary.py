"""The summary of a multirun sweep of ``action=bench`` jobs: ``summary.csv``, a table on the
terminal and ``summary.png`` in the sweep folder: throughput by connector and layout (error bars:
the repetitions' spread) beside the raw path and the connector's share of the physical limit
(``ceiling_ratio``), and per-request latency (p50, a mark at p90, error bars to p99). A failed
job (its ``error.json``) is listed as failed. The plot needs matplotlib (``pip install
kvconf[plot]``); without it the CSV and the table are still written.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "rows_from_folders", "rows_from_records", "summarize"]


COLUMNS = ["job", "connector", "kv_cache", "status", "gbps", "save_gbps", "load_gbps", "raw_gbps", "ratio",
           "ceiling_save", "ceiling_load", "ceiling_overall", "ceiling", "gbps_min", "gbps_max", "p50_ms", "p90_ms",
           "p99_ms", "raw_path"]


def _row(job: str, doc: dict[str, Any]) -> dict[str, Any]:
    f, raw, cr = doc["figures"], doc.get("raw") or {}, doc.get("ceiling_ratio") or {}
    reps = (f.get("by_repetition") or {}).get("gbps") or []
    return {"job": job, "connector": doc["connector"], "kv_cache": doc["kv_cache"], "status": "ok",
            "gbps": f.get("gbps"), "save_gbps": f.get("save_gbps"), "load_gbps": f.get("load_gbps"),
            "raw_gbps": raw.get("gbps"), "ratio": doc.get("ratio"), "ceiling_save": cr.get("save"),
            "ceiling_load": cr.get("load"), "ceiling_overall": cr.get("overall"), "ceiling": cr.get("against", ""),
            "gbps_min": min(reps) if reps else None, "gbps_max": max(reps) if reps else None,
            "p50_ms": f["latency_ms"]["p50"], "p90_ms": f["latency_ms"].get("p90"),
            "p99_ms": f["latency_ms"]["p99"], "raw_path": raw.get("path", "")}


def _failed(job: str, connector: Any, kv_cache: Any, code: Any, message: str) -> dict[str, Any]:
    return {"job": job, "connector": connector or "", "kv_cache": kv_cache or "",
            "status": f"failed (exit {code}): {message}"}


def rows_from_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary's rows from the records the jobs returned (:func:`kvconf.cli.app.execute`), in job
    order: a bench's figures, or why the job failed. Jobs that are not benches have no row."""
    rows = []
    for i, r in enumerate(records):
        if r.get("results"):
            rows.append(_row(str(i), r["results"]))
        elif r.get("exit_code"):
            rows.append(_failed(str(i), r.get("connector"), r.get("kv_cache"), r["exit_code"], r.get("message", "")))
    return rows


def rows_from_folders(sweep_dir: Path) -> list[dict[str, Any]]:
    """The summary's rows from the ``results.json`` or ``error.json`` each job left in its folder."""
    rows = []
    for job in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        res, err = job / "results.json", job / "error.json"
        if res.exists():
            rows.append(_row(job.name, json.loads(res.read_text())))
        elif err.exists():
            e = json.loads(err.read_text())
            rows.append(_failed(job.name, e.get("connector"), e.get("kv_cache"), e.get("exit_code"), e.get("message", "")))
    return rows


def summarize(sweep_dir: Path, out=sys.stdout, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``summary.csv``, a terminal table and ``summary.png`` in ``sweep_dir``: from the jobs'
    returned ``records`` where the launching process has them, else from the jobs' folders."""
    rows = rows_from_records(records) if records is not None else rows_from_folders(sweep_dir)
    if not rows or not any(r["status"] == "ok" for r in rows):
        return rows
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    shown = ["job", "connector", "kv_cache", "gbps", "raw_gbps", "ratio", "ceiling_save", "ceiling_load",
             "ceiling_overall", "p50_ms", "p99_ms", "status"]
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
    xs = list(range(len(ok)))
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(ok)), 4.8))
    gbps = [r["gbps"] or 0 for r in ok]
    spread = [[max(0.0, g - (r["gbps_min"] if r.get("gbps_min") is not None else g)) for g, r in zip(gbps, ok)],
              [max(0.0, (r["gbps_max"] if r.get("gbps_max") is not None else g) - g) for g, r in zip(gbps, ok)]]
    ax.bar([x - 0.2 for x in xs], gbps, 0.4, yerr=spread, capsize=3, label="connector (spread of repetitions)")
    ax.bar([x + 0.2 for x in xs], [r["raw_gbps"] or 0 for r in ok], 0.4, label="raw path", alpha=0.6)
    tops = [g + up for g, up in zip(gbps, spread[1])]  # a label sits above its bar's error bar
    for x, top, r in zip(xs, tops, ok):
        if r.get("ceiling_overall") is not None:
            short = {"memcpy": "memcpy", "loopback TCP": "TCP"}.get(r["ceiling"], "disk" if r["ceiling"] else "limit")
            ax.annotate(f"{r['ceiling_overall']:.2f}\nof {short}", (x - 0.2, top), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_ylim(0, 1.2 * max([*tops, *(r["raw_gbps"] or 0 for r in ok), 1e-9]))  # room for the labels
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB/s (save + load, or transfer)")
    ax.set_title("throughput (label: share of the physical limit)", fontsize=10)
    ax.legend(fontsize=8)
    p50 = [r["p50_ms"] or 0 for r in ok]
    upper = [max(0.0, (r.get("p99_ms") or p) - p) for p, r in zip(p50, ok)]
    lat.bar(xs, p50, 0.5, yerr=[[0.0] * len(ok), upper], capsize=3, color="tab:green", alpha=0.8,
            label="p50 (error bar to p99)")
    lat.scatter(xs, [r.get("p90_ms") or p for p, r in zip(p50, ok)], marker="_", s=200, color="black", label="p90")
    lat.set_xticks(xs)
    lat.set_xticklabels(labels, fontsize=8)
    lat.set_ylabel("ms per request")
    lat.set_yscale("log")
    lat.set_title("latency per request", fontsize=10)
    lat.legend(fontsize=8)
    fig.suptitle("kvconf bench: by connector and KV layout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

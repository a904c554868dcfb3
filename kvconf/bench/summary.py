"""The summary of a multirun sweep of ``action=bench`` jobs: ``summary.csv``, a table on the
terminal and ``summary.png`` (throughput by connector and layout, the raw path beside it) in the
sweep folder. A failed job (its ``error.json``) is listed as failed. The plot needs matplotlib
(``pip install kvconf[plot]``); without it the CSV and the table are still written.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "summarize"]


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

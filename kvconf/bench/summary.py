"""The summary of a multirun sweep of ``action=bench`` jobs: ``summary.csv``, a table on the
terminal and ``summary.png`` in the sweep folder: throughput by connector and layout (error bars:
the repetitions' spread) beside the raw path and the connector's share of the physical limit
(``ceiling_ratio``), and per-request latency (p50, a mark at p90, error bars to p99). Jobs that ran
inside vLLM (``bench.engine=vllm``) give a row per prompt length, variant and pass, and the plot
shows their time to first token: a bar per connector (and vLLM without one, and vLLM's own) and pass. A failed
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


def _rows(job: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's rows: one (kvconf's engine), or one per prompt length, variant and pass (vLLM)."""
    if doc.get("engine") != "vllm":
        return [_row(job, doc)]
    from .vllm_figures import table_rows

    return [{"job": job, "connector": doc["connector"], "kv_cache": doc["kv_cache"], "status": "ok", "engine": "vllm",
             **r} for r in table_rows(doc["vllm"], doc["connector"])]


def _failed(job: str, connector: Any, kv_cache: Any, code: Any, message: str) -> dict[str, Any]:
    return {"job": job, "connector": connector or "", "kv_cache": kv_cache or "",
            "status": f"failed (exit {code}): {message}"}


def rows_from_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary's rows from the records the jobs returned (:func:`kvconf.cli.app.execute`), in job
    order: a bench's figures, or why the job failed. Jobs that are not benches have no row."""
    rows = []
    for i, r in enumerate(records):
        if r.get("results"):
            rows.extend(_rows(str(i), r["results"]))
        elif r.get("exit_code"):
            rows.append(_failed(str(i), r.get("connector"), r.get("kv_cache"), r["exit_code"], r.get("message", "")))
    return rows


def rows_from_folders(sweep_dir: Path) -> list[dict[str, Any]]:
    """The summary's rows from the ``results.json`` or ``error.json`` each job left in its folder."""
    rows = []
    for job in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        res, err = job / "results.json", job / "error.json"
        if res.exists():
            rows.extend(_rows(job.name, json.loads(res.read_text())))
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
    from .vllm_figures import SHOWN, TABLE_COLUMNS, format_table

    in_vllm = [r for r in rows if r.get("engine") == "vllm"]
    own = [r for r in rows if r.get("engine") != "vllm"]
    columns = COLUMNS + (["engine", *TABLE_COLUMNS] if in_vllm else [])
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    if own and any(r["status"] == "ok" for r in own):
        shown = ["job", "connector", "kv_cache", "gbps", "raw_gbps", "ratio", "ceiling_save", "ceiling_load",
                 "ceiling_overall", "p50_ms", "p99_ms", "status"]
        for line in format_table(own, shown):
            print(line, file=out)
    if in_vllm:
        print("inside vLLM: time to first token (ms), decode (tokens/s)", file=out)
        for line in format_table(in_vllm, ["job", "connector", *SHOWN]):
            print(line, file=out)
        for r in own:
            if r["status"] != "ok":
                print(f"{r['job']}  {r['connector']}  {r['status']}", file=out)
    if in_vllm:
        _plot_ttft(in_vllm, sweep_dir / "summary.png")
        if any(r["status"] == "ok" for r in own):
            _plot(own, sweep_dir / "summary-kvconf.png")
    else:
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


def _plot_ttft(rows: list[dict[str, Any]], path: Path) -> None:
    """``bench.engine=vllm``: time to first token per pass (groups: prompt length and pass), a bar
    per connector (kvconf's of each job, vLLM without a connector and vLLM's own: their median over
    the jobs that measured them), error bars from the fastest to the slowest repetition's median."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the CSV and the table are still there
        return
    import statistics

    groups = sorted({(r["prompt_tokens"], r["pass"]) for r in rows},
                    key=lambda g: (g[0], ("save", "hit", "miss").index(g[1]) if g[1] in ("save", "hit", "miss") else 9))
    bars: list[str] = []
    for r in rows:  # kvconf's connectors first, in job order, then the baselines
        if r["variant"] not in bars and r["variant"].startswith("kvconf"):
            bars.append(r["variant"])
    bars += sorted({r["variant"] for r in rows} - set(bars), key=lambda v: (v != "no connector", v))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(groups) * max(1, len(bars)) / 2), 4.8))
    width = 0.8 / max(1, len(bars))
    top = 0.0
    for i, variant in enumerate(bars):
        xs, ys, lo, hi = [], [], [], []
        for g, (length, name) in enumerate(groups):
            found = [r for r in rows if r["variant"] == variant and r["prompt_tokens"] == length and r["pass"] == name
                     and r.get("ttft_p50_ms") is not None]
            if not found:
                continue
            y = statistics.median(r["ttft_p50_ms"] for r in found)
            xs.append(g - 0.4 + width * (i + 0.5))
            ys.append(y)
            lo.append(max(0.0, y - min(r.get("ttft_min_ms") or y for r in found)))
            hi.append(max(0.0, max(r.get("ttft_max_ms") or y for r in found) - y))
            top = max(top, y + hi[-1])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=variant)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{name}\n{length} tokens" for length, name in groups], fontsize=8)
    ax.set_ylabel("time to first token, ms (p50; bars: repetitions' spread)")
    ax.set_yscale("log")
    ax.set_title("kvconf bench inside vLLM: save (computed and saved), hit (the same prompts again), "
                 "miss (prompts nothing shares)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

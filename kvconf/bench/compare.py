"""``kvconf bench-compare A B`` (also ``python -m kvconf.bench.compare``): the change of each figure
from A to B, where A and B are two ``results.json`` files or two sweep folders of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """``label -> figures`` from a results.json or a sweep folder of them."""
    files = [path] if path.is_file() else sorted(path.glob("*/results.json"))
    out = {}
    for f in files:
        doc = json.loads(f.read_text())
        out[f"{doc['connector']} {doc['kv_cache']}"] = {**doc["figures"], "raw_gbps": (doc.get("raw") or {}).get("gbps"),
                                                        "ratio": doc.get("ratio")}
    return out


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())

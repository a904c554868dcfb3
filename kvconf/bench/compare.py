"""``kvconf bench-compare A B`` (also ``python -m kvconf.bench.compare``): the change of each figure
from A to B, where A and B are two ``results.json`` files or two sweep folders of them.

A change inside the noise is not a change: the noise of a throughput figure is the spread of its
repetitions (``figures.by_repetition``: (max - min) / median), the larger of A's and B's; the
ratios and latencies take the noise of the throughput they derive from, plus that of what they
divide by; a ``ceiling_ratio`` taken per repetition (each over the limit measured right after it)
has its own spread, which is its noise. Without recorded
repetitions (an older results.json, or one repetition) the noise is :data:`DEFAULT_NOISE`.
A ``bench.engine=vllm`` result gives one job per prompt length, variant (kvconf, no connector, vLLM's
own) and pass, with its time to first token (lower is better), decode throughput and the TTFT
ratio to vLLM without a connector; their noise is the spread of the repetitions' medians.
``--fail-below RATIO`` exits 1 when a throughput figure of B is below RATIO times A's (CI gating:
``--fail-below 0.9`` fails on a 10 % loss).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from kvconf.config.inputs import Refused, read_json

__all__ = ["DEFAULT_NOISE", "GATED", "compare", "main"]

DEFAULT_NOISE = 0.05
"""The noise of a figure whose repetitions were not recorded: 5 %."""

GATED = ("gbps", "save_gbps", "load_gbps", "decode_tps")
"""The figures ``--fail-below`` checks: the connector's own throughput."""

FIGURES = {  # figure -> (the throughput whose spread is its noise, higher is better)
    "gbps": ("gbps", True), "save_gbps": ("save_gbps", True), "load_gbps": ("load_gbps", True),
    "raw_gbps": ("gbps", True), "ratio": ("gbps", True),
    "ceiling_ratio_save": ("save_gbps", True), "ceiling_ratio_load": ("load_gbps", True),
    "ceiling_ratio_overall": ("gbps", True),
    "latency_p50_ms": ("gbps", False), "latency_p99_ms": ("gbps", False),
    # bench.engine=vllm: per prompt length, variant and pass
    "ttft_p50_ms": ("ttft_ms", False), "ttft_vs_no_connector": ("ttft_vs_no_connector", False),
    "decode_tps": ("decode_tps", True),
}

VARIANTS = {"no_connector": "no connector", "connector": "kvconf", "vllm_connector": "vLLM's",
            "prefix_cache": "vLLM prefix cache"}
"""How a ``bench.engine=vllm`` variant is named in a job's label."""


def _vllm_figures(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``label -> figures`` of a ``bench.engine=vllm`` results.json: one per prompt length,
    variant and pass (``offloading llama_100m 4096 tokens kvconf hit``)."""
    out = {}
    for length, per in doc["vllm"]["by_length"].items():
        for variant, passes in per["passes"].items():
            for name, f in passes.items():
                label = f"{doc['connector']} {doc['kv_cache']} {length} tokens {VARIANTS.get(variant, variant)} {name}"
                out[label] = {"ttft_p50_ms": (f.get("ttft_ms") or {}).get("p50"), "decode_tps": f.get("decode_tps"),
                              "load_gbps": f.get("load_gbps"), "ttft_vs_no_connector": f.get("ttft_vs_no_connector"),
                              "_spread": f.get("by_repetition") or {}, "_raw_spread": None, "_limit_spread": {},
                              "_ratio_spread": {}}
    return out


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """``label -> figures`` from a results.json or a sweep folder of them."""
    files = [path] if path.is_file() else sorted(path.glob("*/results.json"))
    out = {}
    for f in files:
        doc = read_json(f)  # kvconf's bounds on what it reads (a results file may come from anyone)
        try:
            out.update(_figures(doc))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # valid JSON, not a results.json
            raise NotResults(f"{f}: not the results.json of a kvconf action=bench job ({_what_is_wrong(doc, exc)}); "
                             "give the results.json a bench job wrote, or the sweep folder that holds them") from None
    return out


class NotResults(Exception):
    """A JSON file that is not the results.json of a kvconf bench job."""


def _what_is_wrong(doc: Any, exc: Exception) -> str:
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} where a results.json has one"
    if isinstance(exc, ValueError):
        return str(exc)
    return f"a value of the wrong kind: {exc}"


def _figures(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``label -> figures`` of one results.json; ValueError where a figure is not a number."""
    if doc.get("engine") == "vllm":
        out = _vllm_figures(doc)
    else:
        fig = doc["figures"]
        flat = {k: fig.get(k) for k in ("gbps", "save_gbps", "load_gbps")}
        flat.update({"raw_gbps": (doc.get("raw") or {}).get("gbps"), "ratio": doc.get("ratio"),
                     "latency_p50_ms": (fig.get("latency_ms") or {}).get("p50"),
                     "latency_p99_ms": (fig.get("latency_ms") or {}).get("p99"),
                     "_spread": fig.get("by_repetition") or {},
                     "_raw_spread": ((doc.get("raw") or {}).get("by_repetition") or {}).get("gbps"),
                     "_limit_spread": ((doc.get("ceilings") or {}).get("by_repetition") or {}),
                     "_ratio_spread": ((doc.get("ceiling_ratio") or {}).get("by_repetition") or {})})
        for side, v in (doc.get("ceiling_ratio") or {}).items():
            if side not in ("against", "by_repetition"):
                flat[f"ceiling_ratio_{side}"] = v
        out = {f"{doc['connector']} {doc['kv_cache']}": flat}
    for label, flat in out.items():
        for figure, v in flat.items():
            for leaf in (_leaves(v) if figure.startswith("_") else [v]):
                if leaf is not None and (isinstance(leaf, bool) or not isinstance(leaf, (int, float))):
                    where = "its repetitions hold" if figure.startswith("_") else f"{figure} is"
                    raise ValueError(f"{label}: {where} {json.dumps(leaf)[:60]}, not a number")
    return out


def _leaves(v: Any) -> list[Any]:
    """The values inside lists and objects (a figure's repetitions), or ``v`` itself."""
    if isinstance(v, dict):
        return [x for item in v.values() for x in _leaves(item)]
    if isinstance(v, list):
        return [x for item in v for x in _leaves(item)]
    return [v]


def _noise(values: Optional[list[float]]) -> Optional[float]:
    """(max - min) / median of a figure's repetitions; None without two of them."""
    if not values or len(values) < 2:
        return None
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else None


def _limit_noise(a: dict[str, Any], b: dict[str, Any], figure: str) -> float:
    """The noise of what a derived figure divides by: the raw path's repetitions, or the ceiling's
    (a disk's write and read); :data:`DEFAULT_NOISE` where they were not recorded."""
    if figure in ("raw_gbps", "ratio"):
        found = [n for n in (_noise(a["_raw_spread"]), _noise(b["_raw_spread"])) if n is not None]
    else:
        keys = {"ceiling_ratio_save": ["file_write_gbps"], "ceiling_ratio_load": ["file_read_cold_gbps"],
                "ceiling_ratio_overall": ["file_write_gbps", "file_read_cold_gbps"]}[figure]
        found = [n for side in (a, b) for k in keys for n in [_noise(side["_limit_spread"].get(k))] if n is not None]
        if not found and not any(side["_limit_spread"] for side in (a, b)):
            return 0.0 if figure != "raw_gbps" else DEFAULT_NOISE  # memcpy and TCP: steady (median of 5)
    return max(found) if found else DEFAULT_NOISE


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per figure that both A and B measured, with its change, its noise and a verdict."""
    rows = []
    for label in sorted(set(a) & set(b)):
        for figure, (basis, higher) in FIGURES.items():
            va, vb = a[label].get(figure), b[label].get(figure)
            if va is None or vb is None:
                continue
            spreads = [n for n in (_noise(a[label]["_spread"].get(basis)), _noise(b[label]["_spread"].get(basis)))
                       if n is not None]
            noise = max(spreads) if spreads else DEFAULT_NOISE
            side = figure.removeprefix("ceiling_ratio_")
            paired = [n for n in (_noise(a[label]["_ratio_spread"].get(side)), _noise(b[label]["_ratio_spread"].get(side)))
                      if n is not None] if figure.startswith("ceiling_ratio_") else []
            if paired:  # each repetition over its own limit: the ratios' spread is the noise
                noise = max(paired)
            elif figure in ("raw_gbps", "ratio") or figure.startswith("ceiling_ratio"):
                noise = _limit_noise(a[label], b[label], figure) + (0.0 if figure == "raw_gbps" else noise)
            change = (vb - va) / va if va else None
            if change is None or abs(change) <= noise:
                verdict = "no change"
            else:
                verdict = "better" if (change > 0) == higher else "worse"
            rows.append({"job": label, "figure": figure, "a": va, "b": vb,
                         "change_pct": None if change is None else round(change * 100, 1),
                         "noise_pct": round(noise * 100, 1), "verdict": verdict,
                         "b_over_a": round(vb / va, 3) if va else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``kvconf bench-compare A B``: the change of each figure from A to B."""
    p = argparse.ArgumentParser(prog="kvconf bench-compare",
                                description="Compare two results.json files, or two sweep folders of them: each "
                                            "figure's change, and whether it is outside the repetitions' spread.")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--fail-below", type=float, metavar="RATIO", default=None,
                   help=f"exit 1 when a throughput figure ({', '.join(GATED)}) of B is below RATIO times A's")
    args = p.parse_args(argv)
    for x in (args.a, args.b):
        if not x.exists():
            p.error(f"{x}: no such file or folder")
    if args.fail_below is not None and not args.fail_below > 0:
        p.error(f"--fail-below {args.fail_below}: give a ratio above 0, e.g. 0.9 (fail on a 10 % loss)")
    try:
        a, b = _load(args.a), _load(args.b)
    except (Refused, NotResults) as exc:
        p.error(str(exc))
    rows = compare(a, b)
    failed = [r for r in rows if args.fail_below is not None and r["figure"] in GATED
              and r["b_over_a"] is not None and r["b_over_a"] < args.fail_below]
    jobs = sorted({r["job"] for r in rows})
    verdicts = {j: [r for r in rows if r["job"] == j and r["verdict"] != "no change"] for j in jobs}
    if args.format == "json":
        print(json.dumps({"rows": rows, "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a)),
                          "changed": {j: [r["figure"] for r in v] for j, v in verdicts.items()},
                          "failed_below": [f"{r['job']} {r['figure']}" for r in failed]}))
    else:
        print(f"{'job':<28} {'figure':<22} {'A':>10}    {'B':<10} {'change':>8} {'noise':>7}  verdict")
        for r in rows:
            pct = "" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
            print(f"{r['job']:<28} {r['figure']:<22} {r['a']:>10} -> {r['b']:<10} {pct:>8} "
                  f"{'±' + format(r['noise_pct'], '.1f') + '%':>7}  {r['verdict']}")
        for label in sorted(set(a) ^ set(b)):
            print(f"{label:<28} only in {'A' if label in a else 'B'}")
        for j in jobs:
            changed = verdicts[j]
            print(f"{j}: " + ("no change (every figure within the repetitions' spread)" if not changed else
                              "; ".join(f"{r['figure']} {r['verdict']} ({r['change_pct']:+.1f}%)" for r in changed)))
        for r in failed:
            print(f"kvconf bench-compare: {r['job']} {r['figure']} is {r['b_over_a']}x of A, below "
                  f"--fail-below {args.fail_below}", file=sys.stderr)
    if failed:
        return 1
    return 0 if rows or not (a or b) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The figures of ``bench.engine=vllm`` (:mod:`kvconf.bench.in_vllm`) from its engines' outputs:
per variant (no connector, kvconf's connector, vLLM's own connector, vLLM's prefix cache) and pass, over the repetitions; and the
rows of its tables (the CLI's, the sweep summary's). Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

__all__ = ["PASSES", "SHOWN", "TABLE_COLUMNS", "VARIANTS", "format_table", "load_limits", "summarize_runs", "table_rows"]

PASSES = ("save", "hit", "miss")
"""The passes of every workload, in order."""

VARIANTS = ("no_connector", "connector", "vllm_connector", "prefix_cache")
"""The engines of a repetition: vLLM without a connector (recompute), kvconf's connector, vLLM's
own connector for the job, vLLM with its own prefix cache (save and hit in one engine)."""


# ---- figures ---------------------------------------------------------------------------------------
def _median(values: list[float], nd: int = 3) -> Optional[float]:
    return round(statistics.median(values), nd) if values else None


def _pct(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile.

    >>> _pct([1.0, 2.0, 3.0, 4.0], 0.9)
    4.0
    """
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def summarize_runs(reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per variant and pass, over the repetitions (``reps[i][variant][pass]`` = that engine pass's
    output): TTFT (ms) p50/p90 and each repetition's median, decode tokens/s, cached tokens,
    transfers; the tokens compared with ``no_connector``'s, and each variant's ratios to it and
    to ``vllm_connector`` (per repetition, then the median).

    >>> rq = lambda t, d, tok: {"ttft": t, "decode_tps": d, "tokens": tok, "cached": 0}
    >>> reps = [{"no_connector": {"hit": {"requests": [rq(2.0, 10.0, [1])], "transfers": {}}},
    ...          "connector": {"hit": {"requests": [rq(0.2, 10.0, [1])], "transfers": {}}}}]
    >>> s = summarize_runs(reps)
    >>> s["connector"]["hit"]["ttft_ms"]["p50"], s["connector"]["hit"]["ttft_vs_no_connector"]
    (200.0, 0.1)
    >>> s["connector"]["hit"]["tokens_identical"]
    1.0

    Tokens that part from the recomputed ones as vLLM's own prefix cache's do:

    >>> reps[0]["connector"]["hit"]["requests"][0]["tokens"] = [2]
    >>> reps[0]["prefix_cache"] = {"hit": {"requests": [rq(0.1, 10.0, [2])], "transfers": {}}}
    >>> s = summarize_runs(reps)["connector"]["hit"]
    >>> s["tokens_identical"], s["tokens_as_prefix_cache"], s["ttft_vs_prefix_cache"]
    (0.0, 1.0, 2.0)
    """
    out: dict[str, Any] = {}
    variants = [v for v in VARIANTS if any(v in r for r in reps)]
    for v in variants:
        out[v] = {}
        for p in PASSES:
            runs = [r[v][p] for r in reps if p in r.get(v, {})]
            if not runs:
                continue
            ttft = [q["ttft"] * 1000 for run in runs for q in run["requests"]]
            dec = [q["decode_tps"] for run in runs for q in run["requests"] if q.get("decode_tps")]
            fig: dict[str, Any] = {
                "requests": len(ttft),
                "ttft_ms": {"p50": _median(ttft, 1), "p90": round(_pct(ttft, 0.9) or 0, 1)},
                "decode_tps": _median(dec, 2),
                "cached_tokens": _median([q["cached"] for run in runs for q in run["requests"]], 1),
                "by_repetition": {"ttft_ms": [_median([q["ttft"] * 1000 for q in run["requests"]], 1) for run in runs],
                                  "decode_tps": [_median([q["decode_tps"] for q in run["requests"]
                                                          if q.get("decode_tps")], 2) for run in runs]},
            }
            loads = [run["transfers"] for run in runs if run.get("transfers", {}).get("loaded_bytes")]
            if loads:
                rates = [t["loaded_bytes"] / t["load_seconds"] / 1e9 for t in loads if t.get("load_seconds")]
                fig["loaded_bytes"] = int(statistics.median([t["loaded_bytes"] for t in loads]))
                fig["load_gbps"] = _median(rates)
                fig["by_repetition"]["load_gbps"] = [round(x, 3) for x in rates]
            for side in ("load", "save"):  # how long the engine waited for the tier, per request
                held = [run["transfers"][f"{side}_wait_seconds"] * 1000 / max(1, len(run["requests"]))
                        for run in runs if run.get("transfers", {}).get(f"{side}ed_bytes" if side == "load" else "saved_bytes")]
                if held:
                    fig[f"{side}_wait_ms"] = _median(held, 2)
            saves = [run["transfers"] for run in runs if run.get("transfers", {}).get("saved_bytes")]
            if saves:
                fig["saved_bytes"] = int(statistics.median([t["saved_bytes"] for t in saves]))
            for other, key in (("no_connector", "tokens_identical"), ("prefix_cache", "tokens_as_prefix_cache")):
                same, compared = 0, 0
                for r in reps:
                    base = r.get(other, {}).get(p)
                    mine = r.get(v, {}).get(p)
                    if base and mine:
                        for a, b in zip(base["requests"], mine["requests"]):
                            compared += 1
                            same += a["tokens"] == b["tokens"]
                if compared and v != other:
                    fig[key] = round(same / compared, 3)
            for other in ("no_connector", "vllm_connector", "prefix_cache"):
                if other == v:
                    continue
                for field, name in (("ttft", "ttft"), ("decode_tps", "decode")):
                    ratios = []
                    for r in reps:
                        a, b = r.get(v, {}).get(p), r.get(other, {}).get(p)
                        if not (a and b):
                            continue
                        xa = _median([q[field] or 0 for q in a["requests"]], 6)
                        xb = _median([q[field] or 0 for q in b["requests"]], 6)
                        if xa and xb:
                            ratios.append(xa / xb)
                    if ratios:
                        fig[f"{name}_vs_{other}"] = _median(ratios)
                        fig["by_repetition"][f"{name}_vs_{other}"] = [round(x, 3) for x in ratios]
            out[v][p] = fig
    return out


def load_limits(reps: list[dict[str, Any]], kind: Optional[str]) -> Optional[dict[str, Any]]:
    """The connector's hit-pass loads beside the limit measured in the same engine, per repetition."""
    if kind is None:
        return None
    key = "memcpy_gbps" if kind == "memcpy" else "file_read_cold_gbps"
    ratios, limits = [], []
    for r in reps:
        t = r.get("connector", {}).get("hit", {}).get("transfers", {})
        lim = r.get("_limits", {}).get(key)
        if t.get("loaded_bytes") and t.get("load_seconds") and lim:
            limits.append(lim)
            ratios.append(t["loaded_bytes"] / t["load_seconds"] / 1e9 / lim)
    if not ratios:
        return None
    return {"against": "memcpy" if kind == "memcpy" else "raw file read, cold", "limit_gbps": _median(limits),
            "load_ratio": _median(ratios), "by_repetition": {"limit_gbps": limits,
                                                             "load_ratio": [round(x, 3) for x in ratios]}}


TABLE_COLUMNS = ["prompt_tokens", "variant", "pass", "ttft_p50_ms", "ttft_p90_ms", "decode_tps", "cached_tokens",
                 "tokens_identical", "tokens_as_prefix_cache", "ttft_vs_no_connector", "ttft_vs_vllm_connector",
                 "ttft_vs_prefix_cache", "decode_vs_no_connector", "load_gbps", "ttft_min_ms", "ttft_max_ms"]
"""The columns of one row of a ``bench.engine=vllm`` table (the CLI's, the sweep summary's)."""


def table_rows(vllm: dict[str, Any], connector: str) -> list[dict[str, Any]]:
    """One row per prompt length, variant and pass of a ``bench.engine=vllm`` result.

    >>> f = {"requests": 1, "ttft_ms": {"p50": 9.0, "p90": 9.0}, "decode_tps": 5.0, "cached_tokens": 0,
    ...      "by_repetition": {"ttft_ms": [8.0, 9.0, 10.0]}}
    >>> doc = {"vllm_connector": None, "by_length": {"64": {"prompt_tokens": 64, "passes": {"connector": {"hit": f}}}}}
    >>> r = table_rows(doc, "offloading")[0]
    >>> r["variant"], r["pass"], r["ttft_p50_ms"], r["ttft_min_ms"], r["ttft_max_ms"]
    ('kvconf offloading', 'hit', 9.0, 8.0, 10.0)
    """
    names = {"no_connector": "no connector", "connector": f"kvconf {connector}",
             "vllm_connector": f"vLLM {vllm.get('vllm_connector') or 'connector'}",
             "prefix_cache": "vLLM prefix cache"}
    rows = []
    for per in vllm["by_length"].values():
        for variant in VARIANTS:
            for name in PASSES:
                f = per["passes"].get(variant, {}).get(name)
                if not f:
                    continue
                reps = [x for x in (f.get("by_repetition") or {}).get("ttft_ms", []) if x is not None]
                rows.append({"prompt_tokens": per["prompt_tokens"], "variant": names[variant], "pass": name,
                             "ttft_p50_ms": f["ttft_ms"].get("p50"), "ttft_p90_ms": f["ttft_ms"].get("p90"),
                             "decode_tps": f.get("decode_tps"), "cached_tokens": f.get("cached_tokens"),
                             "tokens_identical": f.get("tokens_identical"),
                             "tokens_as_prefix_cache": f.get("tokens_as_prefix_cache"),
                             "ttft_vs_no_connector": f.get("ttft_vs_no_connector"),
                             "ttft_vs_vllm_connector": f.get("ttft_vs_vllm_connector"),
                             "ttft_vs_prefix_cache": f.get("ttft_vs_prefix_cache"),
                             "decode_vs_no_connector": f.get("decode_vs_no_connector"),
                             "load_gbps": f.get("load_gbps"), "ttft_min_ms": min(reps) if reps else None,
                             "ttft_max_ms": max(reps) if reps else None})
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """Rows as aligned text lines (a header first); empty cells for what was not measured."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    return ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()] + [
        "  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip() for x in cells]


SHOWN = ["prompt_tokens", "variant", "pass", "ttft_p50_ms", "ttft_p90_ms", "decode_tps", "cached_tokens",
         "tokens_identical", "tokens_as_prefix_cache", "ttft_vs_no_connector", "ttft_vs_vllm_connector", "load_gbps"]
"""The columns the terminal shows."""

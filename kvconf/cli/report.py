"""The text report of a job, for people (``output=json`` prints the same data as one object)."""

from __future__ import annotations

from typing import Any

from kvconf.units import format_bytes

__all__ = ["render_text"]


def render_text(r: dict[str, Any]) -> str:
    c, plan = r["connector"], r["plan"]
    groups = ", ".join(f"{g['type']} x{g['num_layers']} layers, {format_bytes(g['page_size_bytes'])} pages"
                       for g in plan["groups"])
    lines = [
        f"kvconf: {c['name']} connector ({c['module']}.{c['class']}), role={r['role']}, "
        f"kv_role={r['kv_role']}, device={r['device']}, action={r['action']}",
        f"  contract   {r['contract']}: {c['class']}(config, role, kv_cache_config)",
        f"  plan       {plan['num_blocks']} blocks x {format_bytes(plan['bytes_per_block'])} = "
        f"{format_bytes(plan['total_bytes'])} ({groups})",
    ]
    if plan.get("capacity_bytes") is not None:
        short = plan["total_bytes"] > plan["capacity_bytes"]
        lines.append(f"  capacity   {format_bytes(plan['capacity_bytes'])} free on {r['device']}"
                     + (" (less than the plan: a run here would fail; device=auto checks the config only)"
                        if short else ""))
    if plan.get("max_concurrency") is not None:
        lines.append(f"  requests   {plan['max_concurrency']}x of max_model_len={plan['max_model_len']} tokens fit at once")
    elif plan.get("capacity_bytes") is None and plan.get("allocates") and r["action"] in ("check", "run", "serve"):
        lines.append(f"  capacity   unknown on {r['device']} (no NVML here to read free GPU memory)")
    if r["action"] in ("run", "bench") and (r.get("bench") or {}).get("engine") != "vllm":
        lines.append(f"  allocated  {format_bytes(r['allocated_bytes'])} on {r['device']}"
                     + ("" if r["role"] == "worker" else " (the scheduler side never allocates KV memory)"))
    st = r.get("self_test")
    if st:
        if st.get("scheduler_only"):
            lines.append(f"  self-test  scheduler side: {st['requests']} requests planned, metadata built")
        else:
            extra = f", transport {st['transport']}" if st.get("transport") else ""
            lines.append(f"  self-test  {'verified' if st['verified'] else 'FAILED'}: {format_bytes(st['bytes'])} "
                         f"moved in {st['seconds']:.3f} s ({st['gbps']} GB/s), {st['requests']} requests"
                         + (f", {st['hits']} block hits" if "hits" in st else "") + extra)
        for ch in st.get("children", ()):
            lines.append(f"    child {ch['index']} {ch['name']}: {'verified' if ch['verified'] else 'FAILED'}, "
                         f"{format_bytes(ch['bytes'])} in {ch['seconds']:.3f} s"
                         + (f", transport {ch['transport']}" if ch.get("transport") else ""))
    b = r.get("bench")
    if b and b.get("engine") == "vllm":
        lines.extend(_vllm_lines(r, b))
    elif b:
        f = b["figures"]
        lat = f["latency_ms"]
        sides = ", ".join(f"{side} {f[side + '_gbps']}" for side in ("save", "load") if f.get(side + "_gbps"))
        lines.append(f"  bench      {format_bytes(f['bytes'])} verified in {f['repetitions']} repetitions: "
                     + (f"{f['gbps']} GB/s" if f.get("gbps") else "not timed") + (f" ({sides})" if sides else "")
                     + ("; per request " + ", ".join(f"{q} {lat[q]} ms" for q in ("p50", "p90", "p99"))
                        if lat.get("p50") is not None else ""))
        if b.get("raw"):
            lines.append(f"  raw path   {b['raw']['gbps']} GB/s ({b['raw']['path']})"
                         + (f"; ratio {b['ratio']}" if b.get("ratio") is not None else ""))
        if b.get("ceilings"):
            c = b["ceilings"]
            named = (("memcpy", "memcpy_gbps"), ("loopback TCP", "loopback_tcp_gbps"), ("file write+fsync", "file_write_gbps"),
                     ("file read cold", "file_read_cold_gbps"), ("warm", "file_read_warm_gbps"))
            lines.append("  ceilings   " + ", ".join(f"{n} {c[k]} GB/s" for n, k in named if c.get(k) is not None))
        cr = b.get("ceiling_ratio")
        if cr:
            parts = [f"{side} {cr[side]}" for side in ("save", "load", "overall") if cr.get(side) is not None]
            lines.append(f"  of limit   {', '.join(parts)} (of {cr['against']})")
        if b.get("store", {}).get("private"):
            lines.append(f"  store      a private one, removed afterwards ({b['store']['path']})")
        if r.get("results_file"):
            lines.append(f"  results    {r['results_file']}")
    if r.get("listeners"):
        lines.append("  listening  " + "; ".join(
            f"{x['address']} {x['what']} ({'authenticated' if x['authenticated'] else 'not authenticated'}"
            + ("" if x["loopback"] else ", beyond loopback") + ")" for x in r["listeners"]))
    if r.get("user_modules"):
        lines.append(f"  user code  imported (ran): {', '.join(r['user_modules'])}")
    lines.append("  timings    " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in r["timings"].items()))
    return "\n".join(lines)


def _vllm_lines(r: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``bench.engine=vllm``: what ran, the table (ms, tokens/s) and the loads against their limit."""
    from kvconf.bench.vllm_figures import SHOWN, format_table, table_rows

    lines = [f"  bench      inside vLLM: {b['model']}, {b['requests']} requests a pass x {b['repetitions']} "
             f"repetition(s), {b['output_tokens']} tokens generated each; TTFT in ms, decode in tokens/s"]
    if b.get("vllm_connector_skipped"):
        lines.append(f"  vLLM's own  not run: {b['vllm_connector_skipped']}")
    lines.extend("    " + ln for ln in format_table(table_rows(b, r["connector"]["name"]), SHOWN))
    for length, per in b["by_length"].items():
        lim = per.get("loads_vs_limit")
        if lim:
            lines.append(f"  loads      {length} tokens: {lim['load_ratio']} of {lim['against']} "
                         f"({lim['limit_gbps']} GB/s, measured in the same engine)")
    if r.get("results_file"):
        lines.append(f"  results    {r['results_file']}")
    return lines

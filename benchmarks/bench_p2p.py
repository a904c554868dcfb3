"""The peer-to-peer connectors against their bare engines, same blocks, same two processes.

    .venv/bin/python benchmarks/bench_p2p.py [--connectors nixl,mooncake] [--kv-caches tiny,llama3_8b]
                                             [--reps 5]

For each connector and KV-cache layout, runs ``python -m kvconf connector=C kv_cache=K role=worker
action=bench`` (a producer peer process, this side the consumer) and reads its JSON:
- connector: the connector's real path, as inside vLLM: the producer's simulated prefill holds
  each request's blocks and answers vLLM's ``kv_transfer_params``; the consumer's scheduler side
  reads those params (``get_num_new_matched_tokens``, ``update_state_after_alloc``), its worker
  side reads the named blocks straight from the producer's memory (``start_load_kv``), releases
  them, and reports them (``get_finished``); timed from ``start_load_kv`` to the last report, every
  byte verified after each repetition;
- bare: the engine alone (a NIXL READ, Mooncake's ``batch_transfer_sync_read``) moving the same
  blocks, planned outside the timing, timed around the engine calls alone.
Prints per pair the median GB/s of each and the median of the per-repetition ratios (repetition i
of the connector against repetition i of the bare engine); asserts nothing. Goal: >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(connector: str, kv_cache: str, reps: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kvconf", f"connector={connector}", f"kv_cache={kv_cache}",
                           "role=worker", "action=bench", f"bench.repetitions={reps}", "output=json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{connector} at {kv_cache} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)["bench"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connectors", default="nixl,mooncake")
    p.add_argument("--kv-caches", default="tiny,llama3_8b")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    print(f"{'connector':>10} {'kv_cache':>10} {'connector GB/s':>15} {'bare GB/s':>10} {'ratio':>6}"
          f"   (medians of {args.reps} paired repetitions; ratio: per repetition)")
    for kv_cache in args.kv_caches.split(","):
        for connector in args.connectors.split(","):
            b = bench(connector, kv_cache, args.reps)
            mine, bare = b["figures"]["by_repetition"]["gbps"], b["raw"]["by_repetition"]["gbps"]
            ratios = [m / r for m, r in zip(mine, bare) if r]
            print(f"{connector:>10} {kv_cache:>10} {statistics.median(mine):>15.2f} {statistics.median(bare):>10.2f} "
                  f"{statistics.median(ratios):>6.2f}   ratios {min(ratios):.2f}-{max(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()

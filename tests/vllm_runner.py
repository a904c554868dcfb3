"""Runs the real vLLM once, in one process (vLLM's one-process mode, a capped KV cache, float32,
greedy), and prints what it generated as one JSON line: for each batch of prompts (token ids),
each prompt's generated token ids, ``num_cached_tokens`` and finish reason. A batch is one
``LLM.generate`` call; batches run in order in the same engine.

    python vllm_runner.py SPEC.json [--multiprocess]

SPEC: ``model`` (folder), ``batches`` (list of lists of token-id lists), and optionally
``kv_transfer_config`` (vLLM's dict), ``num_gpu_blocks`` (default 64), ``max_tokens`` (8),
``block_size`` (32), ``max_model_len`` (1024), ``enable_prefix_caching`` (true). Where the engine
cannot start (a config error), prints ``{"error": ...}`` and exits 3.
"""

from __future__ import annotations

import json
import os
import sys

ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
       "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""Set (where not set already) before vLLM is imported."""


def main() -> None:
    # Set here, not at import: pytest imports this file for its doctests, and the environment it
    # would change is what every later test's processes inherit.
    multiprocess = "--multiprocess" in sys.argv  # vLLM's default layout: caller, engine core, worker
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams

    try:
        layout = {} if multiprocess else {"distributed_executor_backend": "uni"}
        llm = LLM(model=spec["model"], dtype="float32", block_size=spec.get("block_size", 32),
                  max_model_len=spec.get("max_model_len", 1024), **layout,
                  num_gpu_blocks_override=spec.get("num_gpu_blocks", 64),
                  kv_transfer_config=spec.get("kv_transfer_config"), seed=0, enforce_eager=True,
                  compilation_config={"mode": 0}, enable_prefix_caching=spec.get("enable_prefix_caching", True),
                  max_num_batched_tokens=spec.get("max_num_batched_tokens"))
    except Exception as exc:  # what vLLM stops with, for the test to read
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(3)
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8))
    out = []
    for batch in spec["batches"]:
        results = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        out.append([{"tokens": list(r.outputs[0].token_ids), "cached": r.num_cached_tokens,
                     "finish": r.outputs[0].finish_reason} for r in results])
    print(json.dumps({"batches": out}), flush=True)


if __name__ == "__main__":
    main()

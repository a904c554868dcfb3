"""One side of prefill/decode between two real vLLM processes (vLLM's one-process mode, a capped KV
cache, float32, greedy), as a proxy drives them: prints what happened as one JSON line.

    python vllm_pd.py prefill SPEC.json
    python vllm_pd.py decode SPEC.json

SPEC: ``model``, ``prompts`` (token-id lists), ``kv_transfer_config`` (vLLM's dict), and
optionally ``num_gpu_blocks`` (64), ``max_tokens`` (8), ``block_size`` (32), ``max_model_len``
(1024).

prefill: starts its engine, waits for SPEC's ``go_file`` where one is named, generates 1 token
per prompt with ``kv_transfer_params={"do_remote_decode": true}``, writes the params each output
carries to SPEC's ``params_file`` (a JSON list, written whole), then keeps stepping the engine (as
``vllm serve`` does while blocks are held) until vLLM's free block count is back where it was
before the prompts, or ``hold_seconds`` pass. Prints the params, the free block counts
(``free_before``, ``free_held``, ``free_end``), ``freed`` (each change of the free count after the
params were written: ``[seconds, free]``) and ``freed_after`` (seconds until every block was back,
or null).

decode: starts its engine, creates SPEC's ``ready_file``, waits for SPEC's ``params_file`` (the
proxy's answer; up to ``wait_seconds``, 120), then generates ``max_tokens`` per prompt, each with
the params at the same index of that list (a prompt given null runs as a plain request). Prints
each prompt's tokens and ``num_cached_tokens``, and the seconds the generation took.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def engine(spec: dict) -> object:
    from vllm import LLM

    return LLM(model=spec["model"], dtype="float32", block_size=spec.get("block_size", 32),
               max_model_len=spec.get("max_model_len", 1024), distributed_executor_backend="uni",
               num_gpu_blocks_override=spec.get("num_gpu_blocks", 64), kv_transfer_config=spec["kv_transfer_config"],
               seed=0, enforce_eager=True, compilation_config={"mode": 0}, enable_prefix_caching=True)


def wait_for(path: str | None, spec: dict) -> None:
    """Until ``path`` exists (None: at once), at most ``wait_seconds`` (120)."""
    deadline = time.monotonic() + spec.get("wait_seconds", 120)
    while path is not None and not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def free_blocks(llm: object) -> int:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler  # type: ignore[attr-defined]
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def prefill(spec: dict) -> dict:
    from vllm import SamplingParams

    llm = engine(spec)
    wait_for(spec.get("go_file"), spec)
    before = free_blocks(llm)
    params = SamplingParams(temperature=0, max_tokens=1, extra_args={"kv_transfer_params": {"do_remote_decode": True}})
    results = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    out = [r.kv_transfer_params for r in results]
    held = free_blocks(llm)
    tmp = spec["params_file"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, spec["params_file"])
    written = time.monotonic()
    deadline = written + spec.get("hold_seconds", 60)
    freed: list[list[float]] = []
    last = held
    while time.monotonic() < deadline and last != before:
        llm.llm_engine.step()
        now = free_blocks(llm)
        if now != last:
            freed.append([round(time.monotonic() - written, 3), now])
            last = now
        time.sleep(0.01)
    return {"params": out, "first_tokens": [list(r.outputs[0].token_ids) for r in results], "free_before": before,
            "free_held": held, "free_end": last, "freed": freed,
            "freed_after": freed[-1][0] if freed and last == before else None}


def decode(spec: dict) -> dict:
    from vllm import SamplingParams

    llm = engine(spec)
    with open(spec["ready_file"], "w"):
        pass
    wait_for(spec["params_file"], spec)
    given = json.loads(open(spec["params_file"]).read())
    sampling = [SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8),
                               extra_args={"kv_transfer_params": p} if p else None) for p in given]
    started = time.monotonic()
    results = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sampling, use_tqdm=False)
    return {"tokens": [list(r.outputs[0].token_ids) for r in results], "seconds": round(time.monotonic() - started, 3),
            "free_end": free_blocks(llm)}


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for key, value in {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)
    side, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    try:
        out = prefill(spec) if side == "prefill" else decode(spec)
    except Exception as exc:  # what vLLM stops with, for the test to read
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

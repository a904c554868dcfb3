"""One vLLM engine of ``action=bench bench.engine=vllm``, in a process of its own (a fresh engine):
``python -m kvconf.bench.vllm_engine SPEC.json OUT.json``; or ``python -m kvconf.bench.vllm_engine
--serve``, which imports vLLM once and forks such a process for each request on its input
(:func:`serve`; :class:`Engines` starts and asks it): importing vLLM takes about 10 of the 15-25
seconds an engine of the bench takes here, and each engine is still a new process with a new engine.

SPEC: ``model`` (folder), ``dtype``, ``block_size``, ``num_gpu_blocks``, ``max_model_len``,
``max_num_batched_tokens``, ``output_tokens``, ``warmup`` (unmeasured requests first),
``kv_transfer_config`` (vLLM's dict, or null: no connector), ``prefix_caching`` (vLLM's own prefix
cache on; off where not given), ``passes`` (``name`` and ``prompts``,
lists of token ids), and optionally ``memcpy_bytes`` and ``cold_read`` (``folder``, ``bytes``):
the machine's limits measured in this process after the passes. vLLM runs in its one-process
mode with prefix caching off (unless ``prefix_caching``), so that what a request does not compute
comes from the connector alone. Each request runs alone (one ``add_request``, engine steps until it ends): its time to
first token is from ``add_request`` to the step that returns its first token; its decode
throughput is its further tokens over the time from that step to its last.

OUT gets, per pass and request: ``ttft``, ``decode_tps``, ``tokens``, ``cached`` (vLLM's
``num_cached_tokens``); per pass, the kvconf connector's transfer totals over the pass
(``loaded_bytes``, ``load_seconds``, ``saved_bytes``, ``save_seconds``) where it keeps them; and
the limits. Where the engine does not start, OUT holds ``error``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from kvconf.runtime.forkserver import ForkClient

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""The engine's environment: one process, one compute thread (the second core is the connector's
I/O thread's, as a GPU host's CPU is), no network."""


def _totals() -> dict[str, float]:
    """The kvconf connector's transfer totals in this process (its worker side), or {}."""
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    except ImportError:
        return {}
    if not has_kv_transfer_group():
        return {}
    hook = getattr(get_kv_transfer_group(), "transfer_totals", None)
    return dict(hook()) if callable(hook) else {}


def _run_one(engine: Any, rid: str, prompt: list[int], params: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    first = end = None
    out: Any = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id != rid:
                continue
            if first is None and o.outputs and len(o.outputs[0].token_ids) >= 1:
                first = time.perf_counter()
            if o.finished:
                end, out = time.perf_counter(), o
    assert out is not None and first is not None and end is not None
    tokens = list(out.outputs[0].token_ids)
    decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else None
    return {"ttft": round(first - t0, 6), "decode_tps": round(decode, 3) if decode else None, "tokens": tokens,
            "cached": out.num_cached_tokens}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0), 6) for k, v in after.items()}


def _limits(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.get("memcpy_bytes"):
        from kvconf.bench.raw import MEMCPY_MIN_BYTES, memcpy_gbps

        n = max(int(spec["memcpy_bytes"]), MEMCPY_MIN_BYTES)
        out["memcpy_gbps"], out["memcpy_bytes"] = memcpy_gbps(n), n
    if spec.get("cold_read"):
        out.update(cold_read(spec["cold_read"]["folder"], int(spec["cold_read"]["bytes"])))
    return out


def cold_read(folder: str, nbytes: int, reps: int = 3) -> dict[str, Any]:
    """One raw file of ``nbytes`` written (fsync) in ``folder`` and read back after
    ``posix_fadvise(DONTNEED)``: the device's read speed, the median of ``reps``."""
    import statistics

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".kvconf-cold-{os.getpid()}.bin")
    data = os.urandom(min(nbytes, 1 << 20)) * max(1, nbytes // (1 << 20))
    into = bytearray(len(data))
    rates = []
    try:
        for _ in range(reps):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                got = os.preadv(fd, [into], 0)
                rates.append(got / (time.perf_counter() - t0) / 1e9)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"file_read_cold_gbps": round(statistics.median(rates), 3), "file_read_bytes": len(data),
            "by_repetition": {"file_read_cold_gbps": [round(r, 3) for r in rates]}}


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    # the KV budget of the blocks asked for (GiB, at least 1): without it vLLM's CPU backend reserves
    # a share of the machine's memory and refuses to start when other processes hold more
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, -(-int(spec.get("kv_bytes", 0)) // (1 << 30)))))
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(model=spec["model"], dtype=spec.get("dtype", "bfloat16"), block_size=spec["block_size"],
                  max_model_len=spec["max_model_len"], distributed_executor_backend="uni",
                  num_gpu_blocks_override=spec["num_gpu_blocks"], kv_transfer_config=spec.get("kv_transfer_config"),
                  seed=0, enforce_eager=True, compilation_config={"mode": 0}, skip_tokenizer_init=True,
                  enable_prefix_caching=bool(spec.get("prefix_caching")),
                  max_num_batched_tokens=spec["max_num_batched_tokens"])
    except Exception as exc:  # what vLLM stops with, for the caller to report
        with open(out_path, "w") as f:
            json.dump({"error": f"{type(exc).__name__}: {exc}"}, f)
        return 3
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=spec["output_tokens"], ignore_eos=True)
    for i, prompt in enumerate(spec.get("warmup_prompts", [])):
        _run_one(engine, f"warmup-{i}", prompt, params)
    passes = []
    for p in spec["passes"]:
        before = _totals()
        requests = [_run_one(engine, f"{p['name']}-{i}", prompt, params) for i, prompt in enumerate(p["prompts"])]
        passes.append({"name": p["name"], "requests": requests, "transfers": _delta(_totals(), before)})
    out = {"passes": passes, "limits": _limits(spec)}
    try:
        engine.engine_core.shutdown()  # the connector's shutdown: its writes end before the process does
    except Exception as exc:
        out["shutdown_error"] = f"{type(exc).__name__}: {exc}"
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


def _forked(req: dict[str, Any]) -> int:
    os.chdir(os.path.dirname(os.path.abspath(req["spec"])))
    return main(req["spec"], req["out"])


def serve() -> None:
    """Imports vLLM once (with :data:`ENV`), then forks a child running :func:`main` for each
    request on stdin (``spec``, ``out``, and ``stdout`` = ``stderr`` = the engine's log), one engine at a
    time (:func:`kvconf.runtime.forkserver.serve`). Ends with its parent or at the end of its input."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    from kvconf.runtime.process import die_with_parent

    die_with_parent()
    import vllm  # noqa: F401  (the import the children share)
    from vllm import LLM, SamplingParams  # noqa: F401

    from kvconf.runtime.forkserver import serve as serve_forks

    serve_forks(_forked)


class Engines:
    """Starts the bench's engines: each a new process with a new engine, forked by one
    ``python -m kvconf.bench.vllm_engine --serve`` that imported vLLM once (about 10 seconds an
    engine saved here); where that process cannot start or dies, each engine is a process of its
    own from nothing (``python -m kvconf.bench.vllm_engine SPEC OUT``). A context manager: the
    server ends with it (and with this process, were it killed)."""

    START_SECONDS = 300.0
    """How long the server may take to import vLLM before the first engine is forked."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.server: Optional[ForkClient] = None
        self.broken = False

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _server(self) -> Optional[ForkClient]:
        if self.server is None and not self.broken:
            from kvconf.runtime.process import PARENT_ENV

            self.work.mkdir(parents=True, exist_ok=True)
            with open(self.work / "engine-server.log", "w") as err:
                self.server = ForkClient([sys.executable, "-m", "kvconf.bench.vllm_engine", "--serve"],
                                         env={**os.environ, PARENT_ENV: str(os.getpid())}, cwd=str(self.work),
                                         stderr=err)
        return self.server

    def run(self, spec_file: Path, out_file: Path, log: Path, timeout: float) -> int:
        """Runs one engine; its exit code. Past ``timeout`` it is stopped with what it started
        (:class:`subprocess.TimeoutExpired`)."""
        server = self._server()
        if server is not None and server.alive():
            pid = server.start({"spec": str(spec_file), "out": str(out_file), "stdout": str(log), "stderr": str(log)},
                               self.START_SECONDS)
            if pid is not None:
                code = server.end(timeout)
                if code is None:
                    server.kill(pid)
                    server.end(30)
                    raise subprocess.TimeoutExpired(["vllm_engine", str(spec_file)], timeout)
                return code
            self.broken = True  # the server did not start: each engine from nothing from here on
            self.close()
        with open(log, "w") as f:
            return subprocess.run([sys.executable, "-m", "kvconf.bench.vllm_engine", str(spec_file), str(out_file)],
                                  stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=spec_file.parent).returncode

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit(0)
    code = main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # vLLM's and the connectors' threads do not hold the process

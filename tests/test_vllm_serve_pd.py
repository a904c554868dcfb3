"""Two real ``vllm serve`` processes (0.32, the CPU build, vLLM's default process layout: API
server, engine core, worker) as prefill and decode instances over the mooncake connector, each
started with kvconf's exported JSON, and ``python -m kvconf action=proxy`` in front of them: a
client's completions, streamed or whole, come back with the tokens one vLLM without a connector
generates; a prompt altered in its middle, sent to the decode with the prefill's params for the
original, continues the original (the KV cache came from the prefill); a prefill killed between
the two steps costs the decode a recompute within its handshake timeout, and the proxy one 502
naming it, at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from vllm_support import PD_EVERY, PD_PROMPTS, altered, export, needs_vllm, shared_model, shared_reference

from conftest import kvconf_env

pytestmark = [needs_vllm, pytest.mark.vllm]

PROMPTS = PD_PROMPTS[:3]
ALTERED = altered(PROMPTS[1])
ORPHAN = PD_PROMPTS[3]
"""Prefilled, then its prefill is killed before the decode reads it."""
VLLM_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode()
    if text.startswith("data:"):  # a stream: its events, [DONE] left out
        return status, [json.loads(ln[5:]) for ln in text.splitlines() if ln.startswith("data:") and "[DONE]" not in ln]
    return status, json.loads(text)


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"exited {proc.returncode}: ...{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{url} not up: ...{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[tuple[int, ...], list[int]]:
    return shared_reference(tmp_path_factory, model, PD_EVERY)


def test_vllm_serve_prefill_and_decode_behind_kvconfs_proxy(model, reference, tmp_path):
    assert reference[tuple(ALTERED)] != reference[tuple(PROMPTS[1])]
    key = "serve-pd-" + uuid.uuid4().hex
    configs = {
        "prefill": export("connector=mooncake", "connector.kv_role=kv_producer", cwd=tmp_path),
        "decode": export("connector=mooncake", "connector.kv_role=kv_consumer",
                         "connector.kv_load_failure_policy=recompute", "connector.extra.handshake_timeout=5",
                         "connector.extra.transfer_timeout=10", cwd=tmp_path),
    }
    ports = {side: free_port() for side in configs}
    procs: dict[str, subprocess.Popen] = {}
    logs = {side: tmp_path / f"{side}.log" for side in (*configs, "proxy")}
    try:
        for side, cfg in configs.items():
            with open(logs[side], "w") as out:
                procs[side] = subprocess.Popen(
                    [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                     "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(ports[side]),
                     "--dtype", "float32", "--block-size", "32", "--max-model-len", "1024",
                     "--num-gpu-blocks-override", "64", "--enforce-eager", "--seed", "0",
                     "--kv-transfer-config", json.dumps(cfg)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=kvconf_env(KVCONF_AUTH_KEY=key, **VLLM_ENV),
                    start_new_session=True)  # its engine core and worker in its process group
        with open(logs["proxy"], "w") as out:
            procs["proxy"] = subprocess.Popen(
                [sys.executable, "-m", "kvconf", "action=proxy", "proxy.port=0", "proxy.timeout=120",
                 f"proxy.prefill=[http://127.0.0.1:{ports['prefill']}]",
                 f"proxy.decode=[http://127.0.0.1:{ports['decode']}]"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=kvconf_env())
        for side in configs:
            wait_up(f"http://127.0.0.1:{ports[side]}", procs[side], logs[side])
        found = None
        for _ in range(100):
            found = re.search(r"proxy on (http://127\.0\.0\.1:\d+)", logs["proxy"].read_text())
            if found:
                break
            time.sleep(0.1)
        assert found, logs["proxy"].read_text()
        proxy = found.group(1)
        ask = {"model": "tiny", "temperature": 0, "max_tokens": 8, "return_token_ids": True}

        # through the proxy, whole and streamed: the tokens of one vLLM without a connector
        for p in PROMPTS:
            status, answer = post(proxy + "/v1/completions", {**ask, "prompt": p})
            assert status == 200, answer
            assert answer["choices"][0]["token_ids"] == reference[tuple(p)]
        status, events = post(proxy + "/v1/completions", {**ask, "prompt": PROMPTS[2], "stream": True})
        # server-sent events (a list); how many depends on how fast the client reads (vLLM merges
        # the tokens it made meanwhile into one event)
        assert status == 200 and isinstance(events, list) and events, events
        assert [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])] == reference[tuple(PROMPTS[2])]

        # as the proxy does, by hand: the decode, given the original's params with an altered
        # prompt, continues the original: its KV cache came from the prefill
        status, first = post(f"http://127.0.0.1:{ports['prefill']}/v1/completions",
                             {**ask, "prompt": PROMPTS[1], "max_tokens": 1,
                              "kv_transfer_params": {"do_remote_decode": True}})
        assert status == 200 and first["kv_transfer_params"]["remote_block_ids"], first
        status, answer = post(f"http://127.0.0.1:{ports['decode']}/v1/completions",
                              {**ask, "prompt": ALTERED, "kv_transfer_params": first["kv_transfer_params"]})
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == reference[tuple(PROMPTS[1])]
        assert "nothing was read" not in logs["decode"].read_text()

        # the prefill killed (its three processes) between the two steps: the decode recomputes,
        # at once, from the prompt's own tokens (nothing read), and goes on serving
        status, first = post(f"http://127.0.0.1:{ports['prefill']}/v1/completions",
                             {**ask, "prompt": ORPHAN, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        assert status == 200 and first["kv_transfer_params"]["remote_block_ids"], first
        os.killpg(procs["prefill"].pid, signal.SIGKILL)
        procs["prefill"].wait(timeout=60)
        started = time.monotonic()
        status, answer = post(f"http://127.0.0.1:{ports['decode']}/v1/completions",
                              {**ask, "prompt": altered(ORPHAN), "kv_transfer_params": first["kv_transfer_params"]})
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == reference[tuple(altered(ORPHAN))]
        assert time.monotonic() - started < 10  # handshake_timeout 5 s, not transfer_timeout's 10
        assert "nothing was read, it is recomputed" in logs["decode"].read_text()

        # the prefill gone: one clear 502 naming it, at once
        started = time.monotonic()
        status, answer = post(proxy + "/v1/completions", {**ask, "prompt": PROMPTS[0]})
        assert status == 502, answer
        assert f"the prefill instance http://127.0.0.1:{ports['prefill']} could not be reached" in \
            answer["error"]["message"]
        assert time.monotonic() - started < 10
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for side, proc in procs.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if side != "proxy":
                with contextlib.suppress(ProcessLookupError):  # what the server left of its group
                    os.killpg(proc.pid, signal.SIGKILL)
    assert procs["proxy"].returncode == 0, logs["proxy"].read_text()
    assert procs["decode"].returncode == 0, logs["decode"].read_text()[-3000:]
    assert "1 failed" in logs["proxy"].read_text()

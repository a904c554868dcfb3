"""Prefill/decode between two real vLLM processes (0.32, the CPU build) through kvconf's plug-in,
over the Mooncake Transfer Engine and NIXL, with vLLM's ``kv_transfer_params`` protocol: the
prefill process keeps a finished request's blocks and answers params naming them, the test passes
them on as a proxy does, and the decode process reads the blocks straight from the prefill's memory.

The proof of a read is vLLM's own output: a decode prompt whose middle differs from the prefill's
(same length, same last token) generates the prefill prompt's tokens, which only its KV cache can
give; every other prompt generates exactly what vLLM with no connector generates."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
from vllm_support import BLOCK, PD_EVERY, PD_PROMPTS, altered, export, needs_vllm, shared_model, shared_reference, start_script

from conftest import kvconf_env

pytestmark = [needs_vllm, pytest.mark.vllm]

PROMPTS = PD_PROMPTS
ALTERED = altered(PROMPTS[1])
"""The decode sends it with PROMPTS[1]'s params: read, it continues PROMPTS[1]."""
UNREAD = [altered(PROMPTS[3]), altered(PROMPTS[4])]
"""The decode sends them with PROMPTS[3]'s and PROMPTS[4]'s params, made unreadable: they continue
themselves (computed from their own tokens, nothing read)."""
LEASE = 6.0
"""connector.extra.lease_seconds of the prefill: blocks no decode released are free after it."""


def blocks(p: list[int]) -> int:
    return -(-len(p) // BLOCK)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[tuple[int, ...], list[int]]:
    return shared_reference(tmp_path_factory, model, PD_EVERY)


class Side:
    """One side's process: its exit code, what it printed (``log``) and its JSON line (``out``)."""

    def __init__(self, proc: Any, log: Path) -> None:
        self.code = proc.returncode
        self.log = log.read_text()
        lines = [ln for ln in self.log.splitlines() if ln.startswith("{")]
        self.out: dict[str, Any] = json.loads(lines[-1]) if lines else {}

    def __repr__(self) -> str:
        return f"Side(code={self.code}, log=...{self.log[-4000:]})"


def wait_file(path: Path, proc: Any, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} first: ...{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear: ...{log.read_text()[-4000:]}"
        time.sleep(0.1)


def prefill_decode(tmp: Path, model: Path, connector: str, decode_prompts: list[list[int]],
                   edit: Callable[[list[dict[str, Any]]], list[Optional[dict[str, Any]]]] = lambda p: list(p),
                   decode_key: Optional[str] = None) -> tuple[Side, Side]:
    """Starts both processes, lets the prefill compute PROMPTS once the decode is up, hands the
    params (through ``edit``, as a proxy would, or a faulty one) to the decode, and waits for
    both. ``decode_key``: the decode's shared secret, where it is not the prefill's."""
    key = "pd-test-" + uuid.uuid4().hex
    producer = export(f"connector={connector}", "connector.kv_role=kv_producer",
                      f"connector.extra.lease_seconds={LEASE:g}", cwd=tmp)
    consumer = export(f"connector={connector}", "connector.kv_role=kv_consumer",
                      "connector.kv_load_failure_policy=recompute", "connector.extra.handshake_timeout=5",
                      "connector.extra.transfer_timeout=10", cwd=tmp)
    common = {"model": str(model), "wait_seconds": 240}
    (tmp / "prefill.json").write_text(json.dumps({
        **common, "prompts": PROMPTS, "kv_transfer_config": producer, "go_file": str(tmp / "go"),
        "params_file": str(tmp / "prefill-params.json"), "hold_seconds": LEASE + 20}))
    (tmp / "decode.json").write_text(json.dumps({
        **common, "prompts": decode_prompts, "kv_transfer_config": consumer, "ready_file": str(tmp / "ready"),
        "params_file": str(tmp / "decode-params.json")}))
    procs: dict[str, Any] = {}
    try:
        for side, secret in (("prefill", key), ("decode", decode_key or key)):  # each forked from a zygote
            procs[side] = start_script("vllm_pd", [side, str(tmp / f"{side}.json")], kvconf_env(KVCONF_AUTH_KEY=secret),
                                       tmp, tmp / f"{side}.log")
        wait_file(tmp / "ready", procs["decode"], tmp / "decode.log")
        (tmp / "go").touch()
        wait_file(tmp / "prefill-params.json", procs["prefill"], tmp / "prefill.log")
        params = json.loads((tmp / "prefill-params.json").read_text())
        (tmp / "decode-params.json").write_text(json.dumps(edit(params)))
        for proc in procs.values():
            proc.wait(timeout=LEASE + 120)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Side(procs["prefill"], tmp / "prefill.log"), Side(procs["decode"], tmp / "decode.log")


def tokens_of(reference: dict[tuple[int, ...], list[int]], prompts: list[list[int]]) -> list[list[int]]:
    return [reference[tuple(p)] for p in prompts]


@pytest.mark.parametrize("connector", ["mooncake", "nixl"])
def test_the_decode_reads_the_prefills_blocks_and_bad_params_are_recomputed(connector, model, reference, tmp_path):
    """Three prompts read with the params the prefill answered (one of them altered in its
    middle: it generates the original's tokens, which only the read KV cache gives); two altered
    ones sent with params made unreadable, one naming another engine, one block ids the prefill
    does not have: both recomputed from their own tokens (nothing read), the reason logged; the
    prefill frees what was read at once, the rest when the lease ends."""
    for a, p in ((ALTERED, PROMPTS[1]), (UNREAD[0], PROMPTS[3]), (UNREAD[1], PROMPTS[4])):
        assert reference[tuple(a)] != reference[tuple(p)], "an altered prompt that proves nothing"

    def faulty(params: list[dict[str, Any]]) -> list[Optional[dict[str, Any]]]:
        params[3] = {**params[3], "remote_engine_id": "an-engine-that-is-gone"}
        params[4] = {**params[4], "remote_block_ids": [[1000 + i for i in range(blocks(PROMPTS[4]))]]}
        return list(params)

    decode_prompts = [PROMPTS[0], ALTERED, PROMPTS[2], *UNREAD]
    prefill, decode = prefill_decode(tmp_path, model, connector, decode_prompts, faulty)
    assert prefill.code == 0 and decode.code == 0, (prefill, decode)
    params = prefill.out["params"]
    assert [p["remote_block_ids"] and len(p["remote_block_ids"][0]) for p in params] == [blocks(p) for p in PROMPTS]
    assert all(p["do_remote_prefill"] and p["remote_host"] == "127.0.0.1" for p in params)
    assert decode.out["tokens"] == tokens_of(reference, PROMPTS[:3] + UNREAD)
    recomputed = [ln for ln in decode.log.splitlines() if "nothing was read, it is recomputed" in ln]
    assert len(recomputed) == 2, decode.log[-4000:]
    assert any("an-engine-that-is-gone" in ln for ln in recomputed)
    assert any("out of range" in ln for ln in recomputed)
    # the prefill: every prompt's blocks held after its answer; the read ones back before the
    # lease (the decode released them), the other two only when their lease expired
    assert prefill.out["free_before"] - prefill.out["free_held"] == sum(blocks(p) for p in PROMPTS)
    unread = blocks(PROMPTS[3]) + blocks(PROMPTS[4])
    assert any(t < LEASE and free == prefill.out["free_before"] - unread for t, free in prefill.out["freed"]), prefill
    assert prefill.out["freed_after"] is not None and prefill.out["freed_after"] >= LEASE - 1, prefill.out["freed"]
    assert prefill.out["free_end"] == prefill.out["free_before"]
    assert prefill.log.count("expired after") == 2, prefill.log[-4000:]


def test_a_decode_holding_another_key_recomputes_at_once_and_the_prefill_frees_at_the_lease(model, reference,
                                                                                             tmp_path):
    """The decode holds another shared secret than the prefill (nixl here; mooncake's refusal is
    the same side channel's): every request is recomputed within the handshake timeout from its
    own tokens (the altered one continues itself: nothing read), tokens identical to vLLM's with no
    connector, exit 0; the prefill refuses the peer and frees every block when the lease ends. (A
    prefill killed between the two steps: tests/test_vllm_serve_pd.py.)"""
    decode_prompts = [PROMPTS[0], ALTERED, *PROMPTS[2:]]
    prefill, decode = prefill_decode(tmp_path, model, "nixl", decode_prompts,
                                     decode_key="another-" + uuid.uuid4().hex)
    assert decode.code == 0, decode
    assert decode.out["tokens"] == tokens_of(reference, decode_prompts)
    assert decode.log.count("nothing was read, it is recomputed") == len(PROMPTS), decode.log[-4000:]
    assert decode.out["seconds"] < 10, decode.out  # handshake_timeout 5 s, not a hang
    assert prefill.code == 0, prefill
    assert "authentication failed" in prefill.log
    assert prefill.log.count("expired after") == len(PROMPTS)
    assert prefill.out["freed_after"] is not None and prefill.out["freed_after"] >= LEASE - 1, prefill.out
    assert prefill.out["free_end"] == prefill.out["free_before"]

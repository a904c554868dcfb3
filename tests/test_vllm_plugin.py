"""kvconf's connectors inside the real vLLM (0.32, the CPU build), through the plug-in
(``kvconf.vllm``): each run is a fresh vLLM process on a tiny random model, and the proof is
vLLM's own output, greedy tokens identical to a run with no connector and ``num_cached_tokens``
showing what was loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_support import BLOCK, export, needs_vllm, prompt, run_vllm, shared_model

from conftest import kvconf_env

pytestmark = [needs_vllm, pytest.mark.vllm]

SAVED = [prompt(1, 40), prompt(2, 64), prompt(3, 100), prompt(4, 31), prompt(5, 32), prompt(6, 63), prompt(7, 96)]
"""Prompts a first process saves: below, at and just past block boundaries."""
EXTENDED = [SAVED[1] + [5], SAVED[2] + prompt(9, 150), SAVED[0] + [7], SAVED[4] + [11], SAVED[6] + [3],
            SAVED[5] + prompt(10, 70)]
"""Prompts that extend a saved one by one token (as a decode instance sees them) or by many."""
LOADED = SAVED + EXTENDED
FRESH = [prompt(40, 50), prompt(41, 90)]
"""Prompts nothing stored shares a block with."""
FIRST = [prompt(20, 100), prompt(21, 100), prompt(22, 100)]
SECOND = [prompt(30, 100), prompt(31, 100), prompt(32, 100), prompt(33, 100)]
"""With 16 blocks of 32 tokens, the second batch evicts the first from vLLM's own KV cache."""
SMALL = {"num_gpu_blocks": 16, "max_model_len": 256}


def expected_cached(q: list[int], stored: list[list[int]]) -> int:
    """Tokens a tier holding the full blocks of ``stored`` gives ``q``: the blocks of the longest
    prefix ``q`` shares with one of them, short of ``q``'s last token (vLLM computes it)."""
    best = 0
    for s in stored:
        common = next((i for i, (a, b) in enumerate(zip(q, s)) if a != b), min(len(q), len(s)))
        best = max(best, min(common, len(s)) // BLOCK)
    return min(best, (len(q) - 1) // BLOCK) * BLOCK


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(model, tmp_path_factory) -> dict[tuple[int, ...], list[int]]:
    """Every prompt's greedy tokens from vLLM with no connector (one batch: the outputs of this
    model do not depend on the batch around a prompt, nor on vLLM's prefix cache)."""
    every = LOADED + FRESH + FIRST + SECOND
    run = run_vllm(tmp_path_factory.mktemp("reference"), model, [every], enable_prefix_caching=False)
    assert run.code == 0, run
    return {tuple(p): t for p, t in zip(every, run.tokens())}


def tokens_of(reference: dict[tuple[int, ...], list[int]], prompts: list[list[int]]) -> list[list[int]]:
    return [reference[tuple(p)] for p in prompts]


def test_shared_storage_saves_then_a_fresh_vllm_loads_every_stored_prefix_with_identical_tokens(
        model, reference, tmp_path):
    """The acceptance's first line, with prompts that extend saved ones at every block boundary."""
    config = export("connector=shared_storage", f"connector.extra.shared_storage_path={tmp_path / 'kv'}",
                    "connector.kv_load_failure_policy=recompute", cwd=tmp_path)
    assert config["kv_connector_module_path"] == "kvconf.vllm"
    # the first process computes each prompt in steps of 64 tokens (chunked prefill): a block is
    # saved only once a step has computed it
    first = run_vllm(tmp_path / "first", model, [SAVED], config, max_num_batched_tokens=64)
    assert first.code == 0, first
    assert first.tokens() == tokens_of(reference, SAVED)
    assert first.cached() == [0] * len(SAVED)
    assert "vLLM's KV-cache plan equals kvconf's for the same model and budget (num_blocks=64" in first.log
    assert list((tmp_path / "kv").rglob("*.kvseg")), "nothing was saved"

    second = run_vllm(tmp_path / "second", model, [LOADED], config)
    assert second.code == 0, second
    assert second.tokens() == tokens_of(reference, LOADED)
    assert second.cached() == [expected_cached(q, SAVED) for q in LOADED]
    assert sum(second.cached()) > 0
    assert "refused" not in second.log


def test_the_plugin_works_across_vllms_processes_scheduler_in_the_engine_core_worker_apart(model, reference, tmp_path):
    """vLLM's default layout: the scheduler side in the engine-core process, the worker side in a
    worker process; what the worker saved reaches the scheduler's index through vLLM's worker
    metadata, and a fresh process loads it."""
    config = export("connector=shared_storage", f"connector.extra.shared_storage_path={tmp_path / 'kv'}",
                    cwd=tmp_path)
    first = run_vllm(tmp_path / "first", model, [SAVED], config, multiprocess=True)
    assert first.code == 0, first
    assert first.tokens() == tokens_of(reference, SAVED)
    assert "(EngineCore" in first.log and "(Worker" in first.log  # the layout really was three processes
    second = run_vllm(tmp_path / "second", model, [LOADED], config, multiprocess=True)
    assert second.code == 0, second
    assert second.tokens() == tokens_of(reference, LOADED)
    assert second.cached() == [expected_cached(q, SAVED) for q in LOADED]


def test_a_store_of_random_bytes_is_refused_recomputed_or_failed_by_policy_never_decoded(model, reference, tmp_path):
    store = tmp_path / "kv"
    recompute = export("connector=shared_storage", f"connector.extra.shared_storage_path={store}",
                       "connector.kv_load_failure_policy=recompute", cwd=tmp_path)
    assert run_vllm(tmp_path / "save", model, [SAVED], recompute).code == 0
    files = list(store.rglob("*.kvseg"))
    assert files
    for f in files:  # every byte replaced, the length kept
        f.write_bytes(os.urandom(f.stat().st_size))

    again = run_vllm(tmp_path / "recompute", model, [LOADED], recompute)
    assert again.code == 0, again
    assert again.tokens() == tokens_of(reference, LOADED)
    assert "kvconf: shared_storage refused" in again.log and "not a kvconf segment" in again.log
    assert "refused_blocks=" in again.log  # the connector's totals at shutdown

    for f in store.rglob("*.kvseg"):  # recomputing saved sound copies of some: corrupt them all again
        f.write_bytes(os.urandom(f.stat().st_size))
    # Each prompt here finds its prefix in the corrupt store. (A prompt computed beside them would
    # save its blocks anew, atomically, and a later step could then load a sound copy.)
    hit = [q for q in LOADED if expected_cached(q, SAVED)]
    fail = export("connector=shared_storage", f"connector.extra.shared_storage_path={store}",
                  "connector.kv_load_failure_policy=fail", cwd=tmp_path)
    failed = run_vllm(tmp_path / "fail", model, [hit, FRESH], fail)
    assert failed.code == 0, failed
    for q, r in zip(hit, failed.batches[0]):  # the request fails with the reason logged, no token
        assert (r["finish"], r["tokens"]) == ("error", []), (len(q), r)
    assert "Failing" in failed.log and "due to KV load failure" in failed.log
    assert failed.tokens(1) == tokens_of(reference, FRESH)  # the engine goes on serving
    assert "kvconf: shared_storage refused" in failed.log


@pytest.fixture(scope="session")
def evicted(model, tmp_path_factory):
    """vLLM alone on the evicting batches: what its own prefix cache still gives the first batch."""
    plain = run_vllm(tmp_path_factory.mktemp("plain"), model, [FIRST, SECOND, FIRST], **SMALL)
    assert plain.code == 0, plain
    assert max(plain.cached(2)) < 96, "vLLM's own cache still held the first batch: nothing to prove"
    return plain


COMPOSED = {"kv_connector": "KVConfConnector", "kv_connector_module_path": "kvconf.vllm", "kv_role": "kv_both",
            "kv_connector_extra_config": {"kvconf_overrides": ["connector=offloading",
                                                               "connector.extra.cpu_bytes_to_use=16MiB"]}}
"""The offloading connector composed by the plug-in from overrides, as python -m kvconf composes it."""


@pytest.mark.parametrize("connector", ["example", "offloading-composed"])
def test_a_host_tier_brings_back_prefixes_that_vllm_evicted(connector, model, reference, evicted, tmp_path):
    """offloading composed by the plug-in from overrides (its exported JSON runs in the multi test
    below), example from ``action=export``'s JSON."""
    if connector == "offloading-composed":
        config = COMPOSED
    else:
        config = export(f"connector={connector}", "connector.extra.capacity=16MiB", cwd=tmp_path)
    tier = run_vllm(tmp_path / "tier", model, [FIRST, SECOND, FIRST], config, **SMALL)
    assert tier.code == 0, tier
    for b, batch in enumerate([FIRST, SECOND, FIRST]):
        assert tier.tokens(b) == tokens_of(reference, batch)
    assert tier.cached(2) == [96] * len(FIRST) and evicted.cached(2) != tier.cached(2)  # from the host tier


def test_multi_hits_from_either_child_with_identical_tokens(model, reference, tmp_path):
    store = tmp_path / "kv"
    config = export("connector=multi", "connector.extra.connectors=[{name: offloading, kv_role: kv_both, extra: "
                    "{cpu_bytes_to_use: 16MiB}}, {name: shared_storage, kv_role: kv_both, extra: "
                    f"{{shared_storage_path: '{store}'}}}}]", cwd=tmp_path)
    first = run_vllm(tmp_path / "first", model, [FIRST, SECOND, FIRST], config, **SMALL)
    assert first.code == 0, first
    for b, batch in enumerate([FIRST, SECOND, FIRST]):
        assert first.tokens(b) == tokens_of(reference, batch)
    assert first.cached(2) == [96] * len(FIRST)  # from the host tier (offloading, the first child)
    second = run_vllm(tmp_path / "second", model, [FIRST], config, **SMALL)  # a fresh process: host tier empty
    assert second.code == 0, second
    assert second.tokens() == tokens_of(reference, FIRST)
    assert second.cached() == [96] * len(FIRST)  # from the disk (shared_storage, the second child)


LEGACY = '''
from kvconf import KVConnectorBase


class LegacyConnector(KVConnectorBase):
    def __init__(self, config, role):
        super().__init__(config, role, None)
'''


def test_a_legacy_connector_in_the_tree_stops_vllm_with_kvconf_message_before_any_kv_cache(model, tmp_path):
    (tmp_path / "legacy_mod.py").write_text(LEGACY)
    tree = {"name": "LegacyConnector", "module_path": "legacy_mod", "kv_role": "kv_both"}
    config = {"kv_connector": "KVConfConnector", "kv_connector_module_path": "kvconf.vllm", "kv_role": "kv_both",
              "kv_connector_extra_config": {"kvconf_connector": tree}}
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), kvconf_env()["PYTHONPATH"]])}
    run = run_vllm(tmp_path / "vllm", model, [[prompt(1, 40)]], config, env=env)
    assert run.code == 3 and run.error is not None, run
    assert "kvconf: contract error" in run.error and "legacy 2-argument constructor" in run.error
    assert "fix: accept kv_cache_config as the third argument" in run.error
    assert "Loading weights" not in run.log and "KV cache size" not in run.log  # stopped at config validation

    check = subprocess.run([sys.executable, "-m", "kvconf", "connector.module_path=legacy_mod",
                            "connector.name=LegacyConnector", "connector.kv_role=kv_both", "action=check"],
                           capture_output=True, text=True, cwd=tmp_path, env=kvconf_env(**env), timeout=60)
    assert check.returncode == 2 and "legacy 2-argument constructor" in check.stderr


def test_a_misspelt_setting_composed_by_the_plugin_stops_vllm_with_kvconf_message(model, tmp_path):
    config = {"kv_connector": "KVConfConnector", "kv_connector_module_path": "kvconf.vllm", "kv_role": "kv_both",
              "kv_connector_extra_config": {"kvconf_overrides": ["connector=offloading",
                                                                 "connector.extra.cpu_bytes_to_uze=1GiB"]}}
    run = run_vllm(tmp_path / "vllm", model, [[prompt(1, 40)]], config)
    assert run.code == 3 and run.error is not None, run
    assert "kvconf: config error" in run.error and "connector.extra.cpu_bytes_to_uze" in run.error
    assert "did you mean: cpu_bytes_to_use?" in run.error
    assert "Loading weights" not in run.log

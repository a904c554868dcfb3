"""The offload tiers: offloading (host memory, LRU) and shared_storage (segment files on disk)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import json_out, run_kvconf
from kvconf.config.layout import KVCacheLayout
from kvconf.config.models import ConnectorConfig
from kvconf.contract.api import KVCacheBlocks, KVConnectorRole, Request, SchedulerOutput
from kvconf_connectors.offloading import LRUIndex, OffloadingConnector
from kvconf_connectors.shared_storage import SharedStorageConnector

pytestmark = pytest.mark.torch

KEYS = ("bytes", "verified", "seconds", "gbps", "hits")


def segments(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kvseg"))


# ---- CLI, as users run it --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["offloading", "shared_storage"])
def test_tier_connectors_run_verified_round_trips(workdir, tmp_path, name):
    extra = [f"connector.extra.shared_storage_path={tmp_path / 'kv'}"] if name == "shared_storage" else []
    proc = run_kvconf(f"connector={name}", "role=worker", "output=json", *extra, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    st = json_out(proc)["self_test"]
    assert all(k in st for k in KEYS)
    assert st["verified"] is True and st["hits"] > 0 and st["bytes"] > 0 and st["gbps"] > 0


def test_shared_prefixes_are_saved_once_and_hit_by_later_requests(workdir):
    proc = run_kvconf("connector=offloading", "output=json", cwd=workdir)
    st = json_out(proc)["self_test"]
    per, shared, n = st["blocks_per_request"], st["shared_prefix_blocks"], st["requests"]
    # in the save pass every request after the first finds the shared prefix in the tier
    assert st["prefix_hits"] == (n - 1) * shared
    block_bytes = (st["loaded_bytes"] + st["prefix_bytes"]) // (st["hits"] + st["prefix_hits"])
    assert st["saved_bytes"] == (n * per - (n - 1) * shared) * block_bytes  # shared blocks saved once
    assert st["hits"] == n * per and st["misses"] == 0


def test_a_second_process_loads_what_the_first_saved(workdir, tmp_path):
    store = f"connector.extra.shared_storage_path={tmp_path / 'kv'}"
    first = json_out(run_kvconf("connector=shared_storage", store, "output=json", cwd=workdir))["self_test"]
    assert first["preexisting_hits"] == 0
    second = json_out(run_kvconf("connector=shared_storage", store, "output=json", cwd=workdir))["self_test"]
    assert second["preexisting_hits"] == second["requests"] * second["blocks_per_request"] > 0
    assert second["verified"] and second["saved_bytes"] == 0


def flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(data)


def test_flipped_byte_fails_by_policy_naming_the_file(workdir, tmp_path):
    store = f"connector.extra.shared_storage_path={tmp_path / 'kv'}"
    assert run_kvconf("connector=shared_storage", store, cwd=workdir).returncode == 0
    victim = segments(tmp_path / "kv")[0]
    flip_a_data_byte(victim)
    failed = run_kvconf("connector=shared_storage", store, "connector.kv_load_failure_policy=fail", cwd=workdir)
    assert failed.returncode == 1
    assert str(victim) in failed.stderr and "checksum mismatch" in failed.stderr
    ok = run_kvconf("connector=shared_storage", store, "connector.kv_load_failure_policy=recompute",
                    "output=json", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    st = json_out(ok)["self_test"]
    assert st["recomputed_blocks"] > 0 and any(str(victim) in why for why in st["recomputed"].values())
    assert st["verified"] is True


# ---- the tier classes, driven as an engine drives them ---------------------------------------------


def make(cls, role, tmp_path: Path | None = None, num_blocks: int = 32, **extra):
    cfg = KVCacheLayout(num_layers=2, block_size=4, dtype="float16", num_blocks=num_blocks, groups=[
        {"type": "full_attention", "num_kv_heads": 1, "head_size": 64}]).to_config()
    if cls is SharedStorageConnector:
        extra.setdefault("shared_storage_path", str(tmp_path))
    else:
        extra.setdefault("cpu_bytes_to_use", "1MiB")
    conn_cfg = ConnectorConfig(name="t", kv_role="kv_both", engine_id="e", extra=extra)
    return cls(conn_cfg, role, cfg), cfg


class Engine:
    """A scheduler-side and a worker-side connector over one small KV cache."""

    def __init__(self, cls, tmp_path=None, policy="fail", **extra) -> None:
        from kvconf.runtime.allocate import allocate, layer_views
        from kvconf.runtime.views import byte_views

        self.sched, cfg = make(cls, KVConnectorRole.SCHEDULER, tmp_path, **extra)
        self.worker, _ = make(cls, KVConnectorRole.WORKER, tmp_path, **extra)
        self.buffers = allocate(cfg, "cpu")
        self.caches = layer_views(cfg, self.buffers)
        self.worker.register_kv_caches(self.caches)
        self.views = byte_views(self.caches)

    def step(self, rid: str, tokens: list[int], ids: list[int], fill: int | list[int] | None = None,
             layer_by_layer: bool = False) -> tuple[int, dict]:
        """One request's step: its loads (waited for layer by layer, as vLLM's forward pass does,
        where asked), then its new blocks filled (``fill``: one value, or one per block) and saved."""
        req = Request(rid, tokens)
        n, _ = self.sched.get_num_new_matched_tokens(req, 0)
        self.sched.update_state_after_alloc(req, KVCacheBlocks((ids,)), n)
        meta = self.sched.build_connector_meta(SchedulerOutput([rid]))
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        if layer_by_layer:
            for name in self.caches:
                self.worker.wait_for_layer_load(name)
        errors = self.worker.get_load_error_reasons()
        if fill is not None:
            for v in self.views.values():
                for i, b in enumerate(ids[n // 4:], start=n // 4):
                    v[b].fill_(fill[i] if isinstance(fill, list) else fill)
            for name, t in self.caches.items():
                self.worker.save_kv_layer(name, t, None)
        self.worker.wait_for_save()
        sending, _ = self.worker.get_finished({rid})
        self.sched.update_connector_output(sending or set(), set())
        self.worker.clear_connector_metadata()
        return n, errors

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()


def prompt(seed: int, blocks: int) -> list[int]:
    return [seed * 1000 + i for i in range(blocks * 4 + 1)]


def test_lru_index_evicts_the_least_recently_used_first():
    idx = LRUIndex(3)
    for k in (b"a", b"b", b"c"):
        idx.reserve(k, set())
        idx.commit(k)
    idx.touch(b"a")
    assert idx.reserve(b"d", set()) is not None and not idx.has(b"b")
    idx.commit(b"d")
    assert idx.order() == [b"c", b"a", b"d"]
    assert idx.reserve(b"e", {b"c"}) is not None and not idx.has(b"a") and idx.has(b"c")


def test_offloading_tier_full_evicts_oldest_prompt_and_keeps_recent_ones():
    # a page is 1 head x 4 tokens x (64 + 64) x 2 B = 1 KiB; 2 layers: 2 KiB a block; 8 KiB = 4 slots
    eng = Engine(OffloadingConnector, cpu_bytes_to_use="8KiB")
    try:
        assert eng.step("a", prompt(1, 2), [0, 1], fill=1)[0] == 0
        assert eng.step("b", prompt(2, 2), [2, 3], fill=2)[0] == 0
        assert eng.step("a2", prompt(1, 2), [4, 5])[0] == 8  # touches a: b is now the oldest
        assert eng.step("c", prompt(3, 2), [6, 7], fill=3)[0] == 0  # full: evicts b, not a
        assert eng.sched.get_num_new_matched_tokens(Request("x", prompt(1, 2)), 0)[0] == 8
        assert eng.sched.get_num_new_matched_tokens(Request("y", prompt(2, 2)), 0)[0] == 0
        assert eng.sched.get_num_new_matched_tokens(Request("z", prompt(3, 2)), 0)[0] == 8
        assert eng.sched.index.evicted == 2
    finally:
        eng.close()


def test_offloading_loads_the_saved_bytes_into_other_blocks():
    eng = Engine(OffloadingConnector)
    try:
        eng.step("a", prompt(1, 3), [0, 1, 2], fill=7)
        n, errors = eng.step("b", prompt(1, 3), [9, 10, 11])
        assert n == 12 and not errors
        for v in eng.views.values():
            assert bool((v[9:12] == 7).all())
    finally:
        eng.close()


@pytest.mark.parametrize("ids", [
    [20, 19, 18, 17, 16, 15, 14, 13],  # descending: how an engine often hands blocks out
    [30, 31, 25, 24, 23, 5, 6, 7],  # runs in both directions
    [1, 5, 9, 13, 17, 21, 25, 29],  # scattered: a scatter by index
    [8, 9, 10, 11, 12, 13, 14, 15],  # ascending: slices
])
@pytest.mark.parametrize("layer_by_layer", [True, False])
def test_offloading_loads_each_page_into_its_own_block_in_any_order(ids, layer_by_layer):
    eng = Engine(OffloadingConnector)
    try:
        eng.step("a", prompt(1, 8), [0, 1, 2, 3, 4, 5, 6, 7], fill=[10 + i for i in range(8)])
        n, errors = eng.step("b", prompt(1, 8), ids, layer_by_layer=layer_by_layer)
        assert n == 32 and not errors
        for name, v in eng.views.items():
            assert [int(v[b][0]) for b in ids] == [10 + i for i in range(8)], name
            assert all(bool((v[b] == 10 + i).all()) for i, b in enumerate(ids)), name
    finally:
        eng.close()


def test_offload_chunk_must_be_whole_blocks():
    from kvconf.errors import ConfigError

    with pytest.raises(ConfigError, match="not a whole number of KV blocks"):
        make(OffloadingConnector, KVConnectorRole.WORKER, block_size=6)


def saved_store(tmp_path: Path, **extra) -> Path:
    """The one segment a shared_storage connector (``extra``: its settings) saves under ``tmp_path``."""
    eng = Engine(SharedStorageConnector, tmp_path, **extra)
    try:
        eng.step("a", prompt(1, 3), [0, 1, 2], fill=5)
    finally:
        eng.close()
    (seg,) = segments(tmp_path)
    return seg


def load_errors(tmp_path: Path, **extra) -> tuple[int, dict]:
    eng = Engine(SharedStorageConnector, tmp_path, **extra)
    try:
        return eng.step("b", prompt(1, 3), [20, 21, 22])
    finally:
        eng.close()


def test_truncated_segment_is_reported_with_its_name(tmp_path):
    seg = saved_store(tmp_path)
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 10)
    n, errors = load_errors(tmp_path)  # the segment still claims its first chunk, so that its load reports it
    assert n > 0 and errors and all(str(seg) in why and "truncated" in why for why in errors.values())


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    seg = saved_store(tmp_path)
    flip_a_data_byte(seg)
    _, errors = load_errors(tmp_path)
    assert errors and "checksum mismatch" in next(iter(errors.values()))


def test_flipped_header_byte_is_caught_too(tmp_path):
    seg = saved_store(tmp_path)
    data = bytearray(seg.read_bytes())
    data[30] ^= 0x01
    seg.write_bytes(data)
    _, errors = load_errors(tmp_path)
    assert errors and str(seg) in next(iter(errors.values()))


def test_foreign_layout_segment_is_not_loaded(tmp_path):
    seg = saved_store(tmp_path)
    # the same prompt saved by a cache with another layout, planted where this layout looks
    other_dir = tmp_path / "other"
    eng = Engine(SharedStorageConnector, other_dir, num_blocks=16)
    eng.worker.layout = eng.sched.layout = "f" * 16
    eng.worker.dir = eng.sched.dir = str(other_dir / ("f" * 16))
    try:
        eng.step("a", prompt(1, 3), [0, 1, 2], fill=9)
    finally:
        eng.close()
    (foreign,) = segments(other_dir)
    shutil.copy(foreign, seg)
    _, errors = load_errors(tmp_path)
    assert errors and "another KV layout" in next(iter(errors.values()))


def test_a_crash_between_write_and_rename_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import kvconf_connectors.shared_storage as ss

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ss.os, "replace", crash)
    eng = Engine(SharedStorageConnector, tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt):
            eng.step("a", prompt(1, 3), [0, 1, 2], fill=5)
    finally:
        eng.close()
    monkeypatch.undo()
    assert segments(tmp_path) == [] and list(tmp_path.rglob("*.tmp"))  # only the temporary file is left
    n, errors = load_errors(tmp_path)
    assert n == 0 and not errors


def test_capacity_evicts_the_oldest_segments(tmp_path):
    eng = Engine(SharedStorageConnector, tmp_path, capacity="10KiB")  # a segment is about 4.5 KiB
    try:
        for i in range(4):
            eng.step(f"r{i}", prompt(i, 2), [2 * i, 2 * i + 1], fill=i)
            time.sleep(0.02)  # file times have a granularity of a few ms
        names = {p.name for p in segments(tmp_path)}
        assert sum(p.stat().st_size for p in segments(tmp_path)) <= 10 * 1024
        assert eng.sched.get_num_new_matched_tokens(Request("x", prompt(3, 2)), 0)[0] == 8
        assert eng.sched.get_num_new_matched_tokens(Request("y", prompt(0, 2)), 0)[0] == 0
        assert len(names) < 4
    finally:
        eng.close()


def unwritable(cmd: list[str]) -> list[str]:
    """Runs ``cmd`` without the power to ignore file permissions (root has it by default)."""
    if os.geteuid() != 0:
        return cmd
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's file-permission override"
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
            "-dac_override,-dac_read_search", *cmd]


@pytest.mark.parametrize("policy,code", [("fail", 1), ("recompute", 0)])
def test_read_only_directory_is_handled_by_policy(workdir, tmp_path, policy, code):
    import sys

    from conftest import kvconf_env

    store = tmp_path / "ro"
    store.mkdir()
    store.chmod(0o555)
    cmd = unwritable([sys.executable, "-m", "kvconf", "connector=shared_storage", "output=json",
                      f"connector.extra.shared_storage_path={store}", f"connector.kv_load_failure_policy={policy}"])
    proc = subprocess.run(cmd, cwd=workdir, env=kvconf_env(), capture_output=True, text=True)
    store.chmod(0o755)
    assert proc.returncode == code, proc.stderr
    if code:
        assert f"cannot write under {store}" in proc.stderr and "Permission denied" in proc.stderr
    else:
        st = json_out(proc)["self_test"]
        assert st["recomputed"] and all(str(store) in why for why in st["recomputed"].values())
        assert st["hits"] == 0 and st["verified"] is True

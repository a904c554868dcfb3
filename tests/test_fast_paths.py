"""The fast paths (#14) keep their promises: layers seen as one tensor only where they really are,
a step's copies batched without losing a byte, disk loads straight into the blocks and checked
there, prefix hashes computed once, benchmarks against the machine's limits in a private store,
and bench-compare that knows noise. No timing is asserted here (benchmarks/ measures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_tiers import Engine, prompt, segments

from conftest import REPO, json_out, kvconf_env, run_kvconf
from kvconf.config.layout import KVCacheLayout
from kvconf.contract.api import Request, block_hashes
from kvconf_connectors.offloading import LRUIndex, OffloadingConnector
from kvconf_connectors.shared_storage import SharedStorageConnector

pytestmark = pytest.mark.torch

QUICK = ("bench.repetitions=2", "bench.warmup=0", "bench.min_seconds=0")


def _views(layout: str = "LBHNC", num_layers: int = 4):
    from kvconf.runtime.allocate import allocate, layer_views
    from kvconf.runtime.views import byte_views

    cfg = KVCacheLayout(num_layers=num_layers, block_size=16, dtype="float16", num_blocks=8, layout=layout,
                        groups=[{"type": "full_attention", "num_kv_heads": 2, "head_size": 64}]).to_config()
    buffers = allocate(cfg, "cpu")
    return cfg, buffers, byte_views(layer_views(cfg, buffers))


@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC"])
def test_layers_kvconf_allocates_are_one_stack_that_views_the_same_bytes(layout):
    import torch

    from kvconf.runtime.views import stack_layers

    cfg, _, views = _views(layout)
    names = list(views)
    [stack] = stack_layers(views, [names])
    assert stack.names == names and stack.rows.shape[:2] == (8, 4) and stack.page_bytes == views[names[0]].shape[1]
    for li, name in enumerate(names):  # a write through one is seen through the other
        views[name][5].fill_(li + 1)
        assert torch.equal(stack.rows[5, li].view(torch.uint8), views[name][5])


def test_each_tensor_of_an_explicit_config_gets_memory_of_its_own():
    """vLLM's own form: one KVCacheTensor per layer. Each layer's blocks must lie in its own
    allocation (they once all viewed the first one: four layers, one set of bytes)."""

    from kvconf.config.kvcache import KVCacheConfig
    from kvconf.runtime.allocate import allocate, layer_views
    from kvconf.runtime.views import byte_views

    data = KVCacheLayout(num_layers=4, block_size=16, dtype="float16", num_blocks=8,
                         groups=[{"type": "full_attention", "num_kv_heads": 2, "head_size": 64}]).to_config().model_dump()
    (t,) = data["kv_cache_tensors"]
    data["kv_cache_tensors"] = [{"size": 8 * t["block_stride"], "layers": [n], "layer_stride": 0,
                                 "block_stride": t["block_stride"]} for n in t["layers"]]
    cfg = KVCacheConfig.model_validate(data)
    buffers = allocate(cfg, "cpu")
    views = byte_views(layer_views(cfg, buffers))
    assert len(buffers) == 4
    for i, (view, buf) in enumerate(zip(views.values(), buffers)):
        assert view.data_ptr() == buf.data_ptr()
        view.fill_(i + 1)
    assert [int(v[7, -1]) for v in views.values()] == [1, 2, 3, 4]  # no layer overwrote another


def test_a_large_host_cache_is_its_aligned_zeroed_buffer():
    """A host cache of huge-page size: every layer views the aligned, zeroed buffer allocate()
    returned, not the bytes before it."""
    from kvconf.runtime.allocate import HUGE_PAGE, allocate, layer_views
    from kvconf.runtime.views import byte_views

    cfg = KVCacheLayout(num_layers=4, block_size=16, dtype="float16", num_blocks=512,
                        groups=[{"type": "full_attention", "num_kv_heads": 8, "head_size": 128}]).to_config()
    assert cfg.total_bytes >= 4 * HUGE_PAGE
    (buf,) = allocate(cfg, "cpu")
    views = byte_views(layer_views(cfg, [buf]))
    first = next(iter(views.values()))
    assert first.data_ptr() == buf.data_ptr() and buf.data_ptr() % 4096 == 0
    assert all(int(v.max()) == 0 for v in views.values())
    last = list(views.values())[-1]
    assert last[-1].data_ptr() + last.shape[1] == buf.data_ptr() + buf.numel()


def test_layers_in_separate_tensors_are_a_stack_each():
    import torch

    from kvconf.runtime.views import stack_layers

    views = {f"l{i}": torch.zeros(8, 64, dtype=torch.uint8) for i in range(3)}
    stacks = stack_layers(views, [list(views)])
    assert [s.names for s in stacks] == [["l0"], ["l1"], ["l2"]]


def test_offloading_batches_a_step_of_requests_that_share_a_prefix(workdir):
    # every request of the step loads the same prefix rows into its own blocks, in one step
    proc = run_kvconf("connector=offloading", "action=bench", "bench.concurrency=4", "bench.requests=4",
                      "output=json", *QUICK, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["bench"]["figures"]["verified"] is True


def test_a_request_hashes_each_block_once_however_often_the_connector_asks(tmp_path):
    eng = Engine(OffloadingConnector)
    try:
        tokens = prompt(1, 6)
        req = Request("r", tokens)
        for _ in range(3):
            eng.sched.get_num_new_matched_tokens(req, 0)
        assert req.hashed_blocks == len(tokens) // 4  # block_size 4
        req.append_output_token_ids([1, 2, 3, 4])
        eng.sched.get_num_new_matched_tokens(req, 0)
        assert req.hashed_blocks == len(tokens) // 4 + 1
    finally:
        eng.close()


def test_a_blocks_hash_is_sha256_of_every_token_up_to_its_end_however_the_tokens_arrived():
    import hashlib
    import struct

    tokens = prompt(3, 19)[:75]  # 18 full blocks of 4 and 3 tokens over
    req = Request("r", tokens[:10])
    req.prefix_hashes(4)
    for start in range(10, 75, 7):  # decode steps of uneven sizes, asking between them
        req.append_output_token_ids(tokens[start:start + 7])
        req.prefix_hashes(4)
    expect = [hashlib.sha256(struct.pack(f"<{4 * (i + 1)}q", *tokens[:4 * (i + 1)])).digest() for i in range(18)]
    assert req.prefix_hashes(4) == expect == block_hashes(tokens, 4)
    assert req.hashed_blocks == 18
    other = block_hashes(tokens[:40] + [t + 1 for t in tokens[40:]], 4)
    assert other[:10] == expect[:10] and not set(other[10:]) & set(expect)  # a shared prefix, then apart


def test_a_large_host_buffer_is_zeroed_and_backed_by_huge_pages_where_the_kernel_offers_them():
    torch = pytest.importorskip("torch")
    from kvconf.runtime.allocate import HUGE_PAGE, host_zeros

    def huge() -> int:
        return int(next(ln.split()[1] for ln in open("/proc/self/smaps_rollup") if ln.startswith("AnonHugePages")))

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    before = huge()
    t = host_zeros((64, 1 << 20), dtype=torch.float16)  # 128 MiB
    assert t.shape == (64, 1 << 20) and t.dtype == torch.float16 and not t.any()
    assert t.data_ptr() % HUGE_PAGE == 0
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    assert (huge() - before) * 1024 >= 64 << 20  # most of the buffer (the kernel may leave some pages small)


def test_an_eviction_skips_saves_in_flight_and_takes_the_least_recently_used():
    idx = LRUIndex(3)
    slots = [idx.reserve(k, set()) for k in (b"a", b"b", b"c")]
    assert sorted(slots) == [0, 1, 2]
    assert idx.reserve(b"d", set()) is None  # nothing committed yet: nothing to evict
    idx.commit(b"b")
    idx.commit(b"a")
    assert idx.reserve(b"d", {b"b"}) == slots[0]  # b is pinned (being loaded): a goes
    assert not idx.has(b"a") and idx.has(b"b") and idx.evicted == 1


def test_a_disk_page_that_fails_its_check_leaves_its_blocks_zeroed_and_reported(tmp_path):
    eng = Engine(SharedStorageConnector, tmp_path)
    try:
        tokens = prompt(7, 4)
        eng.step("save", tokens, [0, 1, 2, 3], fill=0x5A)
        victim = segments(tmp_path)[0]
        data = bytearray(victim.read_bytes())
        data[-10] ^= 0xFF
        victim.write_bytes(data)
        for v in eng.views.values():
            v[4:8].fill_(0xAB)
        n, errors = eng.step("load", tokens, [4, 5, 6, 7])
        assert n == 16 and set(errors) == {4, 5, 6, 7} and "checksum mismatch" in errors[4]
        assert all(int(v[b].count_nonzero()) == 0 for v in eng.views.values() for b in (4, 5, 6, 7))
    finally:
        eng.close()


def test_a_disk_load_lands_in_the_blocks_themselves(tmp_path):
    eng = Engine(SharedStorageConnector, tmp_path)
    try:
        tokens = prompt(3, 4)
        eng.step("save", tokens, [8, 9, 10, 11], fill=0x3C)
        for v in eng.views.values():
            v[:].zero_()
        n, errors = eng.step("load", tokens, [20, 2, 17, 5])  # scattered destinations
        assert n == 16 and not errors
        assert all(bool((v[b] == 0x3C).all()) for v in eng.views.values() for b in (20, 2, 17, 5))
    finally:
        eng.close()


def test_offloading_bench_reports_its_share_of_memcpy(workdir):
    proc = run_kvconf("connector=offloading", "action=bench", "output=json", *QUICK, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    b = json_out(proc)["bench"]
    c, cr, f = b["ceilings"], b["ceiling_ratio"], b["figures"]
    assert c["memcpy_gbps"] > 0 and c["memcpy_bytes"] >= 256 << 20 and cr["against"] == "memcpy"
    assert len(f["by_repetition"]["gbps"]) == 2 and len(c["by_repetition"]["memcpy_gbps"]) == 2
    # each repetition over the memcpy measured right after it; the ratio is their median (of two:
    # the mean). Rounded to 3 decimals: a slow run's small ratio differs in its last digit
    for side in ("save", "load"):
        paired = [g / m for g, m in zip(f["by_repetition"][f"{side}_gbps"], c["by_repetition"]["memcpy_gbps"])]
        assert cr["by_repetition"][side] == pytest.approx(paired, rel=0.01, abs=1e-3)
        assert cr[side] == pytest.approx(sum(paired) / 2, rel=0.01, abs=1e-3)
    raw = b["raw"]["by_repetition"]["gbps"]  # the raw path too, right after each repetition
    assert len(raw) == 2 and b["ratio"] == pytest.approx(
        sum(g / r for g, r in zip(f["by_repetition"]["gbps"], raw)) / 2, rel=0.01, abs=1e-3)
    results = json.loads((workdir / "results.json").read_text())
    assert results["ceiling_ratio"] == cr


def test_disk_bench_runs_cold_in_a_private_store_that_it_removes(workdir, tmp_path):
    store = tmp_path / "kv"
    proc = run_kvconf("connector=shared_storage", f"connector.extra.shared_storage_path={store}", "action=bench",
                      "output=json", *QUICK, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    b = json_out(proc)["bench"]
    assert b["store"]["private"] is True and b["store"]["path"].startswith(str(store))
    assert not segments(store) and list(store.iterdir()) == []  # nothing left behind
    c, cr = b["ceilings"], b["ceiling_ratio"]
    assert c["file_write_gbps"] > 0 and c["file_read_cold_gbps"] > 0 and c["file_read_warm_gbps"] > 0
    assert cr["against"].startswith("raw file") and cr["save"] > 0 and cr["load"] > 0
    assert "read cold" in b["raw"]["path"]
    text = run_kvconf("connector=shared_storage", f"connector.extra.shared_storage_path={store}", "action=bench",
                      *QUICK, cwd=workdir)
    assert "store      a private one" in text.stdout and "of limit" in text.stdout


def test_a_disk_bench_told_to_reuse_its_store_keeps_what_it_saved(workdir, tmp_path):
    store = tmp_path / "kv"
    proc = run_kvconf("connector=shared_storage", f"connector.extra.shared_storage_path={store}", "action=bench",
                      "bench.reuse_store=true", "output=json", *QUICK, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["bench"]["store"] == {"private": False} and segments(store)


def test_a_figure_that_was_not_measured_is_left_out(workdir):
    pytest.importorskip("mooncake.engine")
    text = run_kvconf("connector=mooncake", "action=bench", *QUICK, f"hydra.run.dir={workdir / 'run'}", cwd=workdir)
    assert text.returncode == 0 and "None" not in text.stdout and "save " not in text.stdout.split("bench ")[1]
    b = json.loads((workdir / "run" / "results.json").read_text())  # the same run's figures, as written
    assert "save_gbps" not in b["figures"] and b["figures"]["load_gbps"] > 0
    assert b["ceiling_ratio"]["save"] is None and b["ceiling_ratio"]["against"] == "loopback TCP"


def test_a_peer_to_peer_repetition_moves_min_seconds_of_transfers_with_one_peer(workdir):
    """One round of four 1 MiB requests takes milliseconds: a repetition goes on with more rounds
    (in the same peer process) until bench.min_seconds of transfers, rather than timing one."""
    pytest.importorskip("mooncake.engine")
    proc = run_kvconf("connector=mooncake", "action=bench", "output=json", "bench.repetitions=1", "bench.warmup=0",
                      "bench.min_seconds=0.3", "bench.raw=false", "bench.ceilings=false", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    f = json_out(proc)["bench"]["figures"]
    assert f["seconds"] >= 0.3 and f["requests"] > 4 and f["requests"] % 4 == 0


def _result(path: Path, gbps: list[float], connector: str = "offloading") -> Path:
    mid = sorted(gbps)[len(gbps) // 2]
    doc = {"connector": connector, "kv_cache": "tiny",
           "figures": {"gbps": mid, "save_gbps": mid, "load_gbps": mid, "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
                       "by_repetition": {"gbps": gbps, "save_gbps": gbps, "load_gbps": gbps}},
           "raw": {"path": "x", "gbps": 10.0}, "ratio": mid / 10,
           "ceiling_ratio": {"save": mid / 20, "load": mid / 20, "overall": mid / 20, "against": "memcpy"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconf.bench.compare", *args], capture_output=True, text=True,
                          env=kvconf_env(), cwd=REPO)


def test_bench_compare_calls_a_change_inside_the_spread_no_change(tmp_path):
    a = _result(tmp_path / "a" / "results.json", [9.0, 10.0, 11.0])
    b = _result(tmp_path / "b" / "results.json", [9.5, 10.5, 11.0])
    proc = _compare(str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    assert "offloading tiny: no change" in proc.stdout and "ceiling_ratio_load" in proc.stdout
    gated = _compare(str(a), str(b), "--fail-below", "1.5")
    assert gated.returncode == 1 and "below --fail-below 1.5" in gated.stderr
    assert _compare(str(a), str(b), "--fail-below", "0.9").returncode == 0


def test_bench_compare_names_a_change_beyond_the_spread(tmp_path):
    a = _result(tmp_path / "a" / "results.json", [9.8, 10.0, 10.2])
    b = _result(tmp_path / "b" / "results.json", [4.9, 5.0, 5.1])
    proc = _compare(str(a), str(b), "--format", "json")
    out = json.loads(proc.stdout)
    verdicts = {r["figure"]: r["verdict"] for r in out["rows"]}
    assert verdicts["gbps"] == "worse" and verdicts["ceiling_ratio_save"] == "worse"
    assert verdicts["latency_p50_ms"] == "no change" and out["changed"]["offloading tiny"]
    assert _compare(str(a), str(b), "--fail-below", "0.9").returncode == 1


def test_bench_compare_takes_a_paired_ceiling_ratios_own_spread_as_its_noise(tmp_path):
    def ratios(path: Path, save: list[float]) -> Path:
        p = _result(path, [10.0, 10.0, 10.0])
        doc = json.loads(p.read_text())
        doc["ceiling_ratio"]["save"] = sorted(save)[1]
        doc["ceiling_ratio"]["by_repetition"] = {"save": save}
        p.write_text(json.dumps(doc))
        return p

    def verdict(a: list[float], b: list[float]) -> str:
        out = json.loads(_compare(str(ratios(tmp_path / "a" / "results.json", a)),
                                  str(ratios(tmp_path / "b" / "results.json", b)), "--format", "json").stdout)
        return next(r["verdict"] for r in out["rows"] if r["figure"] == "ceiling_ratio_save")

    assert verdict([0.70, 0.80, 0.90], [0.80, 0.88, 0.95]) == "no change"  # +10 % inside a 25 % spread
    assert verdict([0.79, 0.80, 0.81], [0.87, 0.88, 0.89]) == "better"  # +10 % beyond a 2.5 % spread


@pytest.mark.parametrize("doc, said", [
    ([1, 2], "a JSON list, not an object"),
    ({"connector": "offloading", "kv_cache": "tiny"}, "no 'figures' where a results.json has one"),
    ({"connector": "offloading", "kv_cache": "tiny", "figures": {"gbps": "fast"}}, 'gbps is "fast", not a number'),
    ({"connector": "offloading", "kv_cache": "tiny", "figures": {"gbps": 1.0, "by_repetition": {"gbps": [1.0, None, "x"]}}},
     'its repetitions hold "x", not a number'),
    ({"engine": "vllm", "connector": "offloading", "kv_cache": "tiny", "vllm": {"by_length": {"64": {"passes": {
        "connector": {"hit": {"ttft_ms": {"p50": [1]}}}}}}}}, "ttft_p50_ms is [1], not a number"),
])
def test_bench_compare_names_a_file_that_is_not_a_results_json(tmp_path, doc, said):
    good = _result(tmp_path / "a" / "results.json", [9.0, 10.0, 11.0])
    bad = tmp_path / "sweep" / "0" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(doc))
    for args in ((str(good), str(bad)), (str(good), str(tmp_path / "sweep"))):  # a file, a sweep folder
        proc = _compare(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"{bad}: not the results.json of a kvconf action=bench job (" in proc.stderr and said in proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_scheduler_benchmark_runs_and_reports_each_connector():
    proc = subprocess.run([sys.executable, "benchmarks/bench_scheduler.py", "--requests", "8", "--tokens", "256",
                           "--steps", "4", "--connectors", "offloading,shared_storage,example",
                           "--goal-hash-ratio", "100"], capture_output=True, text=True, env=kvconf_env(), cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("offloading", "shared_storage", "example"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(name))
        assert "128 of" in line  # 8 requests x 16 blocks, each hashed once
    assert "goals" in proc.stdout and "met" in proc.stdout


"""Page sizes and placement: vLLM's formulas, checked per spec type and on random layouts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvconf.config.kvcache import DTYPE_BYTES, KVCacheConfig, KVCacheInvariantError
from kvconf.config.layout import KVCacheLayout
from kvconf.runtime.pipeline import run_job


def attention_page(block_size, heads, head, head_v, dtype):
    return heads * block_size * (head + head_v) * DTYPE_BYTES[dtype]


def test_llama3_8b_reports_64_KiB_per_layer_and_2_MiB_per_block(compose):
    report = run_job({**compose("kv_cache=llama3_8b", "action=check")})
    (group,) = report["plan"]["groups"]
    assert group["page_size_bytes"] == 2 * 16 * 8 * 128 * 2 == 65_536
    assert report["plan"]["bytes_per_block"] == 32 * 65_536 == 2 * 1024 * 1024


GEMMA3_PAGE = 8 * 16 * (256 + 256) * 2  # 8 KV heads x 16 tokens x (K + V of 256) x bf16 = 128 KiB


def test_hybrid_model_is_planned_as_vllm_plans_it_six_groups_sharing_one_allocation(compose):
    data = compose("kv_cache=gemma3_hybrid", "kv_cache.memory=1GiB", "action=check")
    report = run_job(data)
    plan = report["plan"]
    # 40 sliding : 8 full layers -> group size 8: 5 sliding groups, 1 full group, 8 layers each
    assert [(g["type"], g["num_layers"], g["page_size_bytes"]) for g in plan["groups"]] == (
        [("sliding_window", 8, GEMMA3_PAGE)] * 5 + [("full_attention", 8, GEMMA3_PAGE)])
    assert plan["bytes_per_block"] == 8 * GEMMA3_PAGE == 1 << 20  # one group's pages, not 48 layers'
    assert plan["num_blocks"] == (1 << 30) // (1 << 20) == 1024
    assert plan["total_bytes"] == 1 << 30  # shared memory counted once
    assert [t["alias_of"] for t in plan["tensors"]] == [None, 0, 0, 0, 0, 0]
    assert all(t["size"] == 1 << 30 for t in plan["tensors"])


def test_hybrid_groups_take_every_num_groups_th_layer_of_their_bucket(compose):
    from kvconf.config.models import validate

    cfg = validate(compose("kv_cache=gemma3_hybrid", "kv_cache.memory=1GiB")).kv_cache_config
    sliding = [i for i in range(48) if i % 6 != 5]
    names = [[int(n.split(".")[2]) for n in g.layer_names] for g in cfg.kv_cache_groups]
    assert names[:5] == [sliding[i::5] for i in range(5)]
    assert names[5] == list(range(5, 48, 6))


def test_a_connector_without_hybrid_support_gets_vllms_unified_plan(compose):
    report = run_job(compose("connector.module_path=zoo.connectors", "connector.name=OneGroupOnly",
                             "kv_cache=gemma3_hybrid", "kv_cache.memory=1GiB", "action=check"))
    (group,) = report["plan"]["groups"]  # sliding layers planned as full attention, as vLLM does
    assert group["type"] == "full_attention" and group["num_layers"] == 48
    assert report["plan"]["num_blocks"] == (1 << 30) // (48 * GEMMA3_PAGE) == 170


def test_padding_follows_vllms_group_size_rule():
    # gpt-oss-20b with an eagle drafter: 12 sliding + 13 full; 13 < 1.5 x 12, so groups of 13
    groups = [{"type": "full_attention", "layers": "1::2", "num_kv_heads": 8, "head_size": 64},
              {"type": "sliding_window", "layers": "rest", "sliding_window": 128, "num_kv_heads": 8, "head_size": 64}]
    cfg = KVCacheLayout(num_layers=25, num_blocks=10, groups=groups).to_config()
    page = attention_page(16, 8, 64, 64, "bfloat16")
    assert [len(g.layer_names) for g in cfg.kv_cache_groups] == [13, 12]  # layer 0 is sliding: its bucket first
    assert [g.kv_cache_spec.type for g in cfg.kv_cache_groups] == ["sliding_window", "full_attention"]
    assert cfg.bytes_per_block == 13 * page and cfg.total_bytes == 13 * page * 10


def test_mixed_page_sizes_need_the_block_outermost_layout():
    groups = [{"type": "full_attention", "layers": "::2", "num_kv_heads": 8, "head_size": 128},
              {"type": "mla", "layers": "rest", "head_size": 576}]
    with pytest.raises(ValidationError) as exc:
        KVCacheLayout(num_layers=4, num_blocks=8, groups=groups)
    (p,) = exc.value.errors()[0]["ctx"]["error"].problems
    assert p.path == "kv_cache.layout" and "BLHNC" in p.fix and "mixed page sizes" in p.message
    cfg = KVCacheLayout(num_layers=4, num_blocks=8, groups=groups, layout="BLHNC").to_config()
    pages = [attention_page(16, 8, 128, 128, "bfloat16"), 16 * 576 * 2]
    assert cfg.bytes_per_block == 2 * pages[0] + 2 * pages[1] and cfg.total_bytes == 8 * cfg.bytes_per_block
    for t, page in zip(cfg.kv_cache_tensors, pages):  # block-outermost: a block's layers side by side
        assert (t.layer_stride, t.block_stride, t.alias_of) == (page, 2 * page, None)


def test_block_outermost_uniform_layout_uses_vllms_blhnc_strides():
    groups = [{"type": "full_attention", "num_kv_heads": 8, "head_size": 128}]
    cfg = KVCacheLayout(num_layers=32, num_blocks=4, groups=groups, layout="BLHNC").to_config()
    (t,) = cfg.kv_cache_tensors
    assert (t.layer_stride, t.block_stride) == (65_536, cfg.bytes_per_block) == (65_536, 32 * 65_536)


def test_tensors_of_one_group_may_not_share_an_allocation():
    spec = {"block_size": 16, "num_kv_heads": 1, "head_size": 8, "dtype": "float16", "type": "full_attention"}
    page = 16 * 2 * 8 * 2
    bad = {"num_blocks": 2, "kv_cache_groups": [{"layer_names": ["a", "b"], "kv_cache_spec": spec}],
           "kv_cache_tensors": [{"size": 2 * page, "layers": ["a"], "layer_stride": 0, "block_stride": page},
                                {"size": 2 * page, "layers": ["b"], "layer_stride": 0, "block_stride": page,
                                 "alias_of": 0}]}
    with pytest.raises(ValidationError) as exc:
        KVCacheConfig.model_validate(bad)
    assert "both hold layers of group 0" in str(exc.value)
    bad["kv_cache_tensors"][1]["alias_of"] = 1  # itself: not an earlier tensor
    with pytest.raises(ValidationError, match="earlier tensor"):
        KVCacheConfig.model_validate(bad)


def test_one_request_of_max_model_len_must_fit_as_vllm_requires(compose):
    from kvconf.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        run_job(compose("kv_cache=llama3_8b", "kv_cache.memory=256MiB", "kv_cache.max_model_len=2048",
                        "action=check"))
    (p,) = exc.value.problems
    # needed: 32 layers x cdiv(2048, 16) blocks x 64 KiB = 256 MiB; available: 256 MiB - one 2 MiB block
    # the largest length that fits: 32 x cdiv(L, 16) x 64 KiB <= 254 MiB -> 127 blocks -> 2032 tokens
    assert p.path == "kv_cache.max_model_len" and "kv_cache.memory" in p.message
    assert "estimated maximum model length is 2032" in p.message and "max_model_len=2032" in p.fix
    ok = run_job(compose("kv_cache=llama3_8b", "kv_cache.memory=40GiB", "kv_cache.max_model_len=2048",
                         "action=check", "role=scheduler"))
    assert ok["plan"]["max_concurrency"] == 20_480 / 128


def test_a_sliding_window_layer_holds_its_window_and_the_tokens_in_flight():
    from kvconf.config.kvcache import SlidingWindowSpec, max_memory_usage_bytes

    spec = SlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=256, dtype="bfloat16", sliding_window=1024)
    # min(1024 - 1 + 2048, 131072) = 3071 tokens -> cdiv(3071, 16) = 192 blocks, + 1
    assert max_memory_usage_bytes(spec, 131_072, 2048) == 193 * GEMMA3_PAGE
    assert max_memory_usage_bytes(spec, 100, 2048) == (7 + 1) * GEMMA3_PAGE  # the request is shorter


def test_mla_layout_page_has_no_separate_value_head(compose):
    data = compose("kv_cache=deepseek_v3_mla", "action=check")
    report = run_job(data)
    kv = data["kv_cache"]
    (g,) = report["plan"]["groups"]
    assert g["type"] == "mla"
    assert g["page_size_bytes"] == 1 * kv["block_size"] * kv["groups"][0]["head_size"] * DTYPE_BYTES[kv["dtype"]]
    assert report["plan"]["bytes_per_block"] == g["page_size_bytes"] * kv["num_layers"]


def test_memory_budget_gives_the_largest_block_count_that_fits():
    layout = KVCacheLayout(num_layers=32, memory="40GiB", groups=[
        {"type": "full_attention", "num_kv_heads": 8, "head_size": 128}])
    assert layout.to_config().num_blocks == 20_480


def test_mamba_page_is_the_sum_of_its_states_and_ignores_block_size():
    groups = [{"type": "mamba", "shapes": [[4, 1024], [64, 128, 16]], "dtypes": ["float16", "float32"]}]
    a = KVCacheLayout(num_layers=2, num_blocks=4, block_size=16, groups=groups).to_config()
    b = KVCacheLayout(num_layers=2, num_blocks=4, block_size=64, groups=groups).to_config()
    page = 4 * 1024 * 2 + 64 * 128 * 16 * 4
    assert a.kv_cache_groups[0].kv_cache_spec.page_size_bytes == page
    assert b.kv_cache_groups[0].kv_cache_spec.page_size_bytes == page


specs = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["full_attention", "sliding_window"]),
                           "num_kv_heads": st.integers(1, 16), "head_size": st.sampled_from([32, 64, 80, 128, 256]),
                           "sliding_window": st.integers(1, 4096)}),
    st.fixed_dictionaries({"type": st.just("mla"), "head_size": st.sampled_from([64, 576])}),
)


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 24), block_size=st.sampled_from([1, 8, 16, 32, 64]),
       dtype=st.sampled_from(sorted(DTYPE_BYTES)), num_blocks=st.integers(1, 64), spec=specs,
       split=st.integers(1, 5))
def test_derived_placement_keeps_every_block_inside_its_tensor_without_overlap(
        num_layers, block_size, dtype, num_blocks, spec, split):
    spec = dict(spec)
    if spec["type"] != "sliding_window":
        spec.pop("sliding_window", None)
    groups = [{**spec, "layers": f"::{split}"}] + ([{**spec, "layers": "rest"}] if split > 1 and num_layers > 1 else [])
    layout = KVCacheLayout(num_layers=num_layers, block_size=block_size, dtype=dtype, num_blocks=num_blocks,
                           groups=groups)
    cfg = layout.to_config()
    if spec["type"] == "mla":
        page = block_size * spec["head_size"] * DTYPE_BYTES[dtype]
    else:
        page = attention_page(block_size, spec["num_kv_heads"], spec["head_size"], spec["head_size"], dtype)
    assert cfg.bytes_per_block == page * num_layers
    assert cfg.total_bytes == page * num_layers * num_blocks
    # every (layer, block) region lies inside its tensor and no two regions overlap
    regions = []
    for ti, start, stride, pg in cfg.placement().values():
        assert pg == page
        for b in range(num_blocks):
            lo = start + b * stride
            assert lo + pg <= cfg.kv_cache_tensors[ti].size
            regions.append((ti, lo, lo + pg))
    regions.sort()
    for (t1, _, hi), (t2, lo, _) in zip(regions, regions[1:]):
        assert t1 != t2 or hi <= lo
    # the explicit form of the same config validates too
    assert KVCacheConfig.model_validate(cfg.model_dump()) == cfg


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(1, 1 << 34), heads=st.integers(1, 8), layers=st.integers(1, 8))
def test_budget_gives_floor_of_budget_over_block_or_names_the_numbers(budget, heads, layers):
    groups = [{"type": "full_attention", "num_kv_heads": heads, "head_size": 64}]
    per_block = layers * heads * 16 * 128 * 2
    if budget < per_block:
        with pytest.raises(ValidationError) as exc:
            KVCacheLayout(num_layers=layers, memory=budget, groups=groups)
        inner = exc.value.errors()[0]["ctx"]["error"]
        assert isinstance(inner, KVCacheInvariantError)
        assert inner.problems[0].path == "kv_cache.memory" and str(per_block) in inner.problems[0].fix
    else:
        cfg = KVCacheLayout(num_layers=layers, memory=budget, groups=groups).to_config()
        assert cfg.num_blocks == budget // per_block and cfg.total_bytes <= budget
        assert math.floor(budget / per_block) == cfg.num_blocks


def test_tensor_parallel_workers_hold_their_share_of_the_kv_heads():
    groups = [{"type": "full_attention", "num_kv_heads": 8, "head_size": 128}]
    for tp, heads in ((1, 8), (2, 4), (8, 1), (16, 1)):  # fewer heads than workers: one each, replicated
        cfg = KVCacheLayout(num_layers=32, memory="40GiB", groups=groups, tensor_parallel_size=tp).to_config()
        assert cfg.kv_cache_groups[0].kv_cache_spec.num_kv_heads == heads
        assert cfg.num_blocks == (40 << 30) // (32 * attention_page(16, heads, 128, 128, "bfloat16"))
    mla = KVCacheLayout(num_layers=4, num_blocks=2, groups=[{"type": "mla", "head_size": 576}], tensor_parallel_size=8)
    assert mla.to_config().kv_cache_groups[0].kv_cache_spec.num_kv_heads == 1  # the latent is replicated


def test_pipeline_parallel_stages_split_layers_as_vllm_and_share_the_smallest_block_count(compose):
    report = run_job(compose("kv_cache=deepseek_v3_mla", "kv_cache.pipeline_parallel_size=4", "action=check",
                             "role=scheduler"))
    workers = report["plan"]["workers"]
    # 61 layers over 4 stages: 15 each, the one left over to the stage before the last
    assert [w["layers"] for w in workers] == [15, 15, 16, 15]
    page = 64 * 576 * 2
    budget = 256 << 20
    assert [w["num_blocks"] for w in workers] == [budget // (n * page) for n in (15, 15, 16, 15)]
    assert report["plan"]["num_blocks"] == budget // (16 * page)  # every worker takes the smallest
    assert report["plan"]["bytes_per_block"] == 15 * page  # the plan is the first worker's
    assert workers[2]["first_layer"] == "model.layers.30.self_attn.attn"

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


def test_hybrid_layout_has_one_full_layer_per_five_sliding_layers(compose):
    data = compose("kv_cache=gemma3_hybrid", "action=check")
    report = run_job(data)
    kv = data["kv_cache"]
    full, sliding = report["plan"]["groups"]
    assert (full["type"], sliding["type"]) == ("full_attention", "sliding_window")
    assert sliding["num_layers"] == 5 * full["num_layers"] and full["num_layers"] + sliding["num_layers"] == kv["num_layers"]
    for g, spec in zip((full, sliding), kv["groups"]):
        assert g["page_size_bytes"] == attention_page(kv["block_size"], spec["num_kv_heads"], spec["head_size"],
                                                      spec["head_size"], kv["dtype"])
    assert report["plan"]["bytes_per_block"] == sum(g["page_size_bytes"] * g["num_layers"] for g in (full, sliding))


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

"""The plug-in's translations, on objects shaped as vLLM 0.32's (no vLLM needed): a scheduler step
under chunked prefill and after a preemption, a request whose tokens grow, vLLM's plan as kvconf's."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from kvconf.config.kvcache import KVCacheConfig
from kvconf.errors import ConfigError
from kvconf.vllm.adapt import RequestCache, kv_cache_data, plan_differences, scheduler_output


def step(new=(), cached=(), scheduled=None, finished=()):
    """A vLLM SchedulerOutput: ``new`` (rid, computed, blocks), ``cached`` (rid, computed, new blocks, resumed)."""
    return NS(scheduled_new_reqs=[NS(req_id=r, num_computed_tokens=c, block_ids=b) for r, c, b in new],
              scheduled_cached_reqs=NS(req_ids=[r for r, *_ in cached], num_computed_tokens=[c for _, c, *_ in cached],
                                       new_block_ids=[b for _, _, b, _ in cached],
                                       resumed_req_ids={r for r, _, _, res in cached if res}),
              num_scheduled_tokens=scheduled or {}, finished_req_ids=set(finished))


def test_a_step_says_what_each_request_has_computed_once_it_has_run_and_which_blocks_it_was_given():
    first = scheduler_output(step(new=[("a", 32, ([0, 1, 2],))], scheduled={"a": 64}))
    assert first.num_computed_tokens == {"a": 96} and first.new_block_ids == {}
    later = scheduler_output(step(cached=[("a", 96, ([3, 4],), False), ("b", 0, ([7, 8, 9],), True)],
                                  scheduled={"a": 64, "b": 64}, finished={"z"}))
    assert later.num_computed_tokens == {"a": 160, "b": 64}
    assert later.new_block_ids == {"a": ([3, 4],)}  # b was preempted and given all its blocks anew
    assert later.finished_req_ids == {"z"} and later.scheduled_req_ids == ["a", "b"]


def test_a_request_is_hashed_once_and_grows_with_its_output():
    cache = RequestCache()
    vreq = NS(request_id="r", prompt_token_ids=list(range(40)), output_token_ids=[], kv_transfer_params=None)
    mine = cache(vreq)
    assert len(mine.prefix_hashes(16)) == 2
    vreq.output_token_ids = list(range(40, 48))
    assert cache(vreq) is mine and mine.num_tokens == 48 and len(mine.prefix_hashes(16)) == 3
    cache.forget("r")
    assert len(cache) == 0


def _vllm_plan(num_blocks=64, page=16384, spec_cls="FullAttentionSpec"):
    import torch

    spec = type(spec_cls, (), {})()
    spec.__dict__.update(block_size=32, num_kv_heads=2, head_size=64, head_size_v=64, dtype=torch.bfloat16,
                         sliding_window=None, attention_chunk_size=None, page_size_bytes=page)
    names = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    return NS(num_blocks=num_blocks,
              kv_cache_tensors=[NS(size=2 * num_blocks * page, layers=names, layer_stride=num_blocks * page,
                                   block_stride=page, offset=0)],
              kv_cache_groups=[NS(layer_names=names, kv_cache_spec=spec)])


@pytest.mark.torch
def test_vllms_plan_reads_as_kvconfs_and_a_difference_names_both_figures():
    mine = KVCacheConfig.model_validate(kv_cache_data(_vllm_plan()))
    assert mine.num_blocks == 64 and mine.kv_cache_groups[0].kv_cache_spec.page_size_bytes == 16384
    assert plan_differences(mine, mine) == []
    other = KVCacheConfig.model_validate(kv_cache_data(_vllm_plan(num_blocks=60)))
    assert plan_differences(mine, other)[0] == "num_blocks: vLLM 64, kvconf 60"
    with pytest.raises(ConfigError) as exc:
        kv_cache_data(_vllm_plan(spec_cls="ChunkedLocalAttentionSpec"))
    assert "ChunkedLocalAttentionSpec" in str(exc.value)

"""What the plug-in translates between vLLM and kvconf: vLLM's ``KVCacheConfig`` as kvconf's
explicit KV-cache form, kvconf's own plan of the same model and budget beside it, and vLLM's
requests and scheduler steps as the kvconf connector API's. Imports no vLLM module: it reads
vLLM's objects by their attributes (vLLM 0.32's names), so it is tested without vLLM too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from kvconf.config.kvcache import KVCacheConfig
from kvconf.contract.api import Request, SchedulerOutput
from kvconf.errors import ConfigError, Problem

__all__ = ["RequestCache", "kv_cache_data", "plan_differences", "scheduler_output", "spec_data"]

_SPEC_TYPES = {"FullAttentionSpec": "full_attention", "SlidingWindowSpec": "sliding_window",
               "MLAAttentionSpec": "mla", "MambaSpec": "mamba"}
"""vLLM spec classes kvconf has a spec of, by class name (a subclass of these with more meaning,
e.g. a chunked-local or a sparse MLA spec, is not one of them)."""


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def spec_data(spec: Any) -> dict[str, Any]:
    """One vLLM KV-cache spec as kvconf's (``type`` and its fields)."""
    kind = _SPEC_TYPES.get(type(spec).__name__)
    if kind == "full_attention" and (getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None)):
        kind = None
    if kind is None:
        raise ConfigError(Problem(
            "kv_cache", f"vLLM planned a layer with {type(spec).__name__}, which kvconf's connectors do not "
            "know how to move", value=type(spec).__name__, allowed=sorted(_SPEC_TYPES),
            fix="use a model whose layers are full, sliding-window, MLA or Mamba attention"))
    if kind == "mamba":
        return {"type": kind, "block_size": spec.block_size, "shapes": [list(s) for s in spec.shapes],
                "dtypes": [_dtype(d) for d in spec.dtypes]}
    out: dict[str, Any] = {"type": kind, "block_size": spec.block_size, "head_size": spec.head_size,
                           "dtype": _dtype(spec.dtype)}
    if kind != "mla":
        out["num_kv_heads"] = spec.num_kv_heads
        if getattr(spec, "head_size_v", None) not in (None, spec.head_size):
            out["head_size_v"] = spec.head_size_v
    if kind == "sliding_window":
        out["sliding_window"] = spec.sliding_window
    return out


def kv_cache_data(cfg: Any) -> dict[str, Any]:
    """vLLM's ``KVCacheConfig`` as kvconf's explicit ``kv_cache`` form (``num_blocks``,
    ``kv_cache_tensors``, ``kv_cache_groups``): the same numbers, validated by kvconf's model."""
    return {
        "num_blocks": cfg.num_blocks,
        "kv_cache_tensors": [{"size": t.size, "layers": list(t.layers), "layer_stride": t.layer_stride,
                              "block_stride": t.block_stride, "offset": getattr(t, "offset", 0)}
                             for t in cfg.kv_cache_tensors],
        "kv_cache_groups": [{"layer_names": list(g.layer_names), "kv_cache_spec": spec_data(g.kv_cache_spec)}
                            for g in cfg.kv_cache_groups],
    }


def page_problems(vllm_cfg: Any, ours: KVCacheConfig) -> list[Problem]:
    """Where a group's page in vLLM's plan is not the size kvconf computes from the same spec
    (vLLM pads some pages): the connector would then copy the wrong bytes."""
    out = []
    for i, (g, mine) in enumerate(zip(vllm_cfg.kv_cache_groups, ours.kv_cache_groups)):
        theirs = g.kv_cache_spec.page_size_bytes
        if theirs != mine.kv_cache_spec.page_size_bytes:
            out.append(Problem(f"kv_cache.kv_cache_groups[{i}]", f"vLLM's page of this group is {theirs} B, kvconf "
                               f"computes {mine.kv_cache_spec.page_size_bytes} B from the same spec",
                               value=type(g.kv_cache_spec).__name__, fix="report this layout to kvconf"))
    return out


def own_plan(model: str, block_size: int, dtype: str, budget: int, max_model_len: int,
             max_num_batched_tokens: int) -> tuple[Optional[KVCacheConfig], str]:
    """kvconf's plan of ``model`` (a folder with ``config.json``, or the file) at ``budget`` bytes,
    or None and why it could not plan it."""
    from kvconf.config.layout import KVCacheLayout
    from kvconf.errors import KVConfError

    path = Path(model)
    if not (path / "config.json").is_file() and not (path.is_file() and path.name.endswith(".json")):
        return None, f"{model} is not a local folder with config.json"
    try:
        layout = KVCacheLayout.model_validate({
            "model": str(path), "block_size": block_size, "dtype": dtype, "memory": budget,
            "max_model_len": max_model_len, "max_num_batched_tokens": max_num_batched_tokens})
        return layout.to_config(hybrid=False), ""
    except (KVConfError, ValueError, OSError, json.JSONDecodeError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def plan_differences(vllm_cfg: KVCacheConfig, ours: KVCacheConfig) -> list[str]:
    """What differs between vLLM's plan and kvconf's, one line each naming both figures."""
    out = []
    if vllm_cfg.num_blocks != ours.num_blocks:
        out.append(f"num_blocks: vLLM {vllm_cfg.num_blocks}, kvconf {ours.num_blocks}")
    theirs = [(g.layer_names, g.kv_cache_spec.model_dump()) for g in vllm_cfg.kv_cache_groups]
    mine = [(g.layer_names, g.kv_cache_spec.model_dump()) for g in ours.kv_cache_groups]
    if theirs != mine:
        out.append(f"kv_cache_groups: vLLM {theirs}, kvconf {mine}")
    t_theirs = [t.model_dump(exclude={"alias_of"}) for t in vllm_cfg.kv_cache_tensors]
    t_mine = [t.model_dump(exclude={"alias_of"}) for t in ours.kv_cache_tensors]
    if t_theirs != t_mine:
        out.append(f"kv_cache_tensors: vLLM {t_theirs}, kvconf {t_mine}")
    return out


class RequestCache:
    """vLLM's requests as kvconf's :class:`~kvconf.contract.api.Request`, one per request id,
    kept while vLLM holds the request: its prefix hashes are computed once and extended as tokens
    arrive (a decode step hashes the block it filled, never the prompt again)."""

    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}

    def __call__(self, request: Any) -> Request:
        rid = request.request_id
        mine = self._requests.get(rid)
        prompt = list(request.prompt_token_ids or ())
        if mine is None or len(mine.prompt_token_ids) != len(prompt):
            mine = self._requests[rid] = Request(rid, prompt, getattr(request, "kv_transfer_params", None))
        outputs = request.output_token_ids
        if len(outputs) > len(mine.output_token_ids):
            mine.append_output_token_ids(list(outputs[len(mine.output_token_ids):]))
        mine.kv_transfer_params = getattr(request, "kv_transfer_params", None)
        return mine

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)


def scheduler_output(so: Any) -> SchedulerOutput:
    """vLLM's ``SchedulerOutput`` as kvconf's: the scheduled requests, the finished ones, the
    tokens each request's KV covers once the step has run, and the blocks given this step to
    requests scheduled before (a resumed request's blocks are all given anew: it is planned again
    at allocation, so they are not passed as added blocks)."""
    scheduled = so.num_scheduled_tokens
    computed: dict[str, int] = {}
    for new in so.scheduled_new_reqs:
        computed[new.req_id] = new.num_computed_tokens + scheduled.get(new.req_id, 0)
    cached = so.scheduled_cached_reqs
    resumed: set[str] = set(getattr(cached, "resumed_req_ids", None) or ())
    added: dict[str, tuple[list[int], ...]] = {}
    for i, rid in enumerate(cached.req_ids):
        computed[rid] = cached.num_computed_tokens[i] + scheduled.get(rid, 0)
        ids = cached.new_block_ids[i]
        if ids is not None and rid not in resumed:
            added[rid] = tuple(list(g) for g in ids)
    return SchedulerOutput(scheduled_req_ids=list(computed), finished_req_ids=set(so.finished_req_ids),
                           num_computed_tokens=computed, new_block_ids=added)

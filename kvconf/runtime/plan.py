"""The memory plan: bytes per tensor and in total, checked against what the device has free.

Runs without torch and without initialising CUDA: free CPU memory comes from ``/proc/meminfo``,
free GPU memory from NVML (the driver's management library), read through ctypes.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from kvconf.config.kvcache import KVCacheConfig, estimate_max_model_len, max_concurrency, request_bytes
from kvconf.errors import ConfigError, Problem
from kvconf.units import format_bytes

__all__ = ["Plan", "available_bytes", "make_plan", "resolve_device"]


@dataclass(frozen=True)
class Plan:
    """What a worker will allocate."""

    device: str
    num_blocks: int
    bytes_per_block: int
    total_bytes: int
    allocates: bool
    """Whether this role allocates the plan: False for role=scheduler, which never allocates KV memory."""
    capacity_bytes: int | None
    """Free memory on the device when the plan was made (None where it cannot be read)."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    max_model_len: int | None = None
    """The request length checked to fit (``kv_cache.max_model_len``), if one was given."""
    max_concurrency: float | None = None
    """Requests of ``max_model_len`` tokens that fit at once, as vLLM logs it."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_free(index: int | None) -> tuple[int, int | None]:
    """(number of GPUs, free bytes on GPU ``index``) from NVML; (0, None) without a GPU driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0, None
    if nvml.nvmlInit_v2() != 0:
        return 0, None
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return 0, None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = list(range(count.value))
        if visible is not None:
            try:
                physical = [int(x) for x in visible.split(",") if x.strip() != ""]
            except ValueError:  # UUIDs: keep NVML's order
                pass
        if index is None or index >= len(physical):
            return len(physical), None
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(physical[index], ctypes.byref(handle)) != 0:
            return len(physical), None
        mem = _Memory()
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return len(physical), None
        return len(physical), int(mem.free)
    finally:
        nvml.nvmlShutdown()


def resolve_device(spec: str) -> str:
    """``auto`` becomes ``cuda:0`` when a GPU is visible, else ``cpu``; ``cuda`` becomes ``cuda:0``."""
    if spec == "auto":
        count, _ = _nvml_free(None)
        return "cuda:0" if count > 0 else "cpu"
    return "cuda:0" if spec == "cuda" else spec


def available_bytes(device: str) -> int | None:
    """Free memory on ``device``: MemAvailable on CPU, NVML's free bytes on a GPU."""
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return _nvml_free(int(device.partition(":")[2] or 0))[1]


def check_max_model_len(cfg: KVCacheConfig, budget: int, max_model_len: int, max_num_batched_tokens: int) -> None:
    """vLLM's check before it starts: one request of ``max_model_len`` tokens must fit in the
    budget less one block (the null block the pool holds back); a :class:`ConfigError` naming both
    keys, the bytes, and the largest length that fits, otherwise."""
    needed = request_bytes(cfg, max_model_len, max_num_batched_tokens)
    available = budget - cfg.bytes_per_block
    if needed <= available:
        return
    fits = estimate_max_model_len(cfg, available, max_model_len, max_num_batched_tokens)
    raise ConfigError(Problem(
        "kv_cache.max_model_len", f"one request of max_model_len={max_model_len} tokens needs "
        f"{format_bytes(needed)} ({needed} B) of KV cache, but kv_cache.memory leaves "
        f"{format_bytes(max(available, 0))} ({available} B) after the null block; the estimated maximum model "
        f"length is {fits}", value=max_model_len,
        details=(f"budget {budget} B - one block {cfg.bytes_per_block} B = {available} B available",),
        fix=f"raise kv_cache.memory to at least {format_bytes(needed + cfg.bytes_per_block)}, or set "
            f"kv_cache.max_model_len={fits}" if fits else "raise kv_cache.memory"))


def make_plan(cfg: KVCacheConfig, device: str, *, allocates: bool, check_capacity: bool = True,
              enforce_capacity: bool = True,
              max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
              budget: int | None = None) -> Plan:
    """The plan for ``cfg`` on ``device``; a :class:`ConfigError` when one request of
    ``max_model_len`` does not fit in ``budget`` (the layout's memory; unset: what its blocks
    take), or when a worker's plan does not fit in what the device has free (unless
    ``check_capacity`` is off, as for an export, or ``enforce_capacity`` is, when the free memory
    is only reported)."""
    concurrency = None
    if max_model_len is not None:
        check_max_model_len(cfg, budget if budget is not None else cfg.num_blocks * cfg.bytes_per_block,
                            max_model_len, max_num_batched_tokens)
        concurrency = round(max_concurrency(cfg, max_model_len, max_num_batched_tokens), 2)
    groups = []
    for g in cfg.kv_cache_groups:
        spec = g.kv_cache_spec
        groups.append({
            "type": spec.type,
            "num_layers": len(g.layer_names),
            "block_size": spec.block_size,
            "page_size_bytes": spec.page_size_bytes,
            "bytes_per_block": spec.page_size_bytes * len(g.layer_names),
            "spec": spec.model_dump(),
        })
    tensors = [{"size": t.size, "num_layers": len(t.layers), "layer_stride": t.layer_stride,
                "block_stride": t.block_stride, "offset": t.offset, "alias_of": t.alias_of}
               for t in cfg.kv_cache_tensors]
    capacity = available_bytes(device) if allocates and check_capacity else None
    plan = Plan(device=device, num_blocks=cfg.num_blocks, bytes_per_block=cfg.bytes_per_block,
                total_bytes=cfg.total_bytes, allocates=allocates, capacity_bytes=capacity,
                groups=groups, tensors=tensors, max_model_len=max_model_len, max_concurrency=concurrency)
    if allocates and capacity is not None and plan.total_bytes > capacity and enforce_capacity:
        per_block = plan.bytes_per_block
        fits = capacity // per_block if per_block else 0
        raise ConfigError(Problem(
            "kv_cache", f"the KV cache needs {format_bytes(plan.total_bytes)} ({plan.total_bytes} B) but {device} "
            f"has {format_bytes(capacity)} ({capacity} B) free",
            details=(f"{plan.num_blocks} blocks x {per_block} B per block = {plan.total_bytes} B",),
            fix=f"lower kv_cache.num_blocks to at most {fits}, or kv_cache.memory below {format_bytes(capacity)}"))
    return plan

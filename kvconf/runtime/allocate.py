"""Allocation: the plan's tensors on the device, and one named view per layer.

The first module on the config path that imports torch; nothing before it does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvconf.config.kvcache import KVCacheConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["allocate", "layer_views"]


ALIGN = 256
"""Each allocation starts at a multiple of this many bytes inside the buffer."""


def allocate(cfg: KVCacheConfig, device: str) -> list[torch.Tensor]:
    """One zeroed uint8 tensor per allocation (a ``KVCacheTensor`` with the tensors that alias
    it), exactly ``size`` bytes each: together ``cfg.total_bytes``. They are slices of one buffer,
    each aligned to :data:`ALIGN` bytes, so that a connector can see equal layers as one tensor
    (:func:`kvconf.runtime.views.stack_layers`) and copy a block of every layer in one call."""
    import torch

    sizes = [cfg.kv_cache_tensors[alloc[0]].size for alloc in cfg.allocations()]
    starts, at = [], 0
    for size in sizes:
        starts.append(at)
        at += -(-size // ALIGN) * ALIGN
    buffer = torch.zeros(max(at, 1), dtype=torch.uint8, device=device)
    return [buffer[start:start + size] for start, size in zip(starts, sizes)]


def layer_views(cfg: KVCacheConfig, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layer -> tensor of shape (num_blocks, *block_shape)`` in the spec's dtype, viewing the
    layer's blocks inside its allocation (``buffers`` as :func:`allocate` returns them; raw bytes
    where the dtype cannot be viewed)."""
    import torch

    specs = cfg.layer_specs()
    buffer_of = {ti: buffers[ai] for ai, alloc in enumerate(cfg.allocations()) for ti in alloc}
    views = {}
    for name, (ti, start, block_stride, page) in cfg.placement().items():
        raw = buffer_of[ti].as_strided((cfg.num_blocks, page), (block_stride, 1), start)
        spec = specs[name]
        dtype = getattr(torch, getattr(spec, "dtype", "uint8"), torch.uint8)
        try:
            views[name] = raw.view(dtype).view(cfg.num_blocks, *spec.block_shape)
        except RuntimeError:
            views[name] = raw
    return views


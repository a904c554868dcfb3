"""Allocation: the plan's tensors on the device, and one named view per layer.

The first module on the config path that imports torch; nothing before it does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvconf.config.kvcache import KVCacheConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["HUGE_PAGE", "allocate", "host_zeros", "layer_views"]


ALIGN = 256
"""Each allocation starts at a multiple of this many bytes inside the buffer."""


HUGE_PAGE = 2 << 20
"""The size of a transparent huge page on x86-64 and most arm64 Linux kernels."""

PAGE = 4096
"""A small host buffer starts on a page boundary (a disk tier can then write its blocks with
``O_DIRECT``, which asks for 4 KiB aligned memory)."""


def host_zeros(shape: tuple[int, ...], dtype: Any = None, pin_memory: bool = False) -> torch.Tensor:
    """A zeroed host tensor whose memory the kernel may back with transparent huge pages
    (``madvise(MADV_HUGEPAGE)`` before the first touch, on a 2 MiB boundary): scattered block
    copies into a large buffer then miss the TLB far less (writes into a cold 1 GiB pool ran at
    6-8 GB/s here in 4 KiB pages). Where the kernel says no (another OS, THP off), plain pages.
    A buffer under 8 MiB starts on a 4 KiB boundary, without the advice."""
    import math

    import torch

    dtype = dtype or torch.uint8
    nbytes = math.prod(shape) * dtype.itemsize
    if pin_memory:
        return torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)
    huge = nbytes >= 4 * HUGE_PAGE
    align = HUGE_PAGE if huge else PAGE  # at least a page: what O_DIRECT asks of a buffer (disk tiers)
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = -raw.data_ptr() % align
    region = raw[skip:skip + nbytes]
    if huge:
        _advise_huge(region.data_ptr(), nbytes)
    region.zero_()
    return region.view(dtype).view(shape)


def _advise_huge(ptr: int, nbytes: int) -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), 14)  # MADV_HUGEPAGE; a refusal is harmless
    except (OSError, AttributeError):
        pass


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
    if torch.device(device).type == "cpu":
        buffer = host_zeros((max(at, 1),))  # huge pages where the kernel gives them
    else:
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
        buf = buffer_of[ti]  # a slice of one buffer: as_strided's offset counts from the storage's start
        raw = buf.as_strided((cfg.num_blocks, page), (block_stride, 1), buf.storage_offset() + start)
        spec = specs[name]
        dtype = getattr(torch, getattr(spec, "dtype", "uint8"), torch.uint8)
        try:
            views[name] = raw.view(dtype).view(cfg.num_blocks, *spec.block_shape)
        except RuntimeError:
            views[name] = raw
    return views


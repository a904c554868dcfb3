"""KV memory as bytes: each layer's blocks as rows of raw bytes, whatever the layer's dtype and
shape. What a connector copies, registers or compares; one definition for all of them. Importing
this module imports no torch.

Copying a step's blocks one layer at a time costs one torch call per layer (a few microseconds
each, which is most of the time at small pages), and one call copies on one core. Where layers lie
in one buffer at an even spacing (kvconf allocates every KV-cache tensor in one buffer, so the
layers of one KV-cache group do), :func:`stack_layers` sees them as one ``(blocks, layers, page)``
tensor: one ``index_select`` then gathers a block from every layer at once, on every core torch
uses. :func:`widest` views such rows as 16-byte elements: ``index_copy_`` over bytes runs at about
1 GB/s here, over 16-byte elements at memory speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Stack", "byte_views", "stack_layers", "widest"]


def byte_views(kv_caches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's KV tensor as ``(num_blocks, page bytes)`` uint8, viewing the same memory."""
    import torch

    return {name: t.flatten(1).view(torch.uint8) for name, t in kv_caches.items()}


def widest(t: torch.Tensor) -> torch.Tensor:
    """``t`` (uint8, last dimension contiguous) viewed as the widest element (16, 8, 4 or 2 bytes)
    that divides its last dimension, its other strides and its offset; ``t`` itself otherwise."""
    import torch

    for dtype, size in ((torch.complex128, 16), (torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if (t.shape[-1] % size == 0 and t.storage_offset() % size == 0
                and all(s % size == 0 for s in t.stride()[:-1]) and t.data_ptr() % size == 0):
            try:
                return t.view(dtype)
            except RuntimeError:
                continue
    return t


class Stack:
    """Layers of one KV-cache group seen as one tensor: ``rows`` is ``(num_blocks, len(names),
    page)`` (a block's pages of every layer), in the widest element :func:`widest` allows."""

    def __init__(self, names: list[str], rows: torch.Tensor) -> None:
        self.names = names
        self.rows = rows

    @property
    def page_bytes(self) -> int:
        return self.rows.shape[2] * self.rows.element_size()

    def __repr__(self) -> str:
        return f"Stack({len(self.names)} layers, {self.page_bytes} B pages)"


def stack_layers(views: dict[str, torch.Tensor], groups: list[list[str]]) -> list[Stack]:
    """One :class:`Stack` for each run of layers in ``groups`` (layer names of one KV-cache group
    each, as byte views give them) that lie in one buffer with equal pages at an even spacing;
    a layer that fits no run is a stack of its own. Together the stacks cover every layer once."""
    stacks: list[Stack] = []
    for names in groups:
        run: list[str] = []
        for name in names:
            if run and not _extends(views, run, name):
                stacks.append(_stack(views, run))
                run = []
            run.append(name)
        if run:
            stacks.append(_stack(views, run))
    return stacks


def _extends(views: dict[str, Any], run: list[str], name: str) -> bool:
    first, last, v = views[run[0]], views[run[-1]], views[name]
    if (v.shape != first.shape or v.stride() != first.stride() or v.dtype != first.dtype
            or v.device != first.device or v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
        return False
    step = views[run[1]].storage_offset() - first.storage_offset() if len(run) > 1 else None
    gap = v.storage_offset() - last.storage_offset()
    if gap <= 0 or (step is not None and gap != step):
        return False
    blocks, page = first.shape
    return _disjoint([(1, page), (first.stride(0), blocks), (gap, len(run) + 1)])


def _disjoint(dims: list[tuple[int, int]]) -> bool:
    """Whether strides and sizes ``(stride, size)`` address every element once (no two overlap)."""
    reach = 0
    for stride, size in sorted(d for d in dims if d[1] > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _stack(views: dict[str, Any], run: list[str]) -> Stack:
    import torch

    first = views[run[0]]
    step: Optional[int] = views[run[1]].storage_offset() - first.storage_offset() if len(run) > 1 else 0
    blocks, page = first.shape
    rows = torch.as_strided(first, (blocks, len(run), page), (first.stride(0), step or page, 1),
                            first.storage_offset())
    return Stack(list(run), widest(rows))

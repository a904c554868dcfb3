"""A deterministic byte pattern for (request, layer, block), so a receiver can verify a block
without seeing the sender's memory. Every 8-byte word of a block is distinct, and blocks of
different (request, layer, block) differ, so a misplaced or stale block shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["block_pattern", "block_seed"]

_MASK = (1 << 64) - 1


def block_seed(request: int, layer: int, block: int) -> int:
    """A 31-bit mix of the three indices (splitmix64's finaliser)."""
    z = (request * 0x9E3779B97F4A7C15 + layer * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def block_pattern(request: int, layer: int, block: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` uint8 values: int64 words ``seed << 32 | index``, little-endian, truncated."""
    import torch

    words = (nbytes + 7) // 8
    t = torch.arange(words, dtype=torch.int64)
    t.add_(block_seed(request, layer, block) << 32)
    return t.view(torch.uint8)[:nbytes]

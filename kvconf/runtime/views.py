"""KV memory as bytes: each layer's blocks as rows of raw bytes, whatever the layer's dtype and
shape. What a connector copies, registers or compares; one definition for all of them. Importing
this module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["byte_views"]


def byte_views(kv_caches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's KV tensor as ``(num_blocks, page bytes)`` uint8, viewing the same memory."""
    import torch

    return {name: t.flatten(1).view(torch.uint8) for name, t in kv_caches.items()}

"""The KV-cache layout: specs, groups, tensors, and the compact form users write.

A :class:`KVCacheConfig` mirrors vLLM's (``v1/kv_cache_interface.py``): ``num_blocks``,
``kv_cache_tensors`` (placement: ``size``, ``layers``, ``layer_stride``, ``block_stride``,
``offset``) and ``kv_cache_groups`` (layer names and one spec). Page sizes follow vLLM's formulas:

>>> spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype="bfloat16")
>>> spec.page_size_bytes          # 8 heads x 16 tokens x (128 + 128) x 2 B: Llama-3-8B, per layer
65536
>>> MLAAttentionSpec(block_size=16, head_size=576, dtype="bfloat16").page_size_bytes
18432

Users write the compact form (:mod:`kvconf.config.layout`), from which the full config is
derived; either form is checked against the same invariants (:func:`check_kv_cache_config`).
"""


import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, PositiveInt, model_validator

from kvconf.errors import Problem

from .base import StrictModel

__all__ = [
    "estimate_max_model_len",
    "max_concurrency",
    "max_memory_usage_bytes",
    "request_bytes",
    "DTYPE_BYTES",
    "DType",
    "FullAttentionSpec",
    "KVCacheConfig",
    "KVCacheGroupSpec",
    "KVCacheInvariantError",
    "KVCacheSpec",
    "KVCacheTensor",
    "MLAAttentionSpec",
    "MambaSpec",
    "SPEC_TYPES",
    "SlidingWindowSpec",
    "check_kv_cache_config",
]

Float16 = Literal["float16"]
BFloat16 = Literal["bfloat16"]
Float32 = Literal["float32"]
Float8E4M3 = Literal["float8_e4m3fn"]
Float8E5M2 = Literal["float8_e5m2"]
Int8 = Literal["int8"]
UInt8 = Literal["uint8"]
DType = Literal[Float16, BFloat16, Float32, Float8E4M3, Float8E5M2, Int8, UInt8]
"""A KV-cache element type, spelled as torch spells it."""

DTYPE_BYTES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

MAX_HEAD_SIZE = 4096
"""Elements in one head, at most: seven times the largest in service (576, DeepSeek's MLA latent)."""
MAX_KV_HEADS = 1024
"""KV heads of one layer, at most (the largest models have 128)."""
MAX_BLOCK_SIZE = 1 << 20
"""Tokens per block, at most (vLLM's blocks hold 16 to a few thousand)."""
MAX_BLOCKS = 2**31
"""More blocks per layer than a machine holds (vLLM's block ids are int32)."""
MAX_TENSOR_BYTES = 64 * 1024**4
"""Bytes of one KV-cache tensor, at most: more memory than one machine holds."""

HeadSize = Annotated[int, Field(gt=0, le=MAX_HEAD_SIZE)]
KVHeads = Annotated[int, Field(gt=0, le=MAX_KV_HEADS)]
BlockSize = Annotated[int, Field(gt=0, le=MAX_BLOCK_SIZE)]

FullAttention = Literal["full_attention"]
SlidingWindow = Literal["sliding_window"]
MLA = Literal["mla"]
Mamba = Literal["mamba"]
SpecType = Literal[FullAttention, SlidingWindow, MLA, Mamba]


class KVCacheInvariantError(ValueError):
    """A layout that is well-typed but inconsistent; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


# --------------------------------------------------------------------------------------------
# Specs (one per group)


class _AttentionSpecBase(StrictModel):
    block_size: BlockSize
    """Tokens per block."""
    num_kv_heads: KVHeads
    """KV heads held by this worker (after tensor parallelism)."""
    head_size: HeadSize
    """Size of one key head, in elements."""
    head_size_v: HeadSize | None = None
    """Size of one value head, in elements; defaults to ``head_size``."""
    dtype: DType
    """Element type of the cache."""

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of one layer: heads x tokens x (K + V head size) x dtype bytes."""
        v = self.head_size_v or self.head_size
        return self.num_kv_heads * self.block_size * (self.head_size + v) * DTYPE_BYTES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block of one layer in elements of ``dtype`` (K and V stacked)."""
        if self.head_size_v in (None, self.head_size):
            return (2, self.block_size, self.num_kv_heads, self.head_size)
        return (self.page_size_bytes // DTYPE_BYTES[self.dtype],)


class FullAttentionSpec(_AttentionSpecBase):
    """Full (causal) attention: every token's K and V are kept."""

    type: FullAttention = "full_attention"
    """Spec type."""


class SlidingWindowSpec(_AttentionSpecBase):
    """Sliding-window attention: only the last ``sliding_window`` tokens are attended to."""

    type: SlidingWindow = "sliding_window"
    """Spec type."""
    sliding_window: PositiveInt
    """Window length in tokens."""


class MLAAttentionSpec(StrictModel):
    """Multi-head latent attention (DeepSeek-V2/V3): one latent vector per token, no separate V."""

    type: MLA = "mla"
    """Spec type."""
    block_size: BlockSize
    """Tokens per block."""
    num_kv_heads: Literal[1] = 1
    """Always 1 for MLA: the latent is shared by all heads."""
    head_size: HeadSize
    """Latent size per token (kv_lora_rank + qk_rope_head_dim; 576 for DeepSeek-V3)."""
    dtype: DType
    """Element type of the cache."""

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of one layer: heads (1) x tokens x head size x dtype bytes."""
        return self.num_kv_heads * self.block_size * self.head_size * DTYPE_BYTES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.block_size, self.head_size)


class MambaSpec(StrictModel):
    """State-space (Mamba) layers: a fixed-size state per block, independent of ``block_size``."""

    type: Mamba = "mamba"
    """Spec type."""
    block_size: BlockSize
    """Tokens per block (does not change the page size)."""
    shapes: list[list[Annotated[int, Field(gt=0, le=MAX_TENSOR_BYTES)]]] = Field(min_length=1)
    """Shape of each state tensor (conv state, SSM state, ...)."""
    dtypes: list[DType] = Field(min_length=1)
    """Element type of each state tensor, in the order of ``shapes``."""

    @model_validator(mode="after")
    def _same_length(self) -> "MambaSpec":
        if len(self.dtypes) != len(self.shapes):
            raise ValueError(
                f"mamba spec has {len(self.shapes)} shapes but {len(self.dtypes)} dtypes; "
                "give one dtype per state tensor"
            )
        return self

    @property
    def page_size_bytes(self) -> int:
        """Sum over the state tensors of elements x dtype bytes."""
        return sum(math.prod(s) * DTYPE_BYTES[d] for s, d in zip(self.shapes, self.dtypes))

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Mamba states mix shapes and dtypes: a block is viewed as raw bytes."""
        return (self.page_size_bytes,)


KVCacheSpec = Annotated[
    Union[FullAttentionSpec, SlidingWindowSpec, MLAAttentionSpec, MambaSpec],
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------------------------
# The full config


class KVCacheTensor(StrictModel):
    """One backing tensor. Layer ``l`` (its index in ``layers``), block ``b`` starts at
    ``offset + l * layer_stride + b * block_stride`` bytes. Tensors of different groups may share
    one allocation (``alias_of``), as a hybrid model's groups do in vLLM: a block id belongs to one
    group at a time, so each group's layers use the same bytes for the blocks they hold."""

    size: int = Field(gt=0, le=MAX_TENSOR_BYTES)
    """Bytes of the tensor."""
    layers: list[str] = Field(min_length=1)
    """Layers placed in this tensor, in order."""
    layer_stride: int = Field(ge=0)
    """Bytes between the same block of consecutive layers."""
    block_stride: int = Field(ge=0)
    """Bytes between consecutive blocks of one layer."""
    offset: int = Field(0, ge=0)
    """Bytes before the first layer's first block."""
    alias_of: int | None = Field(None, ge=0)
    """Index of an earlier tensor whose allocation this one shares, from byte 0 (same size); unset:
    an allocation of its own."""


class KVCacheGroupSpec(StrictModel):
    """Layers that share one spec and one block table."""

    layer_names: list[str] = Field(min_length=1)
    """Layer names in this group."""
    kv_cache_spec: KVCacheSpec
    """The spec every layer of the group has."""


class KVCacheConfig(StrictModel):
    """The KV-cache layout a connector is constructed with (vLLM's ``KVCacheConfig``)."""

    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    """Blocks per layer."""
    kv_cache_tensors: list[KVCacheTensor]
    """Backing allocations and where each layer's blocks lie in them."""
    kv_cache_groups: list[KVCacheGroupSpec] = Field(min_length=1)
    """Groups of layers, each with one spec."""

    @model_validator(mode="after")
    def _invariants(self) -> "KVCacheConfig":
        problems = check_kv_cache_config(self)
        if problems:
            raise KVCacheInvariantError(problems)
        return self

    def layer_specs(self) -> dict[str, Any]:
        """Spec of each layer, by name, in group order."""
        return {n: g.kv_cache_spec for g in self.kv_cache_groups for n in g.layer_names}

    def group_of(self) -> dict[str, int]:
        """Index of each layer's KV-cache group, by name: whose block ids hold the layer's pages."""
        return {n: gi for gi, g in enumerate(self.kv_cache_groups) for n in g.layer_names}

    def allocations(self) -> list[list[int]]:
        """The tensors of each allocation, by index: a tensor with its aliases."""
        out: dict[int, list[int]] = {}
        for ti, t in enumerate(self.kv_cache_tensors):
            out.setdefault(ti if t.alias_of is None else t.alias_of, []).append(ti)
        return list(out.values())

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id takes: summed over the allocations, each counting its largest
        tensor's pages (the groups that share an allocation use its bytes in turn)."""
        specs = self.layer_specs()
        return sum(max(sum(specs[n].page_size_bytes for n in self.kv_cache_tensors[ti].layers) for ti in alloc)
                   for alloc in self.allocations())

    @property
    def total_bytes(self) -> int:
        """Bytes of the allocations (memory that tensors share counted once)."""
        return sum(t.size for t in self.kv_cache_tensors if t.alias_of is None)

    def placement(self) -> dict[str, tuple[int, int, int, int]]:
        """``layer -> (tensor index, start offset, block stride, page size)``."""
        specs = self.layer_specs()
        out = {}
        for ti, t in enumerate(self.kv_cache_tensors):
            for li, name in enumerate(t.layers):
                out[name] = (ti, t.offset + li * t.layer_stride, t.block_stride, specs[name].page_size_bytes)
        return out


def check_kv_cache_config(cfg: KVCacheConfig) -> list[Problem]:
    """Every invariant of a KV-cache config, as problems (empty when it holds)."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for gi, g in enumerate(cfg.kv_cache_groups):
        for name in g.layer_names:
            if name in seen:
                where = "twice in that group" if seen[name] == gi else f"in group {seen[name]} and group {gi}"
                problems.append(Problem(
                    f"kv_cache.kv_cache_groups.{gi}.layer_names", f"layer {name!r} is {where}",
                    value=name, fix="put every layer in exactly one group"))
            else:
                seen[name] = gi
    placed: dict[str, int] = {}
    for ti, t in enumerate(cfg.kv_cache_tensors):
        path = f"kv_cache.kv_cache_tensors.{ti}"
        pages = []
        for name in t.layers:
            if name in placed:
                problems.append(Problem(f"{path}.layers", f"layer {name!r} is placed in tensors {placed[name]} and {ti}",
                                        value=name, fix="place every layer in exactly one tensor"))
            placed[name] = ti
            if name not in seen:
                problems.append(Problem(f"{path}.layers", f"layer {name!r} is in no kv_cache_group", value=name,
                                        allowed=sorted(seen), fix="name only layers that a group lists"))
            else:
                pages.append(cfg.kv_cache_groups[seen[name]].kv_cache_spec.page_size_bytes)
        if not pages or len(pages) != len(t.layers):
            continue
        page, n, nb = max(pages), len(t.layers), cfg.num_blocks
        need = t.offset + (n - 1) * t.layer_stride + (nb - 1) * t.block_stride + page
        if nb > 1 and t.block_stride < page:
            problems.append(Problem(f"{path}.block_stride", f"blocks of one layer overlap: block_stride {t.block_stride} "
                                    f"is below the page size {page}", value=t.block_stride,
                                    fix=f"set block_stride to at least {page}"))
        layer_outer = t.layer_stride >= (nb - 1) * t.block_stride + page
        block_outer = t.layer_stride >= page and t.block_stride >= (n - 1) * t.layer_stride + page
        if n > 1 and not (layer_outer or block_outer):
            problems.append(Problem(f"{path}.layer_stride", "layers overlap: neither layer-outermost "
                                    f"(layer_stride >= {(nb - 1) * t.block_stride + page}) nor block-outermost "
                                    f"(block_stride >= {(n - 1) * t.layer_stride + page})", value=t.layer_stride,
                                    fix="use layer_stride = page x num_blocks, block_stride = page"))
        shared = t.alias_of is not None or any(u.alias_of == ti for u in cfg.kv_cache_tensors)
        if t.size < need or (t.size != need and not shared):  # a shared allocation may pad a short group
            problems.append(Problem(
                f"{path}.size", f"size does not match the placement: the last block of the last layer ends at {need} B",
                value=t.size, details=(f"offset {t.offset} + {n - 1} x layer_stride {t.layer_stride} + "
                                       f"{nb - 1} x block_stride {t.block_stride} + page {page} = {need}",),
                fix=f"set size to {need}"))
    for name, gi in seen.items():
        if name not in placed:
            problems.append(Problem(f"kv_cache.kv_cache_groups.{gi}.layer_names",
                                    f"layer {name!r} has no kv_cache_tensor", value=name,
                                    fix="add it to the layers of a kv_cache_tensor"))
    return problems + _alias_problems(cfg, seen)


def _alias_problems(cfg: KVCacheConfig, group_of: dict[str, int]) -> list[Problem]:
    """Aliasing is sound: a tensor shares an earlier tensor's allocation (not an alias itself) of
    its size, and the tensors of one allocation hold different groups' layers, so that a block id,
    which one group holds at a time, never means two layers' bytes at once."""
    problems = []
    tensors = cfg.kv_cache_tensors
    for ti, t in enumerate(tensors):
        if t.alias_of is None:
            continue
        path = f"kv_cache.kv_cache_tensors.{ti}.alias_of"
        target = tensors[t.alias_of] if t.alias_of < ti else None
        if target is None or target.alias_of is not None:
            problems.append(Problem(path, "alias_of must name an earlier tensor that has an allocation of its own",
                                    value=t.alias_of, allowed=[i for i in range(ti) if tensors[i].alias_of is None],
                                    fix="point alias_of at the first tensor of the allocation"))
        elif target.size != t.size:
            problems.append(Problem(f"kv_cache.kv_cache_tensors.{ti}.size", f"an alias of tensor {t.alias_of} has its "
                                    f"size ({target.size} B)", value=t.size, fix=f"set size to {target.size}"))
    for alloc in cfg.allocations():
        owners: dict[int, int] = {}
        for ti in alloc:
            for gi in {group_of[n] for n in tensors[ti].layers if n in group_of}:
                if gi in owners:
                    problems.append(Problem(
                        f"kv_cache.kv_cache_tensors.{ti}", f"tensors {owners[gi]} and {ti} share one allocation and "
                        f"both hold layers of group {gi}: their blocks would overlap", value=ti,
                        fix="let only tensors of different kv_cache_groups share an allocation"))
                owners[gi] = ti
    return problems


AnySpec = Union[FullAttentionSpec, SlidingWindowSpec, MLAAttentionSpec, MambaSpec]

SPEC_TYPES: dict[str, type[AnySpec]] = {
    "full_attention": FullAttentionSpec,
    "sliding_window": SlidingWindowSpec,
    "mla": MLAAttentionSpec,
    "mamba": MambaSpec,
}
"""The spec class of each ``type``."""


# --------------------------------------------------------------------------------------------
# One request of max_model_len (vLLM's check before it starts, and its maximum concurrency)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_memory_usage_bytes(spec: AnySpec, max_model_len: int, max_num_batched_tokens: int) -> int:
    """Bytes one layer of ``spec`` holds for one request of ``max_model_len`` tokens, as vLLM counts
    them: every block for full attention and MLA; for a sliding window only the window and the
    tokens in flight (``max_num_batched_tokens``), plus one block; one state for Mamba.

    >>> spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype="bfloat16")
    >>> max_memory_usage_bytes(spec, 2048, 2048) == 128 * 65536
    True
    """
    if isinstance(spec, MambaSpec):
        return spec.page_size_bytes
    if isinstance(spec, SlidingWindowSpec):
        tokens = min(spec.sliding_window - 1 + max_num_batched_tokens, max_model_len)
        return (_cdiv(tokens, spec.block_size) + 1) * spec.page_size_bytes
    return _cdiv(max_model_len, spec.block_size) * spec.page_size_bytes


def request_bytes(cfg: KVCacheConfig, max_model_len: int, max_num_batched_tokens: int) -> int:
    """Bytes one request of ``max_model_len`` tokens needs, summed over the layers."""
    return sum(max_memory_usage_bytes(s, max_model_len, max_num_batched_tokens) for s in cfg.layer_specs().values())


def estimate_max_model_len(cfg: KVCacheConfig, available: int, max_model_len: int,
                           max_num_batched_tokens: int) -> int:
    """The largest length in ``[1, max_model_len]`` whose request fits in ``available`` bytes (0
    when none does): vLLM's binary search."""
    lo, hi = 0, max_model_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if request_bytes(cfg, mid, max_num_batched_tokens) <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_concurrency(cfg: KVCacheConfig, max_model_len: int, max_num_batched_tokens: int) -> float:
    """Requests of ``max_model_len`` tokens that fit at once: the blocks a request takes in each
    group (from the one pool) against ``num_blocks``, as vLLM logs it."""
    per_request = sum(_cdiv(max_memory_usage_bytes(g.kv_cache_spec, max_model_len, max_num_batched_tokens),
                            g.kv_cache_spec.page_size_bytes) for g in cfg.kv_cache_groups)
    return cfg.num_blocks / per_request

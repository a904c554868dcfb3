"""The compact form of a KV-cache layout, as users write it in ``conf/kv_cache/*.yaml``: layer
count, heads, dtype, which layers form which group, and ``num_blocks`` or a ``memory`` budget.
:meth:`KVCacheLayout.to_config` derives the full :class:`~kvconf.config.kvcache.KVCacheConfig`
once, at validation.

>>> layout = KVCacheLayout(num_layers=4, block_size=16, dtype="float16", num_blocks=128,
...                        groups=[{"type": "full_attention", "num_kv_heads": 2, "head_size": 64}])
>>> cfg = layout.to_config()
>>> cfg.bytes_per_block, cfg.total_bytes
(32768, 4194304)
"""


import re
import string
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, PositiveInt, PrivateAttr, field_validator, model_validator

from kvconf.errors import Problem
from kvconf.units import MAX_MEMORY_BYTES, MemoryBytes, format_bytes, parse_bytes

from .base import StrictModel
from .kvcache import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    SPEC_TYPES,
    DType,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheInvariantError,
    KVCacheTensor,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

__all__ = ["DEFAULT_LAYER_NAME", "FullAttentionGroup", "GroupLayout", "KVCacheLayout", "MLAGroup", "MambaGroup",
           "SlidingWindowGroup"]

DEFAULT_LAYER_NAME = "model.layers.{i}.self_attn.attn"
MAX_LAYERS = 4096
"""More layers than any model has: a bound, so that a typo cannot plan for hours."""
MAX_MODEL_LEN = 2**31
"""Tokens in one request, at most (vLLM's positions are int32)."""

LayerOuter = Literal["LBHNC"]
BlockOuter = Literal["BLHNC"]
KVLayout = Literal[LayerOuter, BlockOuter]
"""Layer-outermost (vLLM's default) or block-outermost placement of the KV-cache bytes."""

_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?$")

LayerSelector = Union[Literal["all", "rest"], str, list[Union[int, str]]]


class _GroupLayout(StrictModel):
    """Fields a group adds to its spec in the compact form."""

    layers: LayerSelector = "all"
    """Which layers form the group: ``all``; ``rest`` (every layer no other group takes); a slice
    of layer indices such as ``"5::6"`` (5, 11, 17, ...); or a list of indices and names."""
    block_size: Optional[int] = Field(None, gt=0, le=MAX_BLOCK_SIZE)
    """Tokens per block; defaults to the layout's ``block_size``."""
    dtype: DType | None = None
    """Element type; defaults to the layout's ``dtype``."""


class FullAttentionGroup(_GroupLayout, FullAttentionSpec):
    """A group of full-attention layers."""


class SlidingWindowGroup(_GroupLayout, SlidingWindowSpec):
    """A group of sliding-window layers."""


class MLAGroup(_GroupLayout, MLAAttentionSpec):
    """A group of MLA layers."""


class MambaGroup(_GroupLayout, MambaSpec):
    """A group of Mamba layers."""

    dtypes: list[DType] | None = None  # type: ignore[assignment]
    """Element type of each state tensor; defaults to the layout's ``dtype`` for every one."""

    @model_validator(mode="after")
    def _same_length(self) -> "MambaGroup":
        if self.dtypes is not None and len(self.dtypes) != len(self.shapes):
            raise ValueError(
                f"mamba group has {len(self.shapes)} shapes but {len(self.dtypes)} dtypes; "
                "give one dtype per state tensor, or none to use the layout's dtype"
            )
        return self


GroupLayout = Annotated[
    Union[FullAttentionGroup, SlidingWindowGroup, MLAGroup, MambaGroup], Field(discriminator="type")
]


class KVCacheLayout(StrictModel):
    """A model's KV-cache layout as users write it (``conf/kv_cache/*.yaml``)."""

    model: str | None = None
    """A model's ``config.json`` (or the folder holding it) to read the layout from: the layer
    count, KV heads, head size, dtype, sliding-window layers, MLA latent and
    ``max_position_embeddings`` (the default ``max_model_len``). It replaces the layers and groups
    written here; ``block_size``, ``dtype``, ``max_model_len`` and ``tensor_parallel_size`` given
    here win over the file. Families: llama, mistral, qwen2, qwen3, gemma2, gemma3(_text), gpt_oss,
    deepseek_v2, deepseek_v3."""
    num_layers: Optional[int] = Field(None, gt=0, le=MAX_LAYERS)
    """Attention (and state) layers in the model (at most 4,096; the largest models have a few
    hundred); needed unless every group lists names."""
    layer_name: str = DEFAULT_LAYER_NAME
    """Name of layer ``i``; ``{i}`` is replaced by the index."""
    block_size: int = Field(16, gt=0, le=MAX_BLOCK_SIZE)
    """Tokens per block, for every group that does not set its own."""
    dtype: DType = "bfloat16"
    """Element type, for every group that does not set its own."""
    num_blocks: Optional[int] = Field(None, gt=0, le=MAX_BLOCKS)
    """Blocks per layer (at most 2**31). Give this or ``memory``, not both."""
    memory: MemoryBytes | None = None
    """A memory budget for the whole cache (``2GiB``, ``512MiB``, bytes); ``num_blocks`` is the
    largest count that fits. Give this or ``num_blocks``, not both."""
    groups: list[GroupLayout] | None = Field(None, min_length=1)
    """The layers of each attention type: a spec each (``type`` and its fields) and the layers it
    covers. The plan's KV-cache groups are made from them as vLLM makes them (see ``layout``)."""
    max_model_len: Optional[int] = Field(None, gt=0, le=MAX_MODEL_LEN)
    """The longest request, in tokens, that must fit: vLLM refuses to start when one request of
    this length does not fit in the budget (less one block), and says the largest length that
    would; kvconf does the same before anything is allocated. Unset: no check."""
    max_num_batched_tokens: PositiveInt = 2048
    """Tokens one engine step schedules (vLLM's scheduler default): with the window, how much a
    sliding-window layer holds for one request."""
    tensor_parallel_size: PositiveInt = 1
    """Workers a layer's KV heads are split across: each holds ``max(1, num_kv_heads // tp)``
    heads (fewer heads than workers: each holds one, replicated), as vLLM plans one worker."""
    pipeline_parallel_size: PositiveInt = 1
    """Workers the layers are split across, as vLLM splits them (an even share each, the
    remainder to the stages before the last). The plan is the first worker's; every worker takes
    the smallest ``num_blocks`` among them (``plan.workers`` lists each one)."""
    layout: KVLayout = "LBHNC"
    """Where a block's bytes lie: ``LBHNC`` (layer-outermost, vLLM's default: each layer's blocks
    contiguous) or ``BLHNC`` (block-outermost: each block's layers contiguous). Layers of equal
    specs form one KV-cache group; a hybrid model (several specs of one page size) is split into
    groups of equal size whose tensors share one allocation, as vLLM does. Specs of different page
    sizes need ``BLHNC``."""

    @model_validator(mode="before")
    @classmethod
    def _from_model(cls, data: Any) -> Any:
        """With ``model`` set, the file's layers and groups replace those written here, and its
        dtype and max_model_len fill those left unset."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            return data
        from .model_files import layout_from_model

        derived = layout_from_model(data["model"])
        out = {**data, "num_layers": derived["num_layers"], "groups": derived["groups"],
               "layer_name": DEFAULT_LAYER_NAME}
        for key in ("dtype", "max_model_len"):
            if out.get(key) is None and key in derived:
                out[key] = derived[key]
        return out

    @field_validator("layer_name")
    @classmethod
    def _layer_name(cls, v: str) -> str:
        if "{i}" not in v:
            raise ValueError(f"layer_name must contain '{{i}}' (the layer index), got {v!r}")
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"layer_name {v!r} is not a format string: {exc}; fix: use {{i}} alone") from None
        if any(f != "i" or spec or conv for f, spec, conv in fields) or len(v) > 256:
            raise ValueError(f"layer_name may hold only {{i}} (no other field, width or conversion), at most 256 "
                             f"characters, got {v!r}; fix: e.g. model.layers.{{i}}.self_attn.attn")
        return v

    _config: Optional[KVCacheConfig] = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _derivable(self) -> "KVCacheLayout":
        self._config = self._derive()  # raises KVCacheInvariantError with every problem
        return self

    _unified: Optional[KVCacheConfig] = PrivateAttr(default=None)
    _workers: dict[bool, list[dict[str, Any]]] = PrivateAttr(default_factory=dict)

    def to_config(self, hybrid: bool = True) -> KVCacheConfig:
        """The full :class:`KVCacheConfig` as vLLM plans it (derived once, when the layout is
        validated). ``hybrid=False`` is vLLM's plan with its hybrid KV-cache manager disabled, as
        for a connector that does not support it: sliding-window layers are planned as full
        attention, in one group, where the page sizes allow."""
        assert self._config is not None
        if hybrid or len(self._config.kv_cache_groups) == 1:
            return self._config
        if self._unified is None:
            self._unified = self._derive(hybrid=False)
        return self._unified

    def _derive(self, hybrid: bool = True) -> KVCacheConfig:
        if not self.groups:
            raise KVCacheInvariantError([Problem(
                "kv_cache.groups", "no layers are described: neither groups nor a model's config.json",
                fix="write kv_cache.groups (a spec and its layers each), or set kv_cache.model=PATH/config.json")])
        problems: list[Problem] = []
        names = [self.layer_name.format(i=i) for i in range(self.num_layers or 0)]
        groups: list[tuple[Any, list[str]]] = []
        owner: dict[str, int] = {}
        rest_index = None
        for gi, g in enumerate(self.groups):
            if g.layers == "rest":
                if rest_index is not None:
                    problems.append(Problem(f"kv_cache.groups.{gi}.layers", "only one group may take the rest",
                                            value="rest", fix="give this group an explicit selector"))
                rest_index = gi
                groups.append((g, []))
                continue
            chosen, sel_problems = self._select(gi, g.layers, names)
            problems += sel_problems
            for name in chosen:
                if name in owner:
                    where = "twice in this group" if owner[name] == gi else f"in group {owner[name]} and group {gi}"
                    problems.append(Problem(f"kv_cache.groups.{gi}.layers", f"layer {name!r} is {where}",
                                            value=name, fix="put every layer in exactly one group"))
                else:
                    owner[name] = gi
            groups.append((g, chosen))
        if rest_index is not None:
            groups[rest_index][1].extend(n for n in names if n not in owner)
            for n in groups[rest_index][1]:
                owner[n] = rest_index
        missing = [n for n in names if n not in owner]
        if missing:
            problems.append(Problem("kv_cache.groups", f"{len(missing)} layer(s) are in no group: {_short(missing)}",
                                    fix="cover every layer: add them to a group, or give one group layers: rest"))
        for gi, (_, chosen) in enumerate(groups):
            if not chosen and not any(p.path.startswith(f"kv_cache.groups.{gi}") for p in problems):
                problems.append(Problem(f"kv_cache.groups.{gi}.layers", "the group has no layers",
                                        fix="select at least one layer, or remove the group"))
        if problems:
            raise KVCacheInvariantError(problems)

        specs = []
        for g, chosen in groups:
            fields = g.model_dump(exclude={"layers"})
            fields["block_size"] = fields["block_size"] or self.block_size
            if isinstance(g, MambaGroup):
                fields["dtypes"] = fields["dtypes"] or [self.dtype] * len(g.shapes)
                fields.pop("dtype", None)
            else:
                fields["dtype"] = fields["dtype"] or self.dtype
            if "num_kv_heads" in fields and not isinstance(g, MLAGroup):  # each worker holds its heads
                fields["num_kv_heads"] = max(1, fields["num_kv_heads"] // self.tensor_parallel_size)
            specs.append((SPEC_TYPES[g.type](**fields), chosen))
        if not hybrid:
            specs = _unify(specs)
        groups_made = self._kv_cache_groups(specs, names)
        pages = {s.page_size_bytes for s, _ in groups_made}
        if len(pages) > 1 and self.layout != "BLHNC":
            raise KVCacheInvariantError([Problem(
                "kv_cache.layout", f"the layer-outermost layout cannot express this model's mixed page sizes "
                f"({', '.join(f'{p} B' for p in sorted(pages))}): vLLM's groups share one block size in bytes",
                value=self.layout, allowed=["BLHNC"], fix="set kv_cache.layout=BLHNC (block-outermost)")])
        # pipeline parallelism: each worker holds its stage's layers of every group (the groups are
        # made over the whole model, as vLLM makes them); all workers take the smallest num_blocks
        n_layers = sum(len(c) for _, c in groups_made)
        if self.pipeline_parallel_size > n_layers:
            raise KVCacheInvariantError([Problem(
                "kv_cache.pipeline_parallel_size", f"{self.pipeline_parallel_size} pipeline stages for {n_layers} "
                "layers: a stage would hold none", value=self.pipeline_parallel_size,
                fix=f"use at most {n_layers} stages")])
        stages = _stages([n for _, c in groups_made for n in c], names, self.pipeline_parallel_size)
        per_worker = [[(s, [n for n in c if n in stage]) for s, c in groups_made] for stage in stages]
        per_worker = [[(s, c) for s, c in w if c] for w in per_worker]
        sizes = [_bytes_per_block(w) for w in per_worker]
        own = [self._num_blocks(bpb, w) for bpb, w in zip(sizes, per_worker)]
        self._workers[hybrid] = [{"rank": r, "layers": [n for _, c in w for n in c], "bytes_per_block": bpb,
                          "num_blocks": n} for r, (w, bpb, n) in enumerate(zip(per_worker, sizes, own))]
        groups_made, num_blocks = per_worker[0], min(own)
        pages = {s.page_size_bytes for s, _ in groups_made}
        shared = len(pages) == 1
        group_size = max(len(c) for _, c in groups_made)
        tensors = []
        for k, (s, c) in enumerate(groups_made):
            page, width = s.page_size_bytes, (group_size if shared else len(c))
            outer = self.layout == "LBHNC"
            tensors.append(KVCacheTensor(
                size=width * page * num_blocks, layers=c,
                layer_stride=page * num_blocks if outer else page, block_stride=page if outer else width * page,
                alias_of=0 if shared and k else None))
        return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors,
                             kv_cache_groups=[KVCacheGroupSpec(layer_names=c, kv_cache_spec=s) for s, c in groups_made])

    @staticmethod
    def _kv_cache_groups(specs: list[tuple[Any, list[str]]], names: list[str]) -> list[tuple[Any, list[str]]]:
        """vLLM's KV-cache groups: layers of equal specs form a bucket, in layer order; one bucket
        is one group; several buckets of one page size are split into groups of ``group_size``
        layers (the smallest bucket's count, or the largest's when that is under 1.5 x the
        smallest), group ``i`` of a bucket taking ``layers[i::num_groups]``. Buckets of different
        page sizes stay one group each."""
        index = {n: i for i, n in enumerate(names)}
        spec_of = {n: s for s, chosen in specs for n in chosen}
        ordered = sorted(spec_of, key=lambda n: (index.get(n, len(index)), n))
        buckets: dict[str, tuple[Any, list[str]]] = {}
        for n in ordered:
            s = spec_of[n]
            buckets.setdefault(s.model_dump_json(), (s, []))[1].append(n)
        found = list(buckets.values())
        if len(found) == 1 or len({s.page_size_bytes for s, _ in found}) > 1:
            return found
        smallest, largest = min(len(c) for _, c in found), max(len(c) for _, c in found)
        group_size = largest if largest < smallest * 1.5 else smallest
        out: list[tuple[Any, list[str]]] = []
        for s, layers in found:
            num_groups = -(-len(layers) // group_size)
            out.extend((s, layers[i::num_groups]) for i in range(num_groups))
        return out

    def workers(self, hybrid: bool = True) -> list[dict[str, Any]]:
        """Each pipeline-parallel worker of :meth:`to_config`'s plan: its rank, its layers, its bytes
        per block and the blocks its budget alone would give (all take the smallest)."""
        self.to_config(hybrid)
        return [dict(w) for w in self._workers.get(hybrid, self._workers[True])]

    def _num_blocks(self, bytes_per_block: int, specs: list) -> int:
        if (self.num_blocks is None) == (self.memory is None):
            both = self.num_blocks is not None
            raise KVCacheInvariantError([Problem(
                "kv_cache", "both num_blocks and memory are set" if both else "neither num_blocks nor memory is set",
                fix="set exactly one: kv_cache.num_blocks=N or kv_cache.memory=SIZE (e.g. 2GiB)"
                + (" (kv_cache.num_blocks=null to use the budget)" if both else ""))])
        if self.num_blocks is not None:
            total = self.num_blocks * bytes_per_block
            if total > MAX_MEMORY_BYTES:
                raise KVCacheInvariantError([Problem(
                    "kv_cache.num_blocks", f"{self.num_blocks:,} blocks of {format_bytes(bytes_per_block)} are "
                    f"{format_bytes(total)}: more than any one machine's memory (kvconf's bound: "
                    f"{format_bytes(MAX_MEMORY_BYTES)})", value=self.num_blocks,
                    fix=f"give at most {MAX_MEMORY_BYTES // bytes_per_block:,} blocks, or kv_cache.memory=SIZE")])
            return self.num_blocks
        budget = parse_bytes(self.memory)  # type: ignore[arg-type]
        if budget < bytes_per_block:
            parts = " + ".join(f"{len(c)} x {s.page_size_bytes} B ({s.type})" for s, c in specs)
            raise KVCacheInvariantError([Problem(
                "kv_cache.memory", f"the budget {format_bytes(budget)} ({budget} B) is below one block",
                value=self.memory, details=(f"one block = {parts} = {bytes_per_block} B ({format_bytes(bytes_per_block)})",),
                fix=f"raise kv_cache.memory to at least {bytes_per_block} B, or set kv_cache.num_blocks")])
        return budget // bytes_per_block

    def _select(self, gi: int, sel: Any, names: list[str]) -> tuple[list[str], list[Problem]]:
        path = f"kv_cache.groups.{gi}.layers"
        if sel == "all":
            return list(names), []
        if isinstance(sel, str):
            m = _SLICE.match(sel)
            if not m:
                return [], [Problem(path, "not a layer selector", value=sel,
                                    allowed=["all", "rest", "start:stop:step", "[index or name, ...]"],
                                    fix="write a slice of layer indices such as '5::6', or list them")]
            start, stop, step = (int(x) if x not in (None, "") else None for x in m.groups())
            if step == 0:
                return [], [Problem(path, "a slice step cannot be 0", value=sel, fix="use a positive step")]
            return names[slice(start, stop, step)], []
        chosen, problems = [], []
        for item in sel:
            if isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < len(names):
                    problems.append(Problem(path, f"layer index {item} is out of range (num_layers={len(names)})",
                                            value=item, fix=f"use 0..{len(names) - 1}, or raise kv_cache.num_layers"))
                    continue
                chosen.append(names[item])
            elif names and str(item) not in names:  # with num_layers, a name is one of its layers
                problems.append(Problem(path, f"layer {item!r} is not one of the model's {len(names)} layers "
                                        f"(kv_cache.layer_name={self.layer_name!r})", value=item,
                                        fix="name an existing layer, use its index, or raise kv_cache.num_layers"))
            else:
                chosen.append(str(item))
        return chosen, problems


def _bytes_per_block(groups: list[tuple[Any, list[str]]]) -> int:
    """One block id's bytes: groups of one page size share an allocation, where a block holds the
    largest group's pages; groups of different page sizes (block-outermost) add up."""
    pages = {s.page_size_bytes for s, _ in groups}
    if len(pages) == 1:
        return max(len(c) for _, c in groups) * pages.pop()
    return sum(s.page_size_bytes * len(c) for s, c in groups)


def _stages(layers: list[str], names: list[str], pp: int) -> list[set[str]]:
    """vLLM's pipeline stages (``get_pp_indices``): ``len // pp`` layers each, the remainder one
    each to the stages before the last, in layer order.

    >>> [len(s) for s in _stages([str(i) for i in range(61)], [str(i) for i in range(61)], 4)]
    [15, 15, 16, 15]
    """
    index = {n: i for i, n in enumerate(names)}
    ordered = sorted(layers, key=lambda n: (index.get(n, len(index)), n))
    parts = [len(ordered) // pp] * pp
    for i in range(2, len(ordered) % pp + 2):
        parts[-i] += 1
    out, start = [], 0
    for p in parts:
        out.append(set(ordered[start:start + p]))
        start += p
    return out


def _unify(specs: list[tuple[Any, list[str]]]) -> list[tuple[Any, list[str]]]:
    """vLLM's ``unify_hybrid_kv_cache_specs``: with full-attention layers present, sliding-window
    layers of the same page size are planned as full attention (one group, no memory saved)."""
    full = [s for s, _ in specs if isinstance(s, FullAttentionSpec) and not isinstance(s, SlidingWindowSpec)]
    if not full or any(not isinstance(s, (FullAttentionSpec, SlidingWindowSpec)) for s, _ in specs):
        return specs
    out: list[tuple[Any, list[str]]] = []
    for s, chosen in specs:
        if isinstance(s, SlidingWindowSpec) and s.page_size_bytes == full[0].page_size_bytes:
            s = FullAttentionSpec(**s.model_dump(exclude={"type", "sliding_window"}))
        out.append((s, chosen))
    return out


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")

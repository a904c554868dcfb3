"""The validate layer: kvconf's config as frozen pydantic models, and everything that explains
them (diagnostics, override pre-checks, field docs, JSON Schemas).

=============  =================================================================================
module         what it holds
=============  =================================================================================
base           ``StrictModel``, the strict frozen base of every config model
kvcache        KV-cache specs, groups, tensors and ``KVCacheConfig`` (vLLM's), with its invariants
layout         the compact layout users write, and how the full config is derived from it
models         the whole job's config (``KVConfConfig``), ``validate`` and ``validate_extra``
diagnostics    pydantic errors told as ``Problem`` records (path, value, allowed, fix)
overrides      command-line overrides checked before Hydra composes (did-you-mean for typos)
fielddocs      field docstrings copied into descriptions, for ``--help`` and the JSON Schemas
jsonschema     the JSON Schemas generated from the models
vllm           vLLM's ``--kv-transfer-config`` as data: fields, connector names, extra keys, aliases
inputs         the one safe reader of YAML and JSON files: bounds on size, nesting, aliases
=============  =================================================================================

Nothing here imports torch, Hydra's app or a connector.
"""

from .kvcache import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from .layout import KVCacheLayout
from .models import ConnectorConfig, KVConfConfig, validate, validate_extra

__all__ = [
    "ConnectorConfig",
    "KVCacheConfig",
    "KVCacheGroupSpec",
    "KVCacheLayout",
    "KVCacheTensor",
    "KVConfConfig",
    "validate",
    "validate_extra",
]

"""kvconf inside vLLM: a plug-in connector that vLLM's own factory loads and constructs with its
three arguments, and that runs a kvconf-declared connector on vLLM's real KV cache.

vLLM is given (``--kv-transfer-config``, or ``LLM(kv_transfer_config=...)``)::

    {"kv_connector": "KVConfConnector", "kv_connector_module_path": "kvconf.vllm",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"kvconf_connector": {<kvconf's connector tree>}}}

which ``python -m kvconf connector=NAME action=export export.target=kvconf`` prints. Instead of
the tree inline, ``kv_connector_extra_config`` may name a kvconf config to compose:
``{"kvconf_overrides": ["connector=shared_storage", "connector.extra.capacity=8GiB"],
"kvconf_config_dir": "/path/to/conf"}`` (the directory is optional, as ``--config-dir`` is).

What is checked, and when:

- When vLLM resolves the class (in the process that builds vLLM's config, before the engine
  starts), the connector tree is validated, its class resolved and its constructor's contract
  checked: a wrong key or value, or a connector written ``__init__(self, config, role)``, stops
  vLLM there with kvconf's message (path, value, fix). vLLM hands a plug-in nothing but its class
  name at that point; kvconf reads the ``KVTransferConfig`` being resolved from the caller's frame
  (:func:`_transfer_config_in_caller`). Where it cannot find it, the same checks run at
  construction.
- At construction (scheduler in vLLM's engine core, worker in its worker, before vLLM allocates
  the KV cache), everything again, with vLLM's real ``KVCacheConfig`` as the plan, plus the
  connector's checks against that plan. kvconf also plans the same model and budget itself and
  logs a warning naming both figures where the two plans differ.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLASS_NAME", "CONFIG_DIR_KEY", "EXTRA_KEYS", "KVConfConnector", "MODULE", "OVERRIDES_KEY", "TREE_KEY"]

from kvconf.runtime.export import PLUGIN_CLASS as CLASS_NAME
from kvconf.runtime.export import PLUGIN_CONFIG_DIR_KEY as CONFIG_DIR_KEY
from kvconf.runtime.export import PLUGIN_EXTRA_KEYS as EXTRA_KEYS
from kvconf.runtime.export import PLUGIN_MODULE as MODULE
from kvconf.runtime.export import PLUGIN_OVERRIDES_KEY as OVERRIDES_KEY
from kvconf.runtime.export import PLUGIN_TREE_KEY as TREE_KEY


def __getattr__(name: str) -> Any:
    """``KVConfConnector``, served lazily so that vLLM's class resolution runs kvconf's checks on
    the tree it is resolving (vLLM's factory does ``getattr(module, kv_connector)``)."""
    if name == CLASS_NAME:
        from .plugin import KVConfConnector, check_at_resolution

        check_at_resolution()
        return KVConfConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

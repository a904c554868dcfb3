"""One class per contract case. This module imports no torch, like a user's connector module."""

from typing import Any

from kvconf import KVConnectorBase, KVConnectorMetadata
from kvconf_connectors.example import ExampleConnector


class _Trivial(KVConnectorBase):
    """Every abstract method, doing nothing."""

    def start_load_kv(self, forward_context, **kwargs): ...
    def wait_for_layer_load(self, layer_name): ...
    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs): ...
    def wait_for_save(self): ...
    def get_num_new_matched_tokens(self, request, num_computed_tokens): return 0, False
    def update_state_after_alloc(self, request, blocks, num_external_tokens): ...
    def build_connector_meta(self, scheduler_output): return KVConnectorMetadata()


class Good(ExampleConnector):
    """The contract: three positional arguments, passed to the base."""

    def __init__(self, config, role, kv_cache_config):
        super().__init__(config, role, kv_cache_config)


class Legacy(ExampleConnector):
    """A connector written before vLLM v0.12: two arguments."""

    def __init__(self, config, role):  # type: ignore[override]
        super().__init__(config, role, None)


class KwargsOnly(ExampleConnector):
    def __init__(self, config, role, **kwargs):
        super().__init__(config, role, kwargs.get("kv_cache_config"))


class KeywordOnly(ExampleConnector):
    def __init__(self, config, role, *, kv_cache_config):
        super().__init__(config, role, kv_cache_config)


class ExtraRequired(ExampleConnector):
    def __init__(self, config, role, kv_cache_config, tokenizer):
        super().__init__(config, role, kv_cache_config)


class Swallows(_Trivial):
    """Takes kv_cache_config but hands the base None."""

    def __init__(self, config, role, kv_cache_config):
        super().__init__(config, role, None)
        self.kv = kv_cache_config


class Abstract(KVConnectorBase):
    """Forgets the worker and scheduler methods."""


class SkipsBase(_Trivial):
    """Never calls the base __init__."""

    def __init__(self, config, role, kv_cache_config):
        self.kept = kv_cache_config


class Renamed(ExampleConnector):
    """A renamed third parameter: vLLM's name check rejects it, the engine's call would work."""

    def __init__(self, config, role, cache_cfg):
        super().__init__(config, role, cache_cfg)


class VarArgs(ExampleConnector):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)


def a_function(config, role, kv_cache_config):
    return None


NOT_A_CLASS = 42


# A class named like a built-in connector: with connector.module_path set, this one must win.
example = Good


class FailsAtRuntime(Good):
    """Passes the contract, then its load path breaks."""

    def start_load_kv(self, forward_context, **kwargs):
        raise OSError("the disk is on fire")


class LeaksCaches(Good):
    """Keeps the KV cache after shutdown()."""

    def register_kv_caches(self, kv_caches):
        super().register_kv_caches(kv_caches)
        self.kept = dict(kv_caches)


class Corrupts(Good):
    """Loads the blocks, then flips a byte of the first one."""

    def start_load_kv(self, forward_context, **kwargs):
        super().start_load_kv(forward_context, **kwargs)
        meta = self._get_connector_metadata()
        for load in meta.loads:
            view = next(iter(self._views.values()))
            view[load.block_ids[0][0]][0] ^= 0xFF  # group 0, its first block


class OneGroupOnly(KVConnectorBase):
    """A connector that does not handle hybrid groups (no SupportsHMA): vLLM plans one group for it."""

    def start_load_kv(self, forward_context, **kwargs):
        pass

    def wait_for_layer_load(self, layer_name):
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        pass

    def wait_for_save(self):
        pass

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        pass

    def build_connector_meta(self, scheduler_output):
        return KVConnectorMetadata()


class Plain:
    """Takes the three arguments but subclasses neither kvconf's base nor vLLM's: no connector API."""

    def __init__(self, config, role, kv_cache_config):
        self._kv_cache_config = kv_cache_config


class FreeForm(_Trivial):
    """Takes its extra settings free-form (no extra_config model)."""

"""Connectors written for vLLM itself (subclasses of vLLM's KVConnectorBase_V1), one per contract
case, mirroring zoo.connectors; and a class that subclasses neither base. Importing this module
needs vLLM (or tests/fake_vllm on the path); without either, kvconf reads it from source."""

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, SupportsHMA


class VGood(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)

    def start_load_kv(self, forward_context, **kwargs): ...
    def wait_for_layer_load(self, layer_name): ...
    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs): ...
    def wait_for_save(self): ...
    def get_num_new_matched_tokens(self, request, num_computed_tokens): return 0, False
    def update_state_after_alloc(self, request, blocks, num_external_tokens): ...
    def build_connector_meta(self, scheduler_output): return KVConnectorMetadata()


class VLegacy(VGood):
    def __init__(self, vllm_config, role):
        super().__init__(vllm_config, role, None)


class VKwargsOnly(VGood):
    def __init__(self, vllm_config, role, **kwargs):
        super().__init__(vllm_config, role, kwargs.get("kv_cache_config"))


class VAbstract(KVConnectorBase_V1):
    def start_load_kv(self, forward_context, **kwargs): ...


class VHybrid(VGood, SupportsHMA):
    """Handles a hybrid model's groups (vLLM's SupportsHMA)."""

    def request_finished_all_groups(self, request, block_ids): return False, None

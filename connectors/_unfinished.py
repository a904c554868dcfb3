"""Shared by the built-in connectors whose data path is not written yet: their config schema,
contract and export are real; ``action=run`` says plainly that the transfer path is missing."""

from __future__ import annotations

from typing import Any, Optional

from kvconf.connector import KVCacheBlocks, KVConnectorBase, KVConnectorMetadata, Request, SchedulerOutput
from kvconf.errors import ConnectorRuntimeError, Problem


class UnfinishedConnector(KVConnectorBase):
    """Config, contract and export only; every data-path method raises."""

    issue: str = ""

    def _missing(self) -> ConnectorRuntimeError:
        name = self.config.name
        return ConnectorRuntimeError(Problem(
            "connector.name", f"the {name} connector's data path is not implemented yet ({self.issue})",
            value=name, fix=f"use action=check or action=export with connector={name}, or connector=example to run"))

    def self_test(self, kv_caches: Any, ctx: Any) -> dict[str, Any]:
        raise self._missing()

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        raise self._missing()

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        raise self._missing()

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        raise self._missing()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        raise self._missing()

    def wait_for_layer_load(self, layer_name: str) -> None:
        raise self._missing()

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        raise self._missing()

    def wait_for_save(self) -> None:
        raise self._missing()

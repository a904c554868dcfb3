"""``action=export`` prints JSON that vLLM's KVTransferConfig accepts.

``KVTransferConfig`` below replicates vLLM 0.32's (``vllm/config/kv_transfer.py``):
a pydantic dataclass with ``extra="forbid"``, ``kv_role`` required once a connector is named.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

import pytest
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from conftest import run_kvconf


@dataclass(config=ConfigDict(extra="forbid"))
class KVTransferConfig:
    kv_connector: Optional[str] = None
    engine_id: Optional[str] = None
    kv_buffer_device: str = "cuda"
    kv_role: Optional[Literal["kv_producer", "kv_consumer", "kv_both"]] = None
    kv_port: int = 14579
    kv_connector_extra_config: dict[str, Any] = None  # type: ignore[assignment]
    kv_connector_module_path: Optional[str] = None
    enable_permute_local_kv: bool = False
    kv_load_failure_policy: Literal["recompute", "fail"] = "fail"

    def __post_init__(self) -> None:
        if self.kv_connector is not None and self.kv_role is None:
            raise ValueError("Please specify kv_role when kv_connector is set")
        if self.kv_connector_module_path == "":
            raise ValueError("kv_connector_module_path cannot be an empty string.")


def export(workdir, *overrides: str) -> tuple[dict[str, Any], KVTransferConfig]:
    proc = run_kvconf("action=export", *overrides, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    return json.loads(text), TypeAdapter(KVTransferConfig).validate_json(text)


def test_mooncake_exports_vllms_mooncake_connector_with_its_extra_keys(workdir):
    data, ktc = export(workdir, "connector=mooncake", "connector.kv_role=kv_producer",
                       "connector.extra.protocol=tcp", "connector.extra.num_workers=4")
    assert ktc.kv_connector == "MooncakeConnector" and ktc.kv_role == "kv_producer"
    assert ktc.kv_connector_extra_config == {"mooncake_protocol": "tcp", "num_workers": 4}


def test_mooncake_auto_protocol_is_left_to_vllms_default_not_this_machines_transport(workdir):
    data, ktc = export(workdir, "connector=mooncake")
    # vLLM has no "auto": it takes rdma when the key is absent; the exporting host's tcp would be wrong
    assert "mooncake_protocol" not in ktc.kv_connector_extra_config


def test_vllm_only_extra_keys_and_permute_flag_pass_through_export(workdir):
    data, ktc = export(workdir, "connector=nixl", "+connector.vllm_extra_config.enforce_handshake_compat=false",
                       "connector.enable_permute_local_kv=true")
    assert ktc.kv_connector_extra_config["enforce_handshake_compat"] is False
    assert ktc.enable_permute_local_kv is True


def test_vllm_extra_config_key_that_vllms_connector_does_not_read_exits_2(workdir):
    proc = run_kvconf("action=export", "connector=nixl", "+connector.vllm_extra_config.enforce_handshake=false",
                      cwd=workdir)
    assert proc.returncode == 2
    assert "connector.vllm_extra_config.enforce_handshake" in proc.stderr
    assert "enforce_handshake_compat" in proc.stderr  # did you mean


def test_offloading_exports_cpu_bytes_to_use_in_bytes(workdir):
    data, ktc = export(workdir, "connector=offloading", "connector.extra.cpu_bytes_to_use=4GiB",
                       "connector.extra.block_size=64")
    assert ktc.kv_connector == "OffloadingConnector"
    assert ktc.kv_connector_extra_config == {"cpu_bytes_to_use": 4 << 30, "block_size": 64, "eviction_policy": "lru"}


def test_shared_storage_exports_vllms_example_connector(workdir):
    data, ktc = export(workdir, "connector=shared_storage", "connector.extra.shared_storage_path=/data/kv",
                       "connector.kv_load_failure_policy=recompute")
    assert ktc.kv_connector == "ExampleConnector" and ktc.kv_load_failure_policy == "recompute"
    assert ktc.kv_connector_extra_config == {"shared_storage_path": "/data/kv"}


def test_external_connector_exports_its_module_path(workdir):
    data, ktc = export(workdir, "connector.module_path=zoo.connectors", "connector.name=Good",
                       "connector.engine_id=engine-7", "connector.kv_buffer_device=cpu")
    assert (ktc.kv_connector, ktc.kv_connector_module_path) == ("Good", "zoo.connectors")
    assert ktc.engine_id == "engine-7" and ktc.kv_buffer_device == "cpu"


def test_generated_engine_id_is_not_exported(workdir):
    data, _ = export(workdir, "connector=mooncake")
    assert "engine_id" not in data


def test_example_connector_has_no_vllm_counterpart(workdir):
    proc = run_kvconf("action=export", cwd=workdir)
    assert proc.returncode == 2 and "no vLLM counterpart" in proc.stderr


def test_replica_rejects_what_vllm_rejects():
    with pytest.raises(ValidationError):
        TypeAdapter(KVTransferConfig).validate_json('{"kv_connector": "X", "kv_role": "kv_producer", "kv_ip": "1"}')
    with pytest.raises(ValidationError):
        TypeAdapter(KVTransferConfig).validate_json('{"kv_connector": "X"}')


def test_mooncake_export_says_where_kvconfs_connector_differs_from_vllms(workdir):
    proc = run_kvconf("action=export", "connector=mooncake", cwd=workdir)
    assert proc.returncode == 0
    json.loads(proc.stdout)  # stdout stays the JSON alone
    assert "bootstrap server" in proc.stderr and "side_channel" in proc.stderr


@pytest.mark.parametrize(("override", "said"), [
    ("connector.extra.mooncake_protocol=tcp", "kvconf calls it connector.extra.protocol"),
    ("connector.kv_connector=MooncakeConnector", "kvconf calls it connector.name"),
    ("connector.kv_ip=10.0.0.1", "vLLM removed 'kv_ip'"),
    ("connector.extra.bootstrap_server_address=10.0.0.2:8998", "connector.vllm_extra_config.bootstrap_server_address"),
])
def test_vllm_spellings_in_overrides_are_told_in_kvconfs_terms(override, said, workdir):
    proc = run_kvconf("connector=mooncake", override, "action=check", cwd=workdir)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr

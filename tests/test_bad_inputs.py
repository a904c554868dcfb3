"""Bad inputs (#13, in part): each is a config error (exit 2) at check time, naming its key, before
anything is allocated. In-process through the compose API, for speed; the CLI's own handling of
errors (one message, no traceback) is tested in test_cli.py."""

from __future__ import annotations

import pytest

from kvconf.errors import KVConfError
from kvconf.runtime.pipeline import run_job

CASES = [
    (("connector=mooncake", "connector.extra.transfer_timeout=inf"), "connector.extra.transfer_timeout"),
    (("connector=mooncake", "connector.extra.handshake_timeout=nan"), "connector.extra.handshake_timeout"),
    (("connector=nixl", "connector.extra.transfer_timeout=-1"), "connector.extra.transfer_timeout"),
    (("self_test.timeout=inf",), "self_test.timeout"),
    (("connector=mooncake", "connector.extra.peer=notanaddress"), "connector.extra.peer"),
    (("connector=mooncake", "connector.extra.peer=127.0.0.1:99999"), "connector.extra.peer"),
    (("connector=mooncake", "connector.extra.peer=:5000"), "connector.extra.peer"),
    (("connector=mooncake", "connector.extra.side_channel_host=no such host"), "connector.extra.side_channel_host"),
    (("connector=nixl", "connector.extra.side_channel_host=a..b"), "connector.extra.side_channel_host"),
    (("connector=nixl", "connector.extra.backends=[BOGUS]"), "connector.extra.backends.0"),
    (("connector=nixl", "connector.extra.backends=[]"), "connector.extra.backends"),
    (("connector=offloading", "connector.extra.block_size=17"), "connector.extra.block_size"),
    (("connector=offloading", "connector.extra.cpu_bytes_to_use=1KiB"), "connector.extra.cpu_bytes_to_use"),
    (("connector=offloading", "connector.extra.cpu_bytes_to_use=0"), "connector.extra.cpu_bytes_to_use"),
    (("kv_cache.num_layers=100000000",), "kv_cache.num_layers"),
    (("kv_cache.num_layers=0",), "kv_cache.num_layers"),
    (("kv_cache.num_blocks=4294967296",), "kv_cache.num_blocks"),
    (("connector.kv_role=producer",), "connector.kv_role"),
    (("connector.kv_port=70000",), "connector.kv_port"),
    (("connector.kv_load_failure_policy=retry",), "connector.kv_load_failure_policy"),
    (("connector.kv_buffer_device=gpu",), "connector.kv_buffer_device"),
    (("connector.name=mooncak",), "connector.name"),
    (("connector.name=SharedStorageConnector",), "connector.name"),
    (("connector.module_path=''",), "connector.module_path"),
    (("connector=multi", "connector.extra.connectors=[]"), "connector.extra.connectors"),
    (("connector=multi", "connector.extra.connectors=[{name: nixl}]"), "connector.extra.connectors.0.kv_role"),
    (("device=tpu",), "device"),
    (("action=launch",), "action"),
    (("kv_cache.dtype=float7",), "kv_cache.dtype"),
]


@pytest.mark.parametrize(("overrides", "key"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_a_config_error_naming_its_key(overrides, key, compose):
    data = compose(*overrides)
    with pytest.raises(KVConfError) as err:
        run_job({**data, "action": data.get("action", "check") if "action=" in " ".join(overrides) else "check"})
    assert err.value.exit_code == 2
    assert key in [p.path for p in err.value.problems], err.value.render()

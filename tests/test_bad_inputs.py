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

CASES += [
    # connector fields
    (("connector.kv_role=null",), "connector.kv_role"),
    (("connector.kv_role=1",), "connector.kv_role"),
    (("connector.kv_role=KV_PRODUCER",), "connector.kv_role"),
    (("connector.kv_port=0",), "connector.kv_port"),
    (("connector.kv_port=-1",), "connector.kv_port"),
    (("connector.kv_port=abc",), "connector.kv_port"),
    (("connector.kv_port=1.5",), "connector.kv_port"),
    (("connector.engine_id=[1,2]",), "connector.engine_id"),
    (("connector.enable_permute_local_kv=maybe",), "connector.enable_permute_local_kv"),
    (("connector.name=''",), "connector.name"),
    (("connector.name=NixlConnector",), "connector.name"),
    (("connector.name=P2pNcclConnector",), "connector.name"),
    (("connector.name=MultiConnector",), "connector.name"),
    (("connector.extra.capacity=0",), "connector.extra.capacity"),
    (("connector.extra.capacity=-1GiB",), "connector.extra.capacity"),
    (("connector.extra.capacity=lots",), "connector.extra.capacity"),
    (("connector.extra.capacity=1GB/s",), "connector.extra.capacity"),
    (("+connector.extra.capacityy=1GiB",), "connector.extra.capacityy"),
    (("+connector.kv_rank=0",), "connector.kv_rank"),
    (("+connector.kv_ip=10.0.0.1",), "connector.kv_ip"),
    (("+connector.kv_parallel_size=2",), "connector.kv_parallel_size"),
    (("+connector.kv_buffer_size=1e9",), "connector.kv_buffer_size"),
    (("+connector.kv_producer=kv_consumer",), "connector.kv_producer"),
    (("+connector.kv_connector=NixlConnector",), "connector.kv_connector"),
    (("+connector.vllm_extra_config.anything=1",), "connector.vllm_extra_config"),
    (("connector=nixl", "+connector.vllm_extra_config.enforce_handshake=1"), "connector.vllm_extra_config.enforce_handshake"),
    (("connector=nixl", "+connector.vllm_extra_config.backends=[UCX]"), "connector.vllm_extra_config.backends"),
    # mooncake / nixl extras
    (("connector=mooncake", "connector.extra.protocol=nvlink"), "connector.extra.protocol"),
    (("connector=mooncake", "connector.extra.num_workers=0"), "connector.extra.num_workers"),
    (("connector=mooncake", "connector.extra.num_workers=-3"), "connector.extra.num_workers"),
    (("connector=mooncake", "connector.extra.side_channel_port=70000"), "connector.extra.side_channel_port"),
    (("connector=mooncake", "connector.extra.side_channel_port=-1"), "connector.extra.side_channel_port"),
    (("connector=mooncake", "connector.extra.handshake_timeout=0"), "connector.extra.handshake_timeout"),
    (("connector=mooncake", "+connector.extra.mooncake_protocol=tcp"), "connector.extra.mooncake_protocol"),
    (("connector=mooncake", "+connector.extra.bootstrap_server_address=h:1"), "connector.extra.bootstrap_server_address"),
    (("connector=mooncake", "connector.extra.peer=host:"), "connector.extra.peer"),
    (("connector=mooncake", "connector.extra.peer=host:port"), "connector.extra.peer"),
    (("connector=nixl", "connector.extra.mode=both"), "connector.extra.mode"),
    (("connector=nixl", "connector.extra.num_threads=-1"), "connector.extra.num_threads"),
    (("connector=nixl", "connector.extra.backends=UCX"), "connector.extra.backends"),
    (("connector=nixl", "+connector.extra.enforce_handshake_compat=false"), "connector.extra.enforce_handshake_compat"),
    # offloading / shared_storage extras
    (("connector=offloading", "connector.extra.eviction_policy=fifo"), "connector.extra.eviction_policy"),
    (("connector=offloading", "connector.extra.block_size=0"), "connector.extra.block_size"),
    (("connector=offloading", "+connector.extra.num_cpu_blocks=100"), "connector.extra"),
    (("connector=offloading", "~connector.extra.cpu_bytes_to_use"), "connector.extra.cpu_bytes_to_use"),
    (("connector=shared_storage", "connector.extra.shared_storage_path=''"), "connector.extra.shared_storage_path"),
    (("connector=shared_storage", "connector.extra.capacity=0"), "connector.extra.capacity"),
    # multi
    (("connector=multi", "connector.extra.connectors=[nixl]"), "connector.extra.connectors.0"),
    (("connector=multi", "connector.extra.connectors=[{name: nixl, kv_role: kv_both, engine_id: x}]"),
     "connector.extra.connectors.0.engine_id"),
    (("connector=multi", "connector.extra.connectors=[{name: example, kv_role: kv_both}, {name: example, kv_role: kv_both}]"),
     "connector.extra.connectors.1.name"),
    (("connector=multi", "connector.extra.connectors=[{name: nope, kv_role: kv_both}]"), "connector.extra.connectors.0.name"),
    (("connector=multi", "connector.extra.connectors=[{name: offloading, kv_role: kv_both, extra: {cpu_bytes_to_use: 0}}]"),
     "connector.extra.connectors.0.extra.cpu_bytes_to_use"),
    (("connector=multi", "~connector.extra.connectors"), "connector.extra.connectors"),
    # kv_cache
    (("kv_cache.block_size=0",), "kv_cache.block_size"),
    (("kv_cache.block_size=-16",), "kv_cache.block_size"),
    (("kv_cache.dtype=int3",), "kv_cache.dtype"),
    (("kv_cache.num_blocks=0",), "kv_cache.num_blocks"),
    (("kv_cache.num_blocks=abc",), "kv_cache.num_blocks"),
    (("kv_cache.memory=0",), "kv_cache.memory"),
    (("kv_cache.memory=lots",), "kv_cache.memory"),
    (("kv_cache.memory=1GiB",), "kv_cache"),
    (("kv_cache.max_model_len=0",), "kv_cache.max_model_len"),
    (("kv_cache.max_num_batched_tokens=0",), "kv_cache.max_num_batched_tokens"),
    (("kv_cache.tensor_parallel_size=0",), "kv_cache.tensor_parallel_size"),
    (("kv_cache.pipeline_parallel_size=0",), "kv_cache.pipeline_parallel_size"),
    (("kv_cache.pipeline_parallel_size=8",), "kv_cache.pipeline_parallel_size"),
    (("kv_cache.layout=HND",), "kv_cache.layout"),
    (("kv_cache.groups=[]",), "kv_cache.groups"),
    (("kv_cache.groups.0.type=flash",), "kv_cache.groups.0.type"),
    (("kv_cache.groups.0.num_kv_heads=0",), "kv_cache.groups.0.num_kv_heads"),
    (("kv_cache.groups.0.head_size=-1",), "kv_cache.groups.0.head_size"),
    (("kv_cache.groups.0.layers=[0,1,2,3,ghost]",), "kv_cache.groups.0.layers"),
    (("kv_cache.groups.0.layers=[0,1,2,3,9]",), "kv_cache.groups.0.layers"),
    (("kv_cache.groups.0.layers=7::2",), "kv_cache.groups.0.layers"),
    (("kv_cache.layer_name=layer",), "kv_cache.layer_name"),
    (("kv_cache.layer_name='x{i}{j}'",), "kv_cache.layer_name"),
    # top level
    (("device=cuda:x",), "device"),
    (("device=gpu",), "device"),
    (("output=yaml",), "output"),
    (("debug=maybe",), "debug"),
    (("self_test.requests=0",), "self_test.requests"),
    (("self_test.max_bytes=0",), "self_test.max_bytes"),
    (("self_test.transfer_bytes=-1",), "self_test.transfer_bytes"),
    (("self_test.timeout=0",), "self_test.timeout"),
    (("bench.requests=0",), "bench.requests"),
    (("bench.shared_prefix=1.5",), "bench.shared_prefix"),
    (("bench.repetitions=0",), "bench.repetitions"),
    (("bench.warmup=-1",), "bench.warmup"),
    (("+extra_top=1",), "extra_top"),
]

CASES += [
    (("connector.kv_role=''",), "connector.kv_role"),
    (("connector.kv_role=[kv_producer]",), "connector.kv_role"),
    (("connector.kv_port=true",), "connector.kv_port"),
    (("connector.kv_port=65536",), "connector.kv_port"),
    (("connector.kv_buffer_device=CUDA",), "connector.kv_buffer_device"),
    (("connector.kv_load_failure_policy=''",), "connector.kv_load_failure_policy"),
    (("connector.kv_load_failure_policy=RECOMPUTE",), "connector.kv_load_failure_policy"),
    (("connector.module_path=' '",), "connector.module_path"),
    (("connector.name=[a]",), "connector.name"),
    (("connector.extra=5",), "connector.extra"),
    (("connector.extra.capacity=[1]",), "connector.extra.capacity"),
    (("connector.extra.capacity=1.5",), "connector.extra.capacity"),
    (("connector.extra.capacity=true",), "connector.extra.capacity"),
    (("connector=mooncake", "connector.extra.protocol=''"), "connector.extra.protocol"),
    (("connector=mooncake", "connector.extra.protocol=RDMA"), "connector.extra.protocol"),
    (("connector=mooncake", "connector.extra.device_name=[mlx5_0]"), "connector.extra.device_name"),
    (("connector=mooncake", "connector.extra.num_workers=2.5"), "connector.extra.num_workers"),
    (("connector=mooncake", "connector.extra.transfer_timeout=-inf"), "connector.extra.transfer_timeout"),
    (("connector=mooncake", "connector.extra.handshake_timeout=abc"), "connector.extra.handshake_timeout"),
    (("connector=mooncake", "connector.extra.peer=[1]"), "connector.extra.peer"),
    (("connector=mooncake", "connector.extra.side_channel_host=''"), "connector.extra.side_channel_host"),
    (("connector=nixl", "connector.extra.progress_thread=maybe"), "connector.extra.progress_thread"),
    (("connector=nixl", "connector.extra.num_workers=0"), "connector.extra.num_workers"),
    (("connector=nixl", "connector.extra.backends=[ucx]"), "connector.extra.backends.0"),
    (("connector=offloading", "connector.extra.cpu_bytes_to_use=-1"), "connector.extra.cpu_bytes_to_use"),
    (("connector=offloading", "connector.extra.cpu_bytes_to_use=1ZiB"), "connector.extra.cpu_bytes_to_use"),
    (("connector=offloading", "connector.extra.block_size=-16"), "connector.extra.block_size"),
    (("connector=shared_storage", "connector.extra.capacity=-5"), "connector.extra.capacity"),
    (("connector=shared_storage", "+connector.extra.path=/x"), "connector.extra.path"),
    (("kv_cache.num_layers=-1",), "kv_cache.num_layers"),
    (("kv_cache.num_layers=4097",), "kv_cache.num_layers"),
    (("kv_cache.num_layers=2.5",), "kv_cache.num_layers"),
    (("kv_cache.block_size=abc",), "kv_cache.block_size"),
    (("kv_cache.dtype=''",), "kv_cache.dtype"),
    (("kv_cache.layer_name='{i:>300000000}'",), "kv_cache.layer_name"),
    (("kv_cache.layer_name='{i!r}'",), "kv_cache.layer_name"),
    (("kv_cache.layer_name='{'",), "kv_cache.layer_name"),
    (("kv_cache.layer_name=no_index",), "kv_cache.layer_name"),
    (("kv_cache.groups.0.layers=all_of_them",), "kv_cache.groups.0.layers"),
    (("kv_cache.groups.0.layers=0::0",), "kv_cache.groups.0.layers"),
    (("kv_cache.groups.0.layers=[-1]",), "kv_cache.groups.0.layers"),
    (("kv_cache.groups.0.layers=[0,0,1,2,3]",), "kv_cache.groups.0.layers"),
    (("+kv_cache.groups.0.sliding_window=1024",), "kv_cache.groups.0.sliding_window"),
    (("kv_cache.max_model_len=-5",), "kv_cache.max_model_len"),
    (("kv_cache.memory=1GiB", "kv_cache.num_blocks=null", "kv_cache.max_model_len=100000000"), "kv_cache.max_model_len"),
    (("kv_cache.tensor_parallel_size=abc",), "kv_cache.tensor_parallel_size"),
    (("device=cuda:-1",), "device"),
    (("device=''",), "device"),
    (("action=''",), "action"),
    (("self_test.requests=-2",), "self_test.requests"),
    (("self_test.max_bytes=abc",), "self_test.max_bytes"),
    (("bench.shared_prefix=-0.1",), "bench.shared_prefix"),
    (("bench.concurrency=0",), "bench.concurrency"),
    (("bench.raw=maybe",), "bench.raw"),
    (("connector=mooncake", "connector.extra.auth_key_file=/nonexistent/kvconf.key"), "connector.extra.auth_key_file"),
    (("connector=nixl", "connector.extra.auth_key_file=/"), "connector.extra.auth_key_file"),
    (("connector=mooncake", "connector.extra.auth_key_file=''"), "connector.extra.auth_key_file"),
    (("connector=shared_storage", "connector.extra.hmac_key_file=/nonexistent/kvconf.key"),
     "connector.extra.hmac_key_file"),
    (("connector=shared_storage", "connector.extra.hmac_key_file=/dev/null"), "connector.extra.hmac_key_file"),
    (("connector=multi", "+connector.extra.connectors.0.extra={auth_key_file: /nonexistent}"),
     "connector.extra.connectors.0.extra.auth_key_file"),
]


@pytest.mark.parametrize(("overrides", "key"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_a_config_error_naming_its_key(overrides, key, compose):
    data = compose(*overrides)
    with pytest.raises(KVConfError) as err:
        run_job({**data, "action": data.get("action", "check") if "action=" in " ".join(overrides) else "check"})
    assert err.value.exit_code == 2
    assert key in [p.path for p in err.value.problems], err.value.render()


DEEP = "a: " + "[" * 200 + "]" * 200 + "\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(12))
FILES = {
    "duplicate-key": ("name: example\nkv_role: kv_both\nname: example\n", 3),
    "not-yaml": ("name: [example\n", 2),
    "not-utf8": (b"name: example\nkv_role: \xff\xfe\n", 2),
    "deep-nesting": (DEEP, 1),
    "alias-bomb": (BOMB, None),
}


def test_a_model_file_that_does_not_exist_exits_2_naming_kv_cache_model(tmp_path):
    import subprocess
    import sys

    from conftest import kvconf_env

    proc = subprocess.run([sys.executable, "-m", "kvconf", "kv_cache.model=/nonexistent/config.json", "action=check"],
                          cwd=tmp_path, env=kvconf_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "kv_cache.model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", list(FILES))
def test_a_malformed_yaml_file_in_a_config_dir_is_one_message_with_its_line(kind, tmp_path):
    import subprocess
    import sys

    from conftest import kvconf_env

    text, line = FILES[kind]
    folder = tmp_path / "conf" / "connector"
    folder.mkdir(parents=True)
    target = folder / "mine.yaml"
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    proc = subprocess.run([sys.executable, "-m", "kvconf", "--config-dir", str(tmp_path / "conf"), "connector=mine",
                           "action=check"], cwd=tmp_path, env=kvconf_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{target}:{line}" in proc.stderr if line else str(target) in proc.stderr


SAMPLE = CASES[::17]
"""A sample of the cases through the command line itself (each is a process: about a second)."""


@pytest.mark.parametrize(("overrides", "key"), SAMPLE, ids=[" ".join(o) for o, _ in SAMPLE])
def test_bad_input_on_the_command_line_is_one_message_exit_2(overrides, key, tmp_path):
    import subprocess
    import sys

    from conftest import kvconf_env

    action = [] if any(o.startswith("action=") for o in overrides) else ["action=check"]
    proc = subprocess.run([sys.executable, "-m", "kvconf", *overrides, *action], cwd=tmp_path, env=kvconf_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""

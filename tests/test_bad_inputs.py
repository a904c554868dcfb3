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

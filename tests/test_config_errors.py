"""Each bad input gets one clear message: the config path, the value, what is allowed, the fix."""

from __future__ import annotations

import copy

import pytest

from kvconf.errors import ConfigError, ContractError, KVConfError
from kvconf.runtime.pipeline import run_job


def problems(data) -> list:
    with pytest.raises(KVConfError) as exc:
        run_job(data)
    assert exc.value.exit_code == 2
    return exc.value.problems


def only(data, path: str):
    found = [p for p in problems(data) if p.path == path]
    assert found, f"no problem at {path}"
    return found[0]


@pytest.fixture
def base(compose):
    return compose("action=check")


def edit(data, dotted: str, value):
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_unknown_connector_key_is_named_with_a_did_you_mean(base):
    data = edit(base, "connector.kv_rol", "kv_both")
    p = only(data, "connector.kv_rol")
    assert "unknown key" in p.message and p.suggestion() == "kv_role"
    assert "kv_role" in p.allowed


def test_unknown_key_in_a_kv_cache_group_is_rejected(base):
    p = only(edit(base, "kv_cache.groups.0.head_sise", 64), "kv_cache.groups.0.head_sise")
    assert p.suggestion() == "head_size"


def test_unknown_top_level_key_is_rejected(base):
    p = only(edit(base, "devise", "cpu"), "devise")
    assert p.suggestion() == "device"


def test_wrong_type_names_the_path_and_the_value(base):
    p = only(edit(base, "kv_cache.groups.0.num_kv_heads", "eight"), "kv_cache.groups.0.num_kv_heads")
    assert p.value == "eight" and "integer" in p.message and p.fix


def test_bad_kv_role_lists_the_allowed_roles_and_the_nearest(base):
    p = only(edit(base, "connector.kv_role", "kv_prodcer"), "connector.kv_role")
    assert p.allowed == ["kv_producer", "kv_consumer", "kv_both"]
    assert p.suggestion() == "kv_producer" and p.value == "kv_prodcer"


def test_missing_kv_role_is_required(base):
    data = copy.deepcopy(base)
    del data["connector"]["kv_role"]
    p = only(data, "connector.kv_role")
    assert "required" in p.message


def test_bad_group_type_names_the_type_path_not_the_union_tag(base):
    p = only(edit(base, "kv_cache.groups.0.type", "flash_attention"), "kv_cache.groups.0.type")
    assert "full_attention" in p.allowed and p.value == "flash_attention"


@pytest.mark.parametrize("key,value", [("kv_cache.num_blocks", 0), ("kv_cache.num_blocks", -4),
                                       ("kv_cache.block_size", 0), ("kv_cache.groups.0.head_size", -1),
                                       ("kv_cache.groups.0.num_kv_heads", 0)])
def test_zero_or_negative_sizes_are_rejected(base, key, value):
    p = only(edit(base, key, value), key)
    assert p.value == value and "greater than 0" in p.message


def test_negative_memory_budget_is_rejected(base):
    data = edit(edit(base, "kv_cache.num_blocks", None), "kv_cache.memory", "-1GiB")
    assert any(p.path == "kv_cache.memory" for p in problems(data))


def test_budget_below_one_block_prints_the_numbers(compose):
    data = compose("kv_cache=llama3_8b", "kv_cache.memory=1MiB", "action=check")
    p = only(data, "kv_cache.memory")
    text = p.render()
    assert "1048576" in text and "2097152" in text and "32 x 65536" in text
    assert "kv_cache.memory" in p.fix


def test_both_num_blocks_and_memory_is_an_error(compose):
    p = only(compose("kv_cache=llama3_8b", "kv_cache.num_blocks=8", "action=check"), "kv_cache")
    assert "both" in p.message


def test_duplicate_layer_in_one_group(base):
    data = edit(base, "kv_cache.groups.0.layers", [0, 1, 1, 2, 3])
    p = only(data, "kv_cache.groups.0.layers")
    assert "twice" in p.message and p.value == "model.layers.1.self_attn.attn"


def test_a_layer_in_two_groups(base):
    group = dict(base["kv_cache"]["groups"][0], layers=[3])
    data = edit(edit(base, "kv_cache.groups.0.layers", "0:4"), "kv_cache.groups", [base["kv_cache"]["groups"][0], group])
    data["kv_cache"]["groups"][0]["layers"] = "0:4"
    p = only(data, "kv_cache.groups.1.layers")
    assert "group 0 and group 1" in p.message


def test_a_layer_in_no_group(base):
    p = only(edit(base, "kv_cache.groups.0.layers", "0:3"), "kv_cache.groups")
    assert "model.layers.3.self_attn.attn" in p.message


def test_explicit_kv_cache_config_is_cross_checked(base):
    data = copy.deepcopy(base)
    page = 2 * 16 * 128 * 2
    data["kv_cache"] = {
        "num_blocks": 4,
        "kv_cache_tensors": [{"size": page * 4 * 2 - 1, "layers": ["a", "b"], "layer_stride": page * 4,
                              "block_stride": page}],
        "kv_cache_groups": [{"layer_names": ["a", "b"], "kv_cache_spec": {
            "type": "full_attention", "block_size": 16, "num_kv_heads": 2, "head_size": 64, "dtype": "float16"}}],
    }
    p = only(data, "kv_cache.kv_cache_tensors.0.size")
    assert p.fix == f"set size to {page * 8}"
    data["kv_cache"]["kv_cache_tensors"][0]["size"] = page * 8
    assert run_job(data)["plan"]["total_bytes"] == page * 8


def test_every_problem_is_reported_in_one_pass(base):
    data = edit(edit(edit(base, "connector.kv_role", "producer"), "role", "wroker"), "kv_cache.num_blocks", 0)
    paths = {p.path for p in problems(data)}
    assert {"connector.kv_role", "role", "kv_cache.num_blocks"} <= paths


def test_empty_module_path_is_an_error(base):
    p = only(edit(base, "connector.module_path", ""), "connector.module_path")
    assert "empty string" in p.message


def test_typo_in_a_built_in_connectors_extra_settings_fails(compose):
    data = compose("connector=mooncake", "action=check")
    data["connector"]["extra"]["protocl"] = "tcp"
    p = only(data, "connector.extra.protocl")
    assert p.suggestion() == "protocol"


def test_bad_enum_in_extra_settings_lists_the_allowed(compose):
    p = only(compose("connector=mooncake", "connector.extra.protocol=udp", "action=check"),
             "connector.extra.protocol")
    assert p.allowed == ["auto", "tcp", "rdma"]


def test_retired_num_cpu_blocks_names_its_replacement(compose):
    data = compose("connector=offloading", "action=check")
    data["connector"]["extra"]["num_cpu_blocks"] = 10000
    text = "\n".join(p.render() for p in problems(data))
    assert "cpu_bytes_to_use" in text and "num_cpu_blocks" in text


def test_unknown_connector_name_suggests_the_nearest(compose):
    data = compose("action=check")
    data["connector"]["name"] = "mooncak"
    p = only(data, "connector.name")
    assert p.suggestion() == "mooncake"


def test_external_connector_by_module_path_is_resolved_and_checked(compose):
    data = compose("action=check", "connector.module_path=zoo.connectors", "connector.name=Good")
    data["connector"]["extra"] = {"capacity": "1MiB"}
    assert run_job(data)["contract"] == "ok"


def test_a_plan_larger_than_free_memory_is_a_config_error(compose):
    data = compose("kv_cache=llama3_8b", "kv_cache.memory=40TiB", "device=cpu", "action=check")
    p = only(data, "kv_cache")
    assert "free" in p.message and "kv_cache.num_blocks" in p.fix


def test_config_error_is_a_value_error_too(base):
    with pytest.raises(ValueError):
        run_job(edit(base, "role", "both"))
    assert issubclass(ConfigError, ValueError) and issubclass(ContractError, ValueError)


def test_worker_run_without_torch_says_how_to_install_it(compose, monkeypatch):
    import importlib.util

    import kvconf.runtime.pipeline as pipeline

    real = importlib.util.find_spec
    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ConfigError) as exc:
        run_job(compose("action=run"))
    (p,) = exc.value.problems
    assert "torch" in p.message and "download.pytorch.org/whl/cpu" in p.fix
    assert run_job(compose("action=check"))["contract"] == "ok"  # checks need no torch

"""A layout or connector file of one's own (``--config-dir D``, ``kv_cache/mine.yaml``,
``connector/mine.yaml``) takes every override a built-in one takes: the group's keys come from
kvconf's schema, not from the keys the file happens to write. Each key of both groups is walked:
a file that leaves it out still takes ``GROUP.KEY=VALUE``, and the value reaches the validated
config. A key that does not exist still gets kvconf's did-you-mean message (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import CONF, json_out, run_kvconf
from kvconf.conf import CONF_DIR, compose_data
from kvconf.config.models import validate
from kvconf.config.overrides import as_composable, check_overrides, schema_keys
from kvconf.errors import ConfigError

GROUPS = [{"type": "full_attention", "layers": "all", "num_kv_heads": 4, "head_size": 64}]
COMPACT = {"num_layers": 8, "block_size": 16, "dtype": "bfloat16", "num_blocks": 64, "groups": GROUPS}
"""A user's compact layout; each walk leaves one key out of it."""

KV_CACHE_VALUES: dict[str, tuple[str, Any]] = {
    # key: (the override's value as typed, what the validated layout holds)
    "model": (str(CONF / "models" / "llama3_8b"), str(CONF / "models" / "llama3_8b")),
    "num_layers": ("12", 12),
    "layer_name": ("'blocks.{i}.attn'", "blocks.{i}.attn"),
    "block_size": ("32", 32),
    "dtype": ("float16", "float16"),
    "num_blocks": ("96", 96),
    "memory": ("8MiB", "8MiB"),
    "groups": ("[{type:full_attention,layers:all,num_kv_heads:2,head_size:128}]", 2),
    "max_model_len": ("512", 512),
    "max_num_batched_tokens": ("1024", 1024),
    "tensor_parallel_size": ("2", 2),
    "pipeline_parallel_size": ("2", 2),
    "layout": ("BLHNC", "BLHNC"),
}
EXPLICIT_ONLY = {"kv_cache_tensors", "kv_cache_groups"}
"""Keys of the explicit KVCacheConfig form alone (walked on an explicit file below)."""

CONNECTOR_VALUES: dict[str, tuple[str, Any]] = {
    "name": ("offloading", "offloading"),
    "module_path": ("kvconf_connectors.example", "kvconf_connectors.example"),
    "kv_role": ("kv_consumer", "kv_consumer"),
    "engine_id": ("engine-7", "engine-7"),
    "kv_buffer_device": ("cpu", "cpu"),
    "kv_port": ("15000", 15000),
    "kv_load_failure_policy": ("recompute", "recompute"),
    "enable_permute_local_kv": ("true", True),
    "extra": ("{capacity:2MiB}", {"capacity": "2MiB"}),
    "vllm_extra_config": ("{}", {}),
}
CONNECTOR = {"name": "example", "kv_role": "kv_both", "extra": {"capacity": "4MiB"}}
"""A user's connector file: the example connector, written with few keys; each walk leaves one out."""


def _folder(tmp_path: Path, group: str, node: dict[str, Any]) -> Path:
    d = tmp_path / "user"
    (d / group).mkdir(parents=True, exist_ok=True)
    (d / group / "mine.yaml").write_text(yaml.safe_dump(node))
    return d


def _composed(folder: Path, *overrides: str) -> dict[str, Any]:
    """What ``python -m kvconf --config-dir FOLDER OVERRIDES`` composes, through the same steps."""
    argv = ["--config-dir", str(folder), *overrides]
    check_overrides(argv, CONF_DIR)
    given = [a for a in as_composable(argv, CONF_DIR) if a not in ("--config-dir", str(folder))]
    return compose_data(given, config_dirs=[folder])


def test_every_schema_key_of_both_groups_has_a_walk():
    keys = schema_keys()
    assert set(keys["kv_cache"]) == set(KV_CACHE_VALUES) | EXPLICIT_ONLY
    assert set(keys["connector"]) == set(CONNECTOR_VALUES)


@pytest.mark.parametrize("key", sorted(KV_CACHE_VALUES))
def test_a_layout_of_ones_own_takes_every_kv_cache_override(tmp_path, key):
    node = {k: v for k, v in COMPACT.items() if k != key}
    if key == "memory":
        node.pop("num_blocks")  # memory or num_blocks, not both
    folder = _folder(tmp_path, "kv_cache", node)
    typed, expected = KV_CACHE_VALUES[key]
    data = _composed(folder, "kv_cache=mine", f"kv_cache.{key}={typed}")
    layout = validate(data).kv_cache
    got = getattr(layout, key)
    if key == "groups":
        got = got[0].num_kv_heads
    assert got == expected


def test_an_explicit_kv_cache_config_of_ones_own_takes_its_keys(tmp_path):
    explicit = yaml.safe_load((CONF / "kv_cache" / "tiny.yaml").read_text())
    cfg = validate(compose_data(["kv_cache=tiny"])).kv_cache_config
    node = cfg.model_dump(mode="json")
    node.pop("num_blocks")
    folder = _folder(tmp_path, "kv_cache", node)
    data = _composed(folder, "kv_cache=mine", f"kv_cache.num_blocks={explicit['num_blocks']}")
    assert validate(data).kv_cache_config.num_blocks == explicit["num_blocks"]


@pytest.mark.parametrize("key", sorted(CONNECTOR_VALUES))
def test_a_connector_of_ones_own_takes_every_connector_override(tmp_path, key):
    node = {k: v for k, v in CONNECTOR.items() if k != key}
    if key == "name":
        node["module_path"] = None
    folder = _folder(tmp_path, "connector", node)
    typed, expected = CONNECTOR_VALUES[key]
    data = _composed(folder, "connector=mine", f"connector.{key}={typed}")
    assert getattr(validate(data).connector, key) == expected


def test_a_connector_of_ones_own_takes_an_extra_key_it_leaves_out(tmp_path):
    folder = _folder(tmp_path, "connector", {"name": "example", "kv_role": "kv_both"})
    data = _composed(folder, "connector=mine", "connector.extra.capacity=3MiB")
    assert validate(data).connector.extra == {"capacity": "3MiB"}


def test_built_in_files_compose_exactly_as_written():
    argv = ["kv_cache=llama3_8b", "kv_cache.max_model_len=2048", "connector.extra.cpu_bytes_to_use=2GiB",
            "connector=offloading"]
    assert as_composable(argv, CONF_DIR) == argv


def test_a_misspelt_key_still_gets_kvconfs_message(tmp_path):
    folder = _folder(tmp_path, "kv_cache", COMPACT)
    with pytest.raises(ConfigError) as exc:
        _composed(folder, "kv_cache=mine", "kv_cache.max_model_lenn=4096")
    (problem,) = exc.value.problems
    assert problem.path == "kv_cache.max_model_lenn" and problem.suggestion() == "max_model_len"


def test_the_issue_command_runs_for_a_file_without_max_model_len(tmp_path, workdir):
    folder = _folder(tmp_path, "kv_cache", {**{k: v for k, v in COMPACT.items() if k != "num_blocks"},
                                            "memory": "64MiB"})
    proc = run_kvconf("--config-dir", str(folder), "kv_cache=mine", "kv_cache.max_model_len=4096", "action=check",
                      "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["plan"]["max_concurrency"] == 2.0  # 512 blocks of 16 tokens, 256 a request


def test_a_sweep_over_a_users_file_and_a_built_in_one_takes_the_override(tmp_path, workdir):
    folder = _folder(tmp_path, "kv_cache", {**{k: v for k, v in COMPACT.items() if k != "num_blocks"}, "memory": "64MiB"})
    proc = run_kvconf("--config-dir", str(folder), "-m", "kv_cache=mine,tiny", "kv_cache.max_model_len=2048",
                      "action=check", cwd=workdir)
    assert proc.returncode == 2, proc.stderr  # tiny's 4 MiB holds no request of 2,048 tokens; mine's 64 MiB does
    assert "kvconf: 1 of 2 jobs failed:" in proc.stderr
    assert "exit 2: kv_cache=tiny kv_cache.max_model_len=2048 action=check: kv_cache.max_model_len" in proc.stderr


def test_a_misspelt_key_on_the_command_line_exits_2_with_did_you_mean(tmp_path, workdir):
    folder = _folder(tmp_path, "kv_cache", COMPACT)
    proc = run_kvconf("--config-dir", str(folder), "kv_cache=mine", "kv_cache.max_modl_len=4096", "action=check",
                      cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "kv_cache.max_modl_len" in proc.stderr and "max_model_len" in proc.stderr

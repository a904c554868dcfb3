"""Layouts read from a model's config.json (``kv_cache.model``): for each shipped family the plan
is the one its hand-written layout gives, and the page sizes and groups are the figures computed
by hand below from the models' public configs."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conftest import CONF, json_out, run_kvconf
from kvconf.config.layout import KVCacheLayout

MODELS = CONF / "models"


def attention(heads: int, head: int, dtype_bytes: int = 2, block: int = 16) -> int:
    return heads * block * 2 * head * dtype_bytes  # K and V


# family -> (fixture, the hand-written layout, [(type, layers, page bytes) per plan group], max_model_len)
FAMILIES = {
    "llama": ("llama3_8b", {"num_layers": 32, "groups": [
        {"type": "full_attention", "num_kv_heads": 8, "head_size": 128}]},
        [("full_attention", 32, attention(8, 128))], 131072),
    "mistral": ("mistral_7b", {"num_layers": 32, "groups": [
        {"type": "sliding_window", "sliding_window": 4096, "num_kv_heads": 8, "head_size": 128}]},
        [("sliding_window", 32, attention(8, 128))], 32768),
    "qwen2": ("qwen2_5_7b", {"num_layers": 28, "groups": [  # use_sliding_window false: full attention
        {"type": "full_attention", "num_kv_heads": 4, "head_size": 128}]},
        [("full_attention", 28, attention(4, 128))], 32768),
    "qwen3": ("qwen3_8b", {"num_layers": 36, "groups": [
        {"type": "full_attention", "num_kv_heads": 8, "head_size": 128}]},
        [("full_attention", 36, attention(8, 128))], 40960),
    "gemma2": ("gemma2_9b", {"num_layers": 42, "dtype": "float32", "groups": [  # even layers slide
        {"type": "full_attention", "layers": "1::2", "num_kv_heads": 8, "head_size": 256},
        {"type": "sliding_window", "layers": "rest", "sliding_window": 4096, "num_kv_heads": 8, "head_size": 256}]},
        [("sliding_window", 21, attention(8, 256, 4)), ("full_attention", 21, attention(8, 256, 4))], 8192),
    "gemma3": ("gemma3_12b", {"num_layers": 48, "groups": [  # every 6th layer full
        {"type": "full_attention", "layers": "5::6", "num_kv_heads": 8, "head_size": 256},
        {"type": "sliding_window", "layers": "rest", "sliding_window": 1024, "num_kv_heads": 8, "head_size": 256}]},
        [("sliding_window", 8, attention(8, 256))] * 5 + [("full_attention", 8, attention(8, 256))], 131072),
    "gpt_oss": ("gpt_oss_20b", {"num_layers": 24, "groups": [
        {"type": "full_attention", "layers": "1::2", "num_kv_heads": 8, "head_size": 64},
        {"type": "sliding_window", "layers": "rest", "sliding_window": 128, "num_kv_heads": 8, "head_size": 64}]},
        [("sliding_window", 12, attention(8, 64)), ("full_attention", 12, attention(8, 64))], 131072),
    "deepseek_v3": ("deepseek_v3", {"num_layers": 61, "groups": [{"type": "mla", "head_size": 512 + 64}]},
                    [("mla", 61, 16 * 576 * 2)], 163840),
    "deepseek_v2": ("deepseek_v2_lite", {"num_layers": 27, "groups": [{"type": "mla", "head_size": 512 + 64}]},
                    [("mla", 27, 16 * 576 * 2)], 163840),
}


def plan_groups(cfg):
    return [(g.kv_cache_spec.type, len(g.layer_names), g.kv_cache_spec.page_size_bytes) for g in cfg.kv_cache_groups]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_models_config_gives_the_plan_of_its_hand_written_layout(family):
    fixture, by_hand, expected, max_len = FAMILIES[family]
    from_file = KVCacheLayout(model=str(MODELS / fixture / "config.json"), memory="4GiB", max_model_len=1024)
    written = KVCacheLayout(**by_hand, memory="4GiB", max_model_len=1024)
    assert plan_groups(from_file.to_config()) == plan_groups(written.to_config()) == expected
    assert from_file.to_config().num_blocks == written.to_config().num_blocks
    assert [g.layer_names for g in from_file.to_config().kv_cache_groups] == [
        g.layer_names for g in written.to_config().kv_cache_groups]
    assert KVCacheLayout(model=str(MODELS / fixture), memory="4GiB").max_model_len == max_len  # a folder works too


def test_settings_given_beside_the_model_win_over_the_file():
    layout = KVCacheLayout(model=str(MODELS / "llama3_8b"), memory="1GiB", dtype="float16", block_size=32,
                           max_model_len=4096, tensor_parallel_size=2)
    spec = layout.to_config().kv_cache_groups[0].kv_cache_spec
    assert (spec.dtype, spec.block_size, spec.num_kv_heads, layout.max_model_len) == ("float16", 32, 4, 4096)


def test_an_unsupported_model_type_names_it_and_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 12}))
    with pytest.raises(ValidationError) as exc:
        KVCacheLayout(model=str(tmp_path), memory="1GiB")
    (p,) = exc.value.errors()[0]["ctx"]["error"].problems
    assert p.path == "kv_cache.model" and p.value == "bert" and "llama" in p.allowed


def test_a_missing_field_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(ValidationError) as exc:
        KVCacheLayout(model=str(tmp_path), memory="1GiB")
    (p,) = exc.value.errors()[0]["ctx"]["error"].problems
    assert p.path == "kv_cache.model" and "'num_attention_heads'" in p.message


def test_the_command_line_reads_a_model_from_the_default_config(workdir):
    model = MODELS / "qwen3_8b" / "config.json"
    proc = run_kvconf(f"kv_cache.model={model}", "kv_cache.memory=2GiB", "kv_cache.max_model_len=8192",
                      "action=check", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    plan = json_out(proc)["plan"]
    page = attention(8, 128)
    assert plan["num_blocks"] == (2 << 30) // (36 * page) and plan["max_model_len"] == 8192
    bad = run_kvconf(f"kv_cache.model={model}", "kv_cache.memory=2GiB", "action=check", cwd=workdir)
    assert bad.returncode == 2  # the default max_model_len is the model's 40,960 tokens: too many for 2 GiB
    assert "kv_cache.max_model_len" in bad.stderr and "estimated maximum model length" in bad.stderr

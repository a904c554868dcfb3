"""``action=bench bench.engine=vllm``: the connector measured inside the real vLLM (time to first
token, decode throughput per pass) beside vLLM without a connector and vLLM's own connector, as a
sweep with its summary. Figures are not asserted (timing targets live in benchmarks/): what the
user sees is, namely that every pass ran, the hit pass loaded what the save pass stored (vLLM's
``num_cached_tokens``), the tokens equal vLLM's without a connector, and the summary holds a TTFT
row and bar per connector and pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_support import BLOCK, needs_vllm, shared_model

from conftest import kvconf_env


def _kvconf(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconf", *args], capture_output=True, text=True, cwd=cwd,
                          env=kvconf_env(), timeout=timeout)


@pytest.mark.parametrize(("overrides", "path"), [
    (["kv_cache.block_size=32"], "bench.model"),  # tiny: no model to run
    (["kv_cache=llama_100m", "kv_cache.block_size=16", "kv_cache.num_blocks=600"], "kv_cache.block_size"),  # CPU: 32s
    (["kv_cache=llama_100m", "bench.prompt_tokens=[16384]"], "bench.prompt_tokens"),  # past the model's positions
    (["bench.model=/nonexistent/model"], "bench.model"),
])
def test_what_vllm_cannot_run_is_a_config_error_naming_the_key(overrides, path, tmp_path):
    if path == "kv_cache.block_size":
        pytest.importorskip("vllm")
    proc = _kvconf("connector=offloading", "action=bench", "bench.engine=vllm", *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert path in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr


@needs_vllm
def test_a_sweep_inside_vllm_reports_ttft_per_pass_beside_no_connector_and_vllms_own(tmp_path_factory, tmp_path):
    model = shared_model(tmp_path_factory)
    proc = _kvconf("-m", "connector=offloading,shared_storage", "action=bench", "bench.engine=vllm",
                   f"bench.model={model}", f"kv_cache.model={model}", f"kv_cache.block_size={BLOCK}", "kv_cache.num_blocks=128",
                   "bench.prompt_tokens=[128]", "bench.requests=2", "bench.repetitions=1", "bench.output_tokens=4",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    docs = {}
    for res in sorted((tmp_path / "sweep").glob("*/results.json")):
        doc = json.loads(res.read_text())
        docs[doc["connector"]] = doc
    assert set(docs) == {"offloading", "shared_storage"}
    for name, doc in docs.items():
        assert doc["engine"] == "vllm" and doc.get("figures") is None
        passes = doc["vllm"]["by_length"]["128"]["passes"]
        mine, none = passes["connector"], passes["no_connector"]
        assert set(mine) == set(none) == {"save", "hit", "miss"}
        # the hit pass loaded the save pass's blocks: all but the block holding the last token
        assert mine["hit"]["cached_tokens"] == 128 - BLOCK, (name, mine["hit"])
        assert mine["miss"]["cached_tokens"] == 0 and none["hit"]["cached_tokens"] == 0
        assert mine["hit"]["loaded_bytes"] > 0 and mine["miss"]["saved_bytes"] > 0
        for p in ("save", "hit", "miss"):
            assert mine[p]["tokens_identical"] == 1.0, (name, p)
            assert mine[p]["ttft_ms"]["p50"] > 0 and mine[p]["ttft_vs_no_connector"] > 0
        # vLLM's own prefix cache on the save and hit passes (one engine): its hit from vLLM's memory
        own = passes["prefix_cache"]
        assert set(own) == {"save", "hit"} and own["hit"]["cached_tokens"] == 128 - BLOCK, own
        assert own["save"]["cached_tokens"] > 0  # the later prompts found the shared prefix
        for p in ("save", "hit"):
            assert mine[p]["tokens_as_prefix_cache"] == 1.0 and mine[p]["ttft_vs_prefix_cache"] > 0, (name, p)
        assert doc["vllm"]["by_length"]["128"]["loads_vs_limit"]["load_ratio"] > 0
    theirs = docs["shared_storage"]["vllm"]
    assert theirs["vllm_connector"] == "ExampleConnector"
    example = theirs["by_length"]["128"]["passes"]["vllm_connector"]
    assert example["hit"]["cached_tokens"] == 128 - BLOCK and example["hit"]["tokens_identical"] == 1.0
    assert "ttft_vs_vllm_connector" in docs["shared_storage"]["vllm"]["by_length"]["128"]["passes"]["connector"]["hit"]
    assert "CUDA" in docs["offloading"]["vllm"]["vllm_connector_skipped"]
    assert docs["shared_storage"]["vllm"]["by_length"]["128"]["loads_vs_limit"]["against"].startswith("raw file")
    summary = (tmp_path / "sweep" / "summary.csv").read_text()
    rows = [ln for ln in summary.splitlines()[1:] if ",vllm," in ln]
    # each job: kvconf's and no connector's three passes, vLLM's prefix cache's save and hit; ExampleConnector's two
    assert len(rows) == 2 * (3 * 2 + 2) + 2
    assert sum(",vLLM prefix cache," in r for r in rows) == 4
    assert "inside vLLM: time to first token" in proc.stdout
    png = tmp_path / "sweep" / "summary.png"
    pytest.importorskip("matplotlib")
    assert png.is_file() and png.stat().st_size > 10_000
    # bench-compare reads them: B's hit three times slower is "worse", the rest within the spread
    slower = tmp_path / "slower"
    (slower / "1").mkdir(parents=True)
    doc = docs["shared_storage"]
    hit = doc["vllm"]["by_length"]["128"]["passes"]["connector"]["hit"]
    hit["ttft_ms"]["p50"] *= 3
    hit["by_repetition"]["ttft_ms"] = [x * 3 for x in hit["by_repetition"]["ttft_ms"]]
    (slower / "1" / "results.json").write_text(json.dumps(doc))
    proc = _kvconf("bench-compare", str(tmp_path / "sweep"), str(slower), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["job"], r["figure"]): r["verdict"] for r in json.loads(proc.stdout)["rows"]}
    job = f"shared_storage {doc['kv_cache']} 128 tokens"
    assert rows[(f"{job} kvconf hit", "ttft_p50_ms")] == "worse", rows
    assert rows[(f"{job} no connector hit", "ttft_p50_ms")] == "no change"

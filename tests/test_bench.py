"""action=bench, results.json, sweeps and kvconf bench-compare (small sizes: timings are not asserted)."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import REPO, json_out, run_kvconf

pytestmark = pytest.mark.torch

SMALL = ("bench.repetitions=1", "bench.warmup=0", "bench.ceilings=false", "bench.min_seconds=0")


def test_bench_writes_results_json_that_validates_against_the_schema(workdir):
    jsonschema = pytest.importorskip("jsonschema")
    proc = run_kvconf("connector=offloading", "action=bench", "output=json", *SMALL, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    results = json.loads((workdir / "results.json").read_text())
    schema = json.loads((REPO / "schemas" / "results.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(results)
    f = results["figures"]
    assert f["verified"] is True and f["bytes"] > 0 and f["gbps"] > 0
    assert set(f["latency_ms"]) == {"p50", "p90", "p99"}
    assert results["raw"]["gbps"] > 0 and results["ratio"] == pytest.approx(f["gbps"] / results["raw"]["gbps"], rel=0.01,
                                                                                           abs=0.001)  # 3 decimals
    assert results["environment"]["versions"]["torch"] and results["config"]["connector"]["name"] == "offloading"
    assert out["bench"]["figures"] == f and out["results_file"] == str(workdir / "results.json")


def test_a_wrong_byte_fails_the_benchmark(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Corrupts", "action=bench", *SMALL,
                      cwd=workdir)
    assert proc.returncode == 1 and "differ from what was saved" in proc.stderr
    assert not (workdir / "results.json").exists()


def test_sweep_leaves_results_a_summary_and_a_plot_and_reports_the_failing_job(workdir):
    proc = run_kvconf("-m", "action=bench", "connector.module_path=zoo.connectors",
                      "connector.name=Good,FailsAtRuntime", "kv_cache=tiny,llama3_8b", *SMALL, cwd=workdir)
    assert proc.returncode == 1  # one job failed; the others ran
    (sweep,) = (workdir / "multirun").glob("*/*")
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert len(jobs) == 4
    for job in jobs:  # each job leaves its results, or why it failed
        (left,) = [p.name for p in job.iterdir()]
        doc = json.loads((job / left).read_text())
        assert (left, doc["connector"]) in (("results.json", "Good"), ("error.json", "FailsAtRuntime"))
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted((r["connector"], r["kv_cache"], r["status"][:6]) for r in rows) == [
        ("FailsAtRuntime", "llama3_8b", "failed"), ("FailsAtRuntime", "tiny", "failed"),
        ("Good", "llama3_8b", "ok"), ("Good", "tiny", "ok")]
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "raw_gbps" in proc.stdout and "kvconf: sweep summary in" in proc.stdout


def test_bench_compare_prints_the_change_of_each_figure(workdir, tmp_path):
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        assert run_kvconf("connector=example", "action=bench", *SMALL, cwd=d).returncode == 0
        runs.append(d / "results.json")
    proc = run_kvconf("bench-compare", str(runs[0]), str(runs[1]), "--format", "json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    figures = {r["figure"] for r in rows}
    assert {"gbps", "load_gbps", "raw_gbps", "latency_p50_ms"} <= figures
    assert all(r["job"] == "example tiny" for r in rows)
    text = run_kvconf("bench-compare", str(runs[0]), str(runs[1]), cwd=workdir)
    assert "example tiny" in text.stdout and "%" in text.stdout
    assert run_kvconf("bench-compare", str(runs[0]), str(tmp_path / "nope"), cwd=workdir).returncode == 2


@pytest.mark.parametrize("connector", ["mooncake", "nixl"])
def test_peer_to_peer_bench_compares_with_the_bare_engine(workdir, connector):
    pytest.importorskip("mooncake.engine" if connector == "mooncake" else "nixl._api")
    proc = run_kvconf(f"connector={connector}", "action=bench", "output=json", *SMALL, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    b = json_out(proc)["bench"]
    assert b["figures"]["verified"] and b["figures"]["latency_ms"]["p50"] > 0
    assert "bare engine" in b["raw"]["path"] and b["raw"]["gbps"] > 0 and b["ratio"] > 0


def test_no_progress_bar_when_not_a_terminal(workdir):
    proc = run_kvconf("connector=example", "action=bench", "bench.repetitions=2", cwd=workdir)
    assert proc.returncode == 0 and "kvconf bench example [" not in proc.stderr + proc.stdout


def test_prompt_length_and_concurrency_shape_the_workload(workdir):
    proc = run_kvconf("connector=offloading", "action=bench", "output=json", "bench.requests=4",
                      "bench.prompt_blocks=8", "bench.concurrency=2", *SMALL, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    f = json_out(proc)["bench"]["figures"]
    block = 32 * 1024  # the tiny layout: 4 layers of 8 KiB pages
    assert f["requests"] == 4 and f["bytes"] >= 4 * 8 * block  # every block of every request loaded back
    too_long = run_kvconf("connector=offloading", "action=bench", "bench.prompt_blocks=1000", *SMALL, cwd=workdir)
    assert too_long.returncode == 2 and "bench.prompt_blocks" in too_long.stderr and "the cache has 128" in too_long.stderr


def test_a_parallel_sweep_through_the_joblib_launcher_reports_failed_jobs(workdir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_kvconf("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "action=bench",
                      "connector.module_path=zoo.connectors", "connector.name=Good,FailsAtRuntime", *SMALL, cwd=workdir)
    assert proc.returncode == 1, proc.stderr
    assert "kvconf: 1 of 2 jobs failed:" in proc.stderr and "the disk is on fire" in proc.stderr.split("jobs failed:")[1]
    (sweep,) = (workdir / "multirun").glob("*/*")
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["status"][:6] for r in rows) == ["failed", "ok"]

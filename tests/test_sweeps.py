"""Sweeps beyond one machine's basic launcher: Ray (a local cluster the sweep starts and stops) and
submitit (its local executor). The summary is built from what the jobs return, not from their
folders; a failing job is listed with its overrides and message; the sweep exits with the worst code."""

from __future__ import annotations

import csv
import time

import pytest

from conftest import kvconf_env, owned_processes, run_kvconf

pytestmark = pytest.mark.torch

SMALL = ("bench.repetitions=1", "bench.warmup=0", "bench.ceilings=false", "bench.min_seconds=0")
FORGET = "+hydra.callbacks.forget._target_=zoo.callbacks.ForgetJobFolder"
"""Each job's folder is removed where the job ran, once it ends: as on machines without a shared folder."""


def none_left(seconds: float = 15.0) -> list[int]:
    """The processes this test started that are still alive once ``seconds`` have passed (a Ray
    worker ends a moment after the cluster stops)."""
    deadline = time.monotonic() + seconds
    while owned_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    return owned_processes()


def summary(workdir):
    (sweep,) = (workdir / "multirun").glob("*/*")
    return sweep, list(csv.DictReader(open(sweep / "summary.csv")))


def test_a_ray_sweep_builds_its_summary_from_the_returned_figures_and_lists_a_failed_job(workdir):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    ray = ("hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false")
    # one combination is a bad value: it fails with its message, the others run, the sweep exits 2;
    # each job's folder is removed where it ran, so every figure and failure came back through Ray
    proc = run_kvconf("-m", *ray, "action=bench", "connector=example,offloading", "kv_cache=tiny",
                      "connector.kv_role=kv_both,sideways", FORGET, *SMALL, cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    sweep, rows = summary(workdir)
    assert not [d for d in sweep.iterdir() if d.is_dir()]  # no job folder is left: the figures came back
    status = {(r["connector"], r["kv_cache"], r["status"].split(":")[0]) for r in rows}
    assert status == {("example", "tiny", "ok"), ("offloading", "tiny", "ok"), ("example", "tiny", "failed (exit 2)"),
                      ("offloading", "tiny", "failed (exit 2)")}
    assert all(float(r["gbps"]) > 0 and float(r["raw_gbps"]) > 0 for r in rows if r["status"] == "ok")
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kvconf: 2 of 4 jobs failed:" in proc.stderr
    assert ("exit 2: action=bench connector=offloading kv_cache=tiny connector.kv_role=sideways" in proc.stderr
            and "connector.kv_role: value is not one of the allowed values (value 'sideways')" in proc.stderr)
    assert none_left() == []  # the local Ray cluster stopped with the sweep

    # a job whose connector starts a peer process beside it asks Ray for two CPUs
    proc = run_kvconf("-m", *ray, "action=run", "connector=example,mooncake", "self_test.transfer_bytes=4MiB",
                      "+hydra.callbacks.cpus._target_=zoo.callbacks.RecordRayCPUs", cwd=workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted((workdir / "ray_cpus.txt").read_text().split("\n")) == ["", "example 1", "mooncake 2"]
    assert "asking the launcher for 2 CPUs per job (num_cpus)" in proc.stderr
    assert none_left() == []


def test_the_same_sweep_runs_through_submitit_local(workdir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_kvconf("-m", "hydra/launcher=submitit_local", "action=bench", "connector=example,offloading",
                      "kv_cache=tiny", "connector.kv_role=kv_both,sideways", FORGET, *SMALL, cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _, rows = summary(workdir)
    assert [(r["connector"], r["status"][:15]) for r in rows] == [
        ("example", "ok"), ("example", "failed (exit 2)"), ("offloading", "ok"), ("offloading", "failed (exit 2)")]
    assert "kvconf: 2 of 4 jobs failed:" in proc.stderr
    assert none_left() == []


def test_a_launcher_that_cannot_run_the_jobs_is_one_runtime_error(workdir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    long = tmp_path / ("t" * 80)  # a folder the user chose for Ray that is too long for its sockets
    long.mkdir()
    proc = run_kvconf("-m", "hydra/launcher=ray", "action=check", "connector=example,offloading", cwd=workdir,
                      env=kvconf_env(RAY_TMPDIR=str(long)), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "kvconf: runtime error" in proc.stderr and "hydra/launcher" in proc.stderr
    assert "the RayLauncher could not run the jobs: OSError" in proc.stderr and "Traceback" not in proc.stderr
    assert none_left() == []

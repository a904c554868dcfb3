"""Connectors written for vLLM itself (subclasses of vLLM's ``KVConnectorBase_V1``) get the verdicts
kvconf's own connectors get, with vLLM installed (here: a stand-in on the path) or not (read from
source; the real vLLM hidden by ``tests/no_vllm``); a class that subclasses neither base is rejected at check time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TESTS, kvconf_env, run_kvconf

PAIRS = [("VGood", "Good", "ok"), ("VLegacy", "Legacy", "legacy"), ("VKwargsOnly", "KwargsOnly", "kwargs_only"),
         ("VAbstract", "Abstract", "abstract")]


def check_connector(*targets: str, with_vllm: bool, cwd) -> dict:
    path = str(TESTS) + (":" + str(TESTS / ("fake_vllm" if with_vllm else "no_vllm")))
    proc = subprocess.run([sys.executable, "-c", "import sys; from kvconf.cli.app import main; sys.exit(main())",
                           "check-connector", "--format", "json", *targets], cwd=cwd,
                          env=kvconf_env(PYTHONPATH=path), capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return {r["class"]: r for r in json.loads(proc.stdout)["results"]}


@pytest.mark.parametrize("with_vllm", [True, False], ids=["vllm-importable", "vllm-absent-read-from-source"])
def test_vllm_connector_gets_the_same_verdict_as_the_equivalent_kvconf_connector(with_vllm, workdir):
    got = check_connector(*[f"zoo.vllm_connectors:{v}" for v, _, _ in PAIRS],
                          *[f"zoo.connectors:{k}" for _, k, _ in PAIRS], with_vllm=with_vllm, cwd=workdir)
    for ours, theirs, verdict in PAIRS:
        assert got[ours]["verdict"] == got[theirs]["verdict"] == verdict, (ours, got[ours], got[theirs])
        assert got[ours]["base"] == "vllm" and got[theirs]["base"] == "kvconf"
        assert any("read from source" in d for d in got[ours]["details"]) is (not with_vllm)


def test_vllm_absent_is_really_absent_here():
    # the read-from-source case above means something only where vLLM cannot be imported: the set-up
    # installs vLLM, so the tests hide it behind tests/no_vllm, which fails as a missing module does
    env = kvconf_env(PYTHONPATH=f"{TESTS}:{TESTS / 'no_vllm'}")
    proc = subprocess.run([sys.executable, "-c", "import vllm"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'vllm'" in proc.stderr


@pytest.mark.parametrize("with_vllm", [True, False], ids=["vllm-importable", "vllm-absent-read-from-source"])
def test_vllm_connector_passes_action_check_and_is_refused_for_run(with_vllm, workdir):
    env = kvconf_env(PYTHONPATH=str(TESTS) + (":" + str(TESTS / ("fake_vllm" if with_vllm else "no_vllm"))))
    ok = run_kvconf("connector.module_path=zoo.vllm_connectors", "connector.name=VGood", "action=check", cwd=workdir,
                    env=env)
    assert ok.returncode == 0, ok.stderr
    legacy = run_kvconf("connector.module_path=zoo.vllm_connectors", "connector.name=VLegacy", "action=check",
                        cwd=workdir, env=env)
    assert legacy.returncode == 2 and "legacy 2-argument constructor" in legacy.stderr
    run = run_kvconf("connector.module_path=zoo.vllm_connectors", "connector.name=VGood", "action=run", cwd=workdir,
                     env=env)
    assert run.returncode == 2 and "written for vLLM" in run.stderr and "Traceback" not in run.stderr


def test_class_that_subclasses_neither_base_exits_2_at_check(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Plain", "action=check", cwd=workdir)
    assert proc.returncode == 2
    assert "subclasses neither" in proc.stderr and "fix: subclass kvconf.KVConnectorBase" in proc.stderr
    got = check_connector("zoo.connectors:Plain", with_vllm=False, cwd=workdir)
    assert got["Plain"]["verdict"] == "not_a_connector"


def test_module_path_on_the_default_group_does_not_hand_over_the_example_connectors_settings(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=FreeForm", "action=export", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kv_connector_extra_config"] == {}  # not the example connector's capacity
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=FreeForm", "connector.extra.depth=3",
                      "action=export", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kv_connector_extra_config"] == {"depth": 3}


@pytest.mark.parametrize(("cls", "code"), [("VGood", 0), ("VLegacy", 1)])
def test_kvconf_validate_matrix_checks_a_vllm_connector_read_from_source(cls, code, tmp_path):
    conf = tmp_path / "conf" / "connector"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(f"name: {cls}\nmodule_path: zoo.vllm_connectors\nkv_role: kv_producer\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from kvconf.cli.app import main; sys.exit(main())",
                           "validate", "--matrix", "--config-dir", str(tmp_path / "conf"), "--format", "json"],
                          cwd=tmp_path, env=kvconf_env(PYTHONPATH=str(TESTS)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == code, proc.stdout + proc.stderr
    failed = json.loads(proc.stdout)["failed_combinations"]
    assert all("connector=mine" in c for c in failed) and (bool(failed) == bool(code))


@pytest.mark.parametrize("with_vllm", [True, False], ids=["vllm-importable", "vllm-absent-read-from-source"])
@pytest.mark.parametrize(("cls", "groups"), [("VHybrid", 6), ("VGood", 1)])
def test_vllm_supports_hma_gets_the_hybrid_plan_as_in_vllm(cls, groups, with_vllm, workdir):
    env = kvconf_env(PYTHONPATH=str(TESTS) + (":" + str(TESTS / ("fake_vllm" if with_vllm else "no_vllm"))))
    proc = run_kvconf("connector.module_path=zoo.vllm_connectors", f"connector.name={cls}", "kv_cache=gemma3_hybrid",
                      "action=check", "output=json", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["plan"]["groups"]) == groups


def test_the_report_names_the_user_code_a_job_ran(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Good", "action=check", "output=json",
                      cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["user_modules"] == ["zoo.connectors"]
    proc = run_kvconf("hydra.run.dir=out", "action=check", "output=json", cwd=workdir)  # Hydra's own runtime
    report = json.loads(proc.stdout)
    assert report["user_modules"] == [] and report["callbacks"] == ["kvconf.cli.callbacks.SweepSummary"]

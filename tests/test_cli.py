"""``python -m kvconf`` as a user runs it: subprocesses, from a directory outside the repository."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import json_out, kvconf_env, run_kvconf


@pytest.mark.torch
def test_example_worker_run_allocates_exactly_the_plan_and_verifies_bytes(workdir):
    proc = run_kvconf("connector=example", "role=worker", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["connector"] == {**out["connector"], "name": "example", "class": "ExampleConnector",
                                "module": "kvconf_connectors.example"}
    assert out["role"] == "worker" and out["kv_role"] == "kv_both" and out["device"] == "cpu"
    assert out["contract"] == "ok"
    assert out["allocated_bytes"] == out["plan"]["total_bytes"] > 0
    assert out["plan"]["total_bytes"] == out["plan"]["num_blocks"] * out["plan"]["bytes_per_block"]
    st = out["self_test"]
    assert st["verified"] is True and st["bytes"] > 0 and st["seconds"] > 0
    for stage in ("compose", "validate", "resolve", "contract", "plan", "construct", "allocate", "register",
                  "self_test", "shutdown"):
        assert stage in out["timings"]


def test_scheduler_role_allocates_nothing(workdir, tmp_path):
    probe = tmp_path / "probe.json"
    proc = run_kvconf("role=scheduler", "output=json", cwd=workdir, env=kvconf_env(KVCONF_PROBE=str(probe)),
                      module="zoo.probe")
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["allocated_bytes"] == 0 and out["plan"]["allocates"] is False
    assert json.loads(probe.read_text())["allocate"] is False


@pytest.mark.torch
def test_text_report_is_for_people(workdir):
    proc = run_kvconf(cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "contract   ok" in proc.stdout and "self-test  verified" in proc.stdout


def test_a_single_run_leaves_nothing_in_the_working_directory(workdir):
    for args in ((), ("action=check",), ("connector.kv_role=bad",)):
        run_kvconf(*args, cwd=workdir)
    assert list(workdir.iterdir()) == []


def test_check_allocates_nothing_and_exports_the_plan(workdir):
    proc = run_kvconf("kv_cache=llama3_8b", "action=check", "output=json", cwd=workdir)
    out = json_out(proc)
    assert proc.returncode == 0 and out["allocated_bytes"] == 0 and "self_test" not in out
    assert out["plan"]["groups"][0]["page_size_bytes"] == 65536 and out["plan"]["bytes_per_block"] == 2 << 20


def test_config_error_exits_2_with_one_message_block_and_no_traceback(workdir):
    proc = run_kvconf("connector.kv_role=kv_prodcer", "role=worker", cwd=workdir)
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvconf: config error")
    assert "connector.kv_role" in proc.stderr and "did you mean: kv_producer?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_group_option_exits_2_with_did_you_mean(workdir):
    proc = run_kvconf("connector=mooncak", cwd=workdir)
    assert proc.returncode == 2
    assert "did you mean: mooncake?" in proc.stderr and "Traceback" not in proc.stderr


def test_misspelt_override_key_exits_2_with_did_you_mean(workdir):
    proc = run_kvconf("connector.kv_rol=kv_producer", "kv_cache.num_blcks=4", cwd=workdir)
    assert proc.returncode == 2
    assert "connector.kv_rol" in proc.stderr and "did you mean: kv_role?" in proc.stderr
    assert "did you mean: num_blocks?" in proc.stderr


@pytest.mark.torch
def test_runtime_failure_exits_1(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=FailsAtRuntime", cwd=workdir)
    assert proc.returncode == 1
    assert "runtime error" in proc.stderr and "the disk is on fire" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cfg_job_prints_the_composed_config(workdir):
    proc = run_kvconf("--cfg", "job", "kv_cache=llama3_8b", cwd=workdir)
    assert proc.returncode == 0
    assert "num_layers: 32" in proc.stdout and "kv_role: kv_both" in proc.stdout


def test_info_and_help(workdir):
    info = run_kvconf("--info", cwd=workdir)
    assert info.returncode == 0 and "Hydra" in info.stdout
    helptext = run_kvconf("--help", cwd=workdir)
    assert helptext.returncode == 0
    assert "connector: example, mooncake, multi, multi_tiers, nixl, offloading, shared_storage" in helptext.stdout
    # generated from the fields' docstrings
    assert "connector.kv_role" in helptext.stdout and "Data direction" in helptext.stdout
    assert list(workdir.iterdir()) == []


@pytest.mark.torch
def test_user_config_dir_adds_connector_and_kv_cache_options(workdir, tmp_path):
    user = tmp_path / "myconf"
    (user / "connector").mkdir(parents=True)
    (user / "kv_cache").mkdir()
    (user / "connector" / "mine.yaml").write_text(
        "name: Good\nmodule_path: zoo.connectors\nkv_role: kv_producer\nextra: {capacity: 8MiB}\n")
    (user / "kv_cache" / "small.yaml").write_text(
        "num_layers: 2\nnum_blocks: 8\ndtype: float32\ngroups:\n  - type: full_attention\n"
        "    num_kv_heads: 1\n    head_size: 32\n")
    proc = run_kvconf("--config-dir", str(user), "connector=mine", "kv_cache=small", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["connector"]["class"] == "Good" and out["kv_role"] == "kv_producer"
    assert out["plan"]["bytes_per_block"] == 2 * (1 * 16 * 64 * 4)


def test_user_config_dir_typo_is_reported_with_its_path(workdir, tmp_path):
    user = tmp_path / "myconf"
    (user / "connector").mkdir(parents=True)
    (user / "connector" / "bad.yaml").write_text("name: example\nkv_role: kv_both\nkv_prot: 1\n")
    proc = run_kvconf("--config-dir", str(user), "connector=bad", cwd=workdir)
    assert proc.returncode == 2 and "connector.kv_prot" in proc.stderr and "did you mean: kv_port?" in proc.stderr


@pytest.mark.torch
def test_multirun_reports_a_failing_job_and_runs_the_others(workdir):
    proc = run_kvconf("-m", "connector.module_path=zoo.connectors", "connector.name=Good,FailsAtRuntime",
                      "kv_cache=tiny,llama3_8b", "output=json", cwd=workdir)
    assert proc.returncode == 1
    outs = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(outs) == 4
    assert [o["ok"] for o in outs].count(True) == 2
    assert "2 of 4 jobs failed" in proc.stderr and "connector.name=FailsAtRuntime kv_cache=tiny" in proc.stderr


def test_runs_from_any_working_directory_with_python_m(tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert run_kvconf("action=check", cwd=deep).returncode == 0


def test_console_script_is_installed(workdir):
    import shutil
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("kvconf")
    script = str(exe) if exe.exists() else shutil.which("kvconf")
    assert script, "the kvconf console script is not installed"
    proc = subprocess.run([script, "action=check"], cwd=workdir, env=kvconf_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- the command line as a Hydra user expects it -------------------------------------------------------


def test_version_prints_kvconfs_version(workdir):
    from kvconf import __version__

    for proc in (run_kvconf("--version", cwd=workdir),
                 subprocess.run([str(Path(sys.executable).parent / "kvconf"), "--version"], cwd=workdir,
                                capture_output=True, text=True)):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"kvconf {__version__}"


@pytest.mark.parametrize("spelling", [["python", "-m", "kvconf"], ["kvconf"]])
def test_bash_completion_installs_and_completes_options_and_keys(workdir, spelling):
    install = run_kvconf("-sc", "install=bash", cwd=workdir)
    assert install.returncode == 0, install.stderr
    line = " ".join(spelling) + " connector=moo"
    script = "\n".join([
        install.stdout,
        f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({line}); "
        f"COMP_CWORD={len(spelling)}",
        "_kvconf_complete; echo \"${COMPREPLY[@]}\"",
    ])
    env = kvconf_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["connector=mooncake"]


def test_help_lists_every_key_each_connectors_extra_settings_and_the_subcommands(workdir):
    from kvconf.config.models import BenchConfig, ConnectorConfig, SelfTestConfig
    from kvconf.contract.registry import builtin_extra_models

    proc = run_kvconf("--help", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "BenchConfig" not in text and "SelfTestConfig" not in text  # expanded, not named
    for prefix, model in (("connector.", ConnectorConfig), ("self_test.", SelfTestConfig), ("bench.", BenchConfig)):
        for key in model.model_fields:
            assert f"  {prefix}{key}:" in text, f"{prefix}{key} is not in --help"
    for name, model in builtin_extra_models().items():
        section = text.split(f"== connector.extra.* of connector={name} ==", 1)[1].split("==", 1)[0]
        for key in model.model_fields:
            assert f"connector.extra.{key}:" in section, f"connector.extra.{key} of {name} is not in --help"
    for sub in ("validate", "check-connector", "bench-compare"):
        assert f"  {sub} " in text


def test_a_mistyped_subcommand_gets_did_you_mean_and_exit_2(workdir):
    proc = subprocess.run([str(Path(sys.executable).parent / "kvconf"), "valdate", "x.yaml"], cwd=workdir,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean: validate?" in proc.stderr and "Traceback" not in proc.stderr
    assert "'valdate' is neither a subcommand nor an override" in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["action=check", "output=json"]])
def test_a_closed_stdout_ends_quietly(workdir, args):
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "kvconf", *args])
    proc = subprocess.run(["bash", "-c", f"{cmd} | head -c 1 >/dev/null; echo \"exit ${{PIPESTATUS[0]}}\""],
                          cwd=workdir, env=kvconf_env(), capture_output=True, text=True, timeout=120)
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.strip() in ("exit 0", "exit 141")  # done, or ended by SIGPIPE as any Unix tool


def test_a_composition_error_without_text_is_told_by_the_error_behind_it():
    from kvconf.cli.app import _exception_lines

    try:
        try:
            raise ValueError("token recognition error at: '~'")
        except ValueError as inner:
            raise RuntimeError() from inner
    except RuntimeError as outer:
        assert _exception_lines(outer) == ["ValueError: token recognition error at: '~'"]

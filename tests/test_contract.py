"""The constructor contract, checked before anything is allocated."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import json_out, kvconf_env, run_kvconf
from kvconf import contract
from kvconf.errors import ContractError
from kvconf.runtime.pipeline import run_job


def contract_problem(compose, name: str, module: str = "zoo.connectors", action: str = "check"):
    data = compose(f"action={action}", f"connector.module_path={module}", f"connector.name={name}")
    with pytest.raises(ContractError) as exc:
        run_job(data)
    assert exc.value.exit_code == 2
    (p,) = exc.value.problems
    return p


@pytest.mark.torch
def test_three_argument_connector_passes(compose):
    data = compose("connector.module_path=zoo.connectors", "connector.name=Good", "device=cpu")
    report = run_job(data)
    assert report["contract"] == "ok" and report["self_test"]["verified"]


def test_legacy_two_argument_connector_is_rejected_with_signature_and_fix(compose):
    p = contract_problem(compose, "Legacy")
    text = p.render()
    assert "Legacy (module zoo.connectors)" in text
    assert "legacy 2-argument constructor" in text
    assert "signature found: Legacy(config, role)" in text
    assert "accept kv_cache_config as the third argument and pass it to super().__init__()" in text
    assert p.location and p.location.endswith("connectors.py:" + p.location.rsplit(":", 1)[1])


def test_kwargs_only_constructor_is_rejected_though_vllm_would_accept_it(compose):
    p = contract_problem(compose, "KwargsOnly")
    assert "**kwargs" in p.message
    assert "vLLM's name-based check would accept it" in p.details


def test_keyword_only_kv_cache_config_is_rejected(compose):
    p = contract_problem(compose, "KeywordOnly")
    assert "keyword-only" in p.message and "vLLM's name-based check would accept it" in p.details


def test_extra_required_constructor_parameter_is_rejected(compose):
    p = contract_problem(compose, "ExtraRequired")
    assert "tokenizer" in p.message


@pytest.mark.torch
def test_a_subclass_that_does_not_pass_kv_cache_config_to_the_base_is_rejected(compose):
    p = contract_problem(compose, "Swallows", action="run")
    assert "did not pass kv_cache_config to super().__init__()" in p.message and "None" in p.message


@pytest.mark.torch
def test_a_subclass_that_skips_the_base_init_is_rejected(compose):
    p = contract_problem(compose, "SkipsBase", action="run")
    assert "never ran" in p.message


def test_abstract_connector_is_rejected_naming_the_missing_methods(compose):
    p = contract_problem(compose, "Abstract")
    assert "start_load_kv" in p.message and "build_connector_meta" in p.message


def test_renamed_third_parameter_is_accepted_though_vllm_rejects_it():
    from zoo.connectors import Renamed

    v = contract.check(Renamed)
    assert v.ok and v.vllm_accepts is False


def test_star_args_constructor_is_accepted():
    from zoo.connectors import VarArgs

    assert contract.check(VarArgs).ok


def test_missing_module_names_the_module(compose):
    p = contract_problem(compose, "Good", module="zoo.no_such_module")
    assert p.path == "connector.module_path" and "no module named 'zoo.no_such_module'" in p.message


def test_module_with_a_missing_dependency_names_the_dependency(compose):
    p = contract_problem(compose, "X", module="zoo.needs_missing_dep")
    assert "kvconf_no_such_dependency" in p.message and "install" in p.fix


def test_module_that_raises_on_import_shows_the_error_and_where(compose):
    p = contract_problem(compose, "X", module="zoo.broken_import")
    assert "RuntimeError: this connector module is broken on purpose" in p.message
    assert p.location and "broken_import.py:1" in p.location


def test_missing_class_lists_the_classes_in_the_module(compose):
    p = contract_problem(compose, "Legasy")
    assert "not found in module 'zoo.connectors'" in p.message and p.suggestion() == "Legacy"


@pytest.mark.parametrize("name,kind", [("a_function", "a function"), ("NOT_A_CLASS", "a int")])
def test_an_attribute_that_is_not_a_class_is_rejected(compose, name, kind):
    p = contract_problem(compose, name)
    assert f"is {kind}, not a class" in p.message


def test_legacy_connector_exits_2_without_traceback_allocation_or_torch(workdir, tmp_path):
    probe = tmp_path / "probe.json"
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Legacy", "role=worker",
                      cwd=workdir, env=kvconf_env(KVCONF_PROBE=str(probe)), module="zoo.probe")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "contract error" in proc.stderr and "Legacy(config, role)" in proc.stderr
    assert "fix: accept kv_cache_config as the third argument" in proc.stderr
    seen = json.loads(probe.read_text())
    assert seen == {"exit": 2, "torch": False, "allocate": False, "cuda_initialized": False,
                    "connector_modules": ["kvconf_connectors.example"]}  # the base Legacy subclasses


def test_legacy_connector_in_json_mode_reports_the_verdict_on_stdout(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Legacy", "output=json", cwd=workdir)
    assert proc.returncode == 2
    out = json_out(proc)
    assert out["ok"] is False and out["error"]["kind"] == "contract error"
    assert out["error"]["problems"][0]["path"] == "connector.name"


def test_traceback_only_when_asked_for(workdir):
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Legacy", cwd=workdir,
                      env=kvconf_env(HYDRA_FULL_ERROR="1"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    proc = run_kvconf("connector.module_path=zoo.connectors", "connector.name=Legacy", "debug=true", cwd=workdir)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_contract_check_imports_no_torch():
    code = ("import sys; from kvconf import contract; from zoo.connectors import Legacy, Good; "
            "assert not contract.check(Legacy).ok and contract.check(Good).ok; print('torch' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], env=kvconf_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""``kvconf lint`` and ``kvconf import``: vLLM's --kv-transfer-config read, checked and translated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTS, kvconf_env, run_kvconf
from kvconf.ci.catalogue import CATALOGUE, NOTICES
from kvconf.ci.lint import lint_inputs
from kvconf.ci.lint import main as lint_main
from kvconf.errors import KVConfError
from kvconf.runtime.pipeline import run_job

BUILTINS = ("mooncake", "nixl", "offloading", "shared_storage", "multi")


def lint(*inputs: str, import_modules: bool = False):
    sys.path.insert(0, str(TESTS))  # zoo.connectors, for --import-modules
    results = lint_inputs(list(inputs), import_modules=import_modules)
    return results, [f for r in results for f in r.findings]


def kvconf_cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``kvconf ARGS``, the installed command, as a user types it."""
    return subprocess.run([sys.executable, "-c", "import sys; from kvconf.cli.app import main; sys.exit(main())", *args],
                          cwd=cwd, env=kvconf_env(), capture_output=True, text=True, input=stdin, timeout=120)


# ---- the catalogue: one test per entry --------------------------------------------------------------


@pytest.mark.parametrize("entry", [*CATALOGUE, *NOTICES], ids=lambda e: e.id)
def test_catalogue_entry_is_reported_with_its_path_and_fix(entry, tmp_path):
    if entry.id == "not-a-literal":
        script = tmp_path / "launch.sh"
        script.write_text(entry.example + "\n")
        results, findings = lint(str(script))
    else:
        results, findings = lint(entry.example, import_modules=entry.id == "external-contract")
    mine = [f for f in findings if f.id == entry.id]
    assert mine, f"{entry.id} not reported; got {[f.id for f in findings]}"
    f = mine[0]
    assert f.severity == entry.severity and f.fix and f.path
    if entry.severity == "error":
        assert lint_main([entry.example] if entry.id != "not-a-literal" else [str(script)]) == 1 \
            if entry.id != "external-contract" else not results[0].ok


@pytest.mark.parametrize("entry", [e for e in CATALOGUE if e.hydra], ids=lambda e: e.id)
def test_catalogue_entry_is_a_config_error_in_the_hydra_app(entry, compose):
    data = compose(*entry.hydra)
    with pytest.raises(KVConfError) as err:
        run_job({**data, "action": "check"})
    assert err.value.exit_code == 2
    assert all(p.path and (p.fix or p.suggestion()) for p in err.value.problems), err.value.render()


def test_external_contract_is_skipped_with_a_note_unless_modules_may_be_imported():
    results, findings = lint('{"kv_connector": "Legacy", "kv_role": "kv_both", "kv_connector_module_path": "zoo.connectors"}')
    assert results[0].ok and [f.severity for f in findings] == ["note"]
    assert "--import-modules" in findings[0].fix
    results, findings = lint('{"kv_connector": "Good", "kv_role": "kv_both", "kv_connector_module_path": "zoo.connectors"}',
                             import_modules=True)
    assert results[0].ok and not findings


# ---- valid configs pass --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_connectors_export_lints_clean(name, compose):
    ktc = run_job({**compose(f"connector={name}"), "action": "export"})["kv_transfer_config"]
    results, findings = lint(json.dumps(ktc))
    assert results[0].ok, [f.message for f in findings]
    assert all(f.severity != "error" for f in findings)


@pytest.mark.parametrize("text", [
    '{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_connector_extra_config":{"enforce_handshake_compat":false}}',
    '{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":'
    '{"spec_name":"CPUOffloadingSpec","blocks_per_chunk":4,"cpu_bytes_to_use":4G}}',
    '{"kv_connector":"MooncakeConnector","kv_role":"kv_producer","kv_connector_extra_config":'
    '{"mooncake_protocol":"rdma","bootstrap_server_address":"10.0.0.2:8998"}}',
    '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}',
    '{"kv_connector":"ExampleConnector","kv_role":"kv_both","kv_port":"30000"}',
])
def test_valid_vllm_configs_with_keys_only_vllm_reads_pass(text):
    results, findings = lint(text)
    assert results[0].ok, [f.message for f in findings]


def test_a_byte_count_written_as_text_is_an_error_though_kvconf_would_take_it():
    results, findings = lint('{"kv_connector":"OffloadingConnector","kv_role":"kv_both",'
                             '"kv_connector_extra_config":{"cpu_bytes_to_use":"4GiB"}}')
    assert not results[0].ok and [f.id for f in findings] == ["extra-value"]


def test_human_readable_numbers_are_read_as_vllm_expands_them():
    results, _ = lint('{"kv_connector":"OffloadingConnector","kv_role":"kv_both",'
                      '"kv_connector_extra_config":{"cpu_bytes_to_use": 4G}}')
    assert results[0].value["kv_connector_extra_config"]["cpu_bytes_to_use"] == 4 << 30


# ---- files: launch scripts and manifests, lines ----------------------------------------------------------

LAUNCH = """#!/bin/bash
vllm serve meta-llama/Llama-3.1-8B \\
  --port 8100 \\
  --kv-transfer-config '{"kv_connector":"MooncakeConnector",
                         "kv_role":"kv_producer",
                         "kv_connector_extra_config": {"protocol": "tcp"}}' &
vllm serve meta-llama/Llama-3.1-8B --port 8200 --kv-transfer-config=DECODE_JSON
""".replace("DECODE_JSON", json.dumps(json.dumps({"kv_connector": "NixlConnector", "kv_rank": 1,
                                                   "kv_role": "kv_consumer"}, separators=(",", ":"))))

MANIFEST = """apiVersion: apps/v1
kind: Deployment
spec:
  template:
    spec:
      containers:
        - name: prefill
          args:
            - --model
            - meta-llama/Llama-3.1-8B
            - --kv-transfer-config
            - '{"kv_connector":"OffloadingConnector","kv_role":"kv_both",
               "kv_connector_extra_config":{"num_cpu_blocks":10000}}'
        - name: decode
          command: ["vllm", "serve", "m", "--kv-transfer-config", OLD_JSON]
""".replace("OLD_JSON", json.dumps(json.dumps({"kv_connector": "SharedStorageConnector", "kv_role": "kv_both"},
                                               separators=(",", ":"))))


def test_launch_script_problems_are_reported_at_their_own_lines(tmp_path):
    script = tmp_path / "launch.sh"
    script.write_text(LAUNCH)
    results, findings = lint(str(script))
    assert len(results) == 2
    where = {(f.id, f.line) for f in findings}
    assert ("unknown-extra-key", 6) in where and ("removed-field", 7) in where
    assert all(f.file == str(script) for f in findings)


def test_manifest_problems_are_reported_at_their_own_lines(tmp_path):
    manifest = tmp_path / "decode.yaml"
    manifest.write_text(MANIFEST)
    _, findings = lint(str(manifest))
    where = {(f.id, f.line) for f in findings}
    assert ("retired-extra-key", 13) in where and ("renamed-connector", 15) in where


def test_formats_and_exit_codes_of_the_cli(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    proc = kvconf_cli("lint", "--format", "github", str(manifest), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"::error file={manifest},line=13::[retired-extra-key]" in proc.stdout
    proc = kvconf_cli("lint", "--format", "json", "-", cwd=tmp_path,
                      stdin='{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}')
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    assert kvconf_cli("lint", str(tmp_path / "missing.json"), cwd=tmp_path).returncode == 2
    (tmp_path / "empty.sh").write_text("echo hello\n")
    proc = kvconf_cli("lint", str(tmp_path / "empty.sh"), cwd=tmp_path)
    assert proc.returncode == 2 and "neither" in proc.stderr and "Traceback" not in proc.stderr


def test_lint_imports_neither_torch_nor_vllm(tmp_path):
    code = ("import sys; from kvconf.ci.lint import main; "
            "rc = main(['{\"kv_connector\":\"MultiConnector\",\"kv_role\":\"kv_both\",\"kv_connector_extra_config\":"
            "{\"connectors\":[{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}]}}']); "
            "print(rc, 'torch' in sys.modules, 'vllm' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=kvconf_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split()[-3:] == ["0", "False", "False"], proc.stdout + proc.stderr


# ---- import: the round trip ----------------------------------------------------------------------------


def _round_trip(ktc: dict, workdir: Path, name: str) -> dict:
    src = workdir / "in.json"
    src.write_text(json.dumps(ktc))
    proc = kvconf_cli("import", str(src), "--out", "conf", "--name", name, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "conf" / "connector" / f"{name}.yaml").is_file()
    back = run_kvconf("--config-dir", "conf", f"connector={name}", "action=export", cwd=workdir)
    assert back.returncode == 0, back.stderr
    return json.loads(back.stdout)


@pytest.mark.parametrize("name", BUILTINS)
def test_import_then_export_round_trips_every_builtin_export(name, compose, workdir):
    overrides = {"mooncake": ["connector.extra.protocol=tcp", "connector.extra.num_workers=3"],
                 "nixl": ["connector.extra.num_threads=2", "connector.kv_role=kv_consumer"],
                 "offloading": ["connector.extra.block_size=64"],
                 "shared_storage": ["connector.kv_load_failure_policy=recompute"], "multi": []}[name]
    ktc = run_job({**compose(f"connector={name}", *overrides), "action": "export"})["kv_transfer_config"]
    assert _round_trip(ktc, workdir, f"imported_{name}") == ktc


def test_multiconnector_json_with_nixl_and_offloading_round_trips(workdir):
    ktc = {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "NixlConnector", "kv_role": "kv_producer",
         "kv_connector_extra_config": {"backends": ["UCX"], "enforce_handshake_compat": False}},
        {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"cpu_bytes_to_use": 2000000000, "spec_name": "CPUOffloadingSpec"}}]}}
    back = _round_trip(ktc, workdir, "pd_with_tier")
    defaults = {"kv_load_failure_policy": "fail"}

    def strip(d: dict) -> dict:
        out = {k: v for k, v in d.items() if defaults.get(k, object()) != v}
        extra = dict(out.get("kv_connector_extra_config") or {})
        if "connectors" in extra:
            extra["connectors"] = [strip(c) for c in extra["connectors"]]
        extra.pop("eviction_policy", None)  # vLLM's default, exported by kvconf
        out["kv_connector_extra_config"] = extra
        return out

    assert strip(back) == strip(ktc)


def test_import_of_a_connector_kvconf_has_no_counterpart_of_exits_1(workdir):
    proc = kvconf_cli("import", '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}', cwd=workdir)
    assert proc.returncode == 1 and "no counterpart" in proc.stderr and "NixlConnector (as nixl)" in proc.stderr


def test_import_refuses_a_misconfigured_json_with_lints_messages(workdir):
    proc = kvconf_cli("import", '{"kv_connector":"NixlConnector"}', cwd=workdir)
    assert proc.returncode == 1 and "kv_role" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_lists_every_catalogue_entry():
    from conftest import REPO

    table = (REPO / "README.md").read_text().split("<!-- catalogue -->")[1].split("<!-- /catalogue -->")[0]
    listed = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert listed == [e.id for e in (*CATALOGUE, *NOTICES)]


def test_every_catalogue_entry_exits_1_and_every_notice_exits_0(tmp_path):
    sys.path.insert(0, str(TESTS))  # zoo.connectors, for --import-modules
    for entry in CATALOGUE:
        if entry.id != "external-contract":
            assert lint_main([entry.example]) == 1, entry.id
    assert lint_main(["--import-modules", CATALOGUE[[e.id for e in CATALOGUE].index("external-contract")].example]) == 1
    script = tmp_path / "launch.sh"
    script.write_text(NOTICES[0].example + "\n")
    assert lint_main([str(script)]) == 0 and lint_main([NOTICES[1].example]) == 0


def test_manifest_with_the_json_in_a_block_scalar(tmp_path):
    manifest = tmp_path / "args.yaml"
    manifest.write_text("args:\n  - --kv-transfer-config\n  - |\n    {\"kv_connector\": \"NixlConnector\",\n"
                        "     \"kv_role\": \"kv_prefill\"}\n")
    _, findings = lint(str(manifest))
    assert [(f.id, f.line) for f in findings] == [("bad-kv-role", 5)]


def test_nested_multiconnector_children_are_checked_too():
    _, findings = lint('{"kv_connector":"MultiConnector","kv_role":"kv_both","kv_connector_extra_config":{"connectors":'
                       '[{"kv_connector":"MultiConnector","kv_role":"kv_both","kv_connector_extra_config":'
                       '{"connectors":[{"kv_connector":"NixlConnector"}]}}]}}')
    assert [(f.id, f.path) for f in findings] == [
        ("missing-kv-role", "kv_connector_extra_config.connectors[0].kv_connector_extra_config.connectors[0]"
                            ".kv_connector")]


def test_a_file_with_a_byte_order_mark_is_read(tmp_path):
    f = tmp_path / "bom.json"
    f.write_bytes(b'\xef\xbb\xbf{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}')
    results, _ = lint(str(f))
    assert results[0].ok and results[0].value["kv_role"] == "kv_consumer"

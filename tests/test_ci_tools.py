"""kvconf for CI: kvconf validate, kvconf check-connector, the schemas, the conformance kit."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONF, REPO, kvconf_env, run_kvconf


def kvconf_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_kvconf(*args, cwd=cwd)


# ---- kvconf validate ---------------------------------------------------------------------------------


def test_matrix_of_the_repository_is_valid_and_counted(workdir):
    proc = kvconf_tool("validate", "--matrix", "--format", "json", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["checked"] >= 32 and out["errors"] == []
    text = kvconf_tool("validate", "--matrix", cwd=workdir)
    assert text.returncode == 0 and f"{out['checked']} combinations checked, all valid" in text.stdout


@pytest.fixture
def broken_dir(tmp_path) -> Path:
    d = tmp_path / "userconf"
    (d / "connector").mkdir(parents=True)
    (d / "connector" / "mine.yaml").write_text(
        "# my connector\nname: mooncake\nkv_role: kv_prodcer\nkv_prot: 1\nkv_port: \"abc\"\nextra:\n  protocl: tcp\n")
    return d


def test_matrix_with_a_broken_user_connector_names_file_line_and_key(workdir, broken_dir):
    proc = kvconf_tool("validate", "--matrix", "--config-dir", str(broken_dir), cwd=workdir)
    assert proc.returncode == 1
    f = broken_dir / "connector" / "mine.yaml"
    for line, key in ((3, "connector.kv_role"), (4, "connector.kv_prot"), (5, "connector.kv_port"),
                      (7, "connector.extra.protocl")):
        assert f"{f}:{line}:" in proc.stdout and key in proc.stdout
    assert "did you mean kv_producer?" in proc.stdout and "FAIL connector=mine" in proc.stdout


def test_github_format_prints_one_annotation_per_error(workdir, broken_dir):
    proc = kvconf_tool("validate", "--matrix", "--config-dir", str(broken_dir), "--format", "github", cwd=workdir)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all(ln.startswith(f"::error file={broken_dir / 'connector' / 'mine.yaml'},line=")
                                   for ln in lines)
    assert any(",line=4,col=1::connector.kv_prot" in ln for ln in lines)


def test_validate_files_takes_the_group_from_the_folder(workdir, broken_dir, tmp_path):
    proc = kvconf_tool("validate", str(broken_dir / "connector" / "mine.yaml"), "--format", "json", cwd=workdir)
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and out["checked"] == 1 and len(out["errors"]) == 4
    e = next(e for e in out["errors"] if e["path"] == "connector.kv_role")
    assert (e["line"], e["column"], e["value"]) == (3, 1, "kv_prodcer") and e["fix"]
    odd = tmp_path / "layout.yaml"
    odd.write_text("num_layers: 2\nnum_blocks: -1\ngroups:\n  - type: full_attention\n    num_kv_heads: 1\n"
                   "    head_size: 64\n")
    proc = kvconf_tool("validate", "--group", "kv_cache", str(odd), "--format", "json", cwd=workdir)
    (e,) = json.loads(proc.stdout)["errors"]
    assert proc.returncode == 1 and (e["path"], e["line"]) == ("kv_cache.num_blocks", 2)


def test_validate_accepts_every_shipped_file_and_a_whole_config(workdir, tmp_path):
    files = sorted(str(p) for p in CONF.glob("*/*.yaml"))
    assert kvconf_tool("validate", *files, cwd=workdir).returncode == 0
    whole = run_kvconf("--cfg", "job", "kv_cache=llama3_8b", cwd=workdir).stdout
    (tmp_path / "whole.yaml").write_text(whole)
    assert kvconf_tool("validate", str(tmp_path / "whole.yaml"), cwd=workdir).returncode == 0


@pytest.mark.parametrize("args", [("--nope",), (str(Path("/no/such/file.yaml")),), ()])
def test_validate_usage_errors_exit_2(workdir, args):
    assert kvconf_tool("validate", *args, cwd=workdir).returncode == 2


def test_validate_is_also_a_module(workdir):
    proc = subprocess.run([sys.executable, "-m", "kvconf.ci.validate", str(CONF / "kv_cache/tiny.yaml")],
                          cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0 and "1 files checked, all valid" in proc.stdout


def test_matrix_imports_no_torch_and_allocates_nothing():
    code = ("import sys; from kvconf.ci.validate import validate_matrix; r = validate_matrix([]); "
            "print(r.checked, 'torch' in sys.modules, 'kvconf.runtime.allocate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 32 and out[1:] == ["False", "False"]


# ---- kvconf check-connector --------------------------------------------------------------------------


@pytest.mark.parametrize("target,verdict,ok", [
    ("zoo.connectors:Good", "ok", True),
    ("zoo.connectors:Legacy", "legacy", False),
    ("zoo.connectors:KwargsOnly", "kwargs_only", False),
    ("zoo.connectors:KeywordOnly", "keyword_only", False),
    ("zoo.connectors:Renamed", "ok", True),
    ("zoo.connectors:a_function", "not_a_class", False),
    ("zoo.connectors:Nope", "missing_class", False),
    ("zoo.broken_import:X", "import_error", False),
])
def test_check_connector_verdicts(workdir, target, verdict, ok):
    proc = kvconf_tool("check-connector", target, "--format", "json", cwd=workdir)
    assert proc.returncode == (0 if ok else 1), proc.stderr
    (r,) = json.loads(proc.stdout)["results"]
    assert r["verdict"] == verdict and r["ok"] is ok
    if not ok:
        assert r["fix"]


def test_check_connector_says_where_vllm_decides_otherwise(workdir):
    import re

    proc = kvconf_tool("check-connector", "zoo.connectors:KwargsOnly", "zoo.connectors:KeywordOnly",
                       "zoo.connectors:Renamed", "zoo.connectors:Legacy", cwd=workdir)
    assert proc.returncode == 1
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^(?:ok  |FAIL) zoo\.connectors:(\w+).*?(?=^(?:ok  |FAIL) |\Z)",
                                                         proc.stdout)}
    accepts = "vLLM's check (a parameter named kv_cache_config, or **kwargs) would accept"
    assert accepts in blocks["KwargsOnly"] and accepts in blocks["KeywordOnly"]
    assert "vLLM's check would reject this class" in blocks["Renamed"]
    assert "note:" not in blocks["Legacy"]  # both reject it


def test_check_connector_all_ok_exits_0_and_never_imports_torch():
    code = ("import sys; from kvconf.ci.check_connector import main; "
            "rc = main(['zoo.connectors:Good', 'kvconf_connectors.mooncake:MooncakeConnector', '--format', 'json']); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=kvconf_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False"


def test_check_connector_usage_error_exits_2(workdir):
    assert kvconf_tool("check-connector", "not-a-target", cwd=workdir).returncode == 2


# ---- schemas -----------------------------------------------------------------------------------------


def test_schema_check_fails_when_a_field_changes_without_regenerating(tmp_path):
    copy_root = tmp_path / "copy"
    for folder, to in (("kvconf", "kvconf"), ("conf", "kvconf/conf"), ("connectors", "kvconf_connectors"),
                       ("schemas", "schemas")):
        shutil.copytree(REPO / folder, copy_root / to)  # laid out as installed
    env = {**kvconf_env(), "PYTHONPATH": str(copy_root)}
    cmd = [sys.executable, "-m", "kvconf.ci.schemas", "--check", "--out", str(copy_root / "schemas")]
    # cwd: not the repository, whose kvconf/ would be found before the copy
    assert subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True).returncode == 0
    schema_py = copy_root / "kvconf" / "config" / "models.py"
    schema_py.write_text(schema_py.read_text().replace("kv_port: int = Field(14579,", "kv_port: int = Field(14580,"))
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "connector.schema.json" in proc.stderr and "kv_port/default" in proc.stderr


def jsonschema_verdict(schema_name: str, data) -> bool:
    import jsonschema

    schema = json.loads((REPO / "schemas" / schema_name).read_text())
    return jsonschema.Draft202012Validator(schema).is_valid(data)


def pydantic_verdict(group: str, data) -> bool:
    from kvconf.ci.validate import _group_problems

    return not _group_problems(group, data)


def variants():
    """(group, label, data): every shipped file, and bad ones, one constraint each."""
    out = []
    for p in sorted(CONF.glob("*/*.yaml")):
        out.append((p.parent.name, f"shipped {p.parent.name}/{p.name}", yaml.safe_load(p.read_text())))
    conn = yaml.safe_load((CONF / "connector/mooncake.yaml").read_text())
    kv = yaml.safe_load((CONF / "kv_cache/llama3_8b.yaml").read_text())

    def edit(base, path, value, delete=False):
        d = copy.deepcopy(base)
        node = d
        for k in path[:-1]:
            node = node[k]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return d

    bad_connector = [
        ("typo in a key", edit(conn, ["kv_rol"], "kv_both")),
        ("bad kv_role", edit(conn, ["kv_role"], "producer")),
        ("kv_role missing", edit(conn, ["kv_role"], None, delete=True)),
        ("kv_port a string", edit(conn, ["kv_port"], "14579")),
        ("kv_port out of range", edit(conn, ["kv_port"], 70000)),
        ("bad policy", edit(conn, ["kv_load_failure_policy"], "retry")),
        ("empty module_path", edit(conn, ["module_path"], "")),
        ("blank module_path", edit(conn, ["module_path"], "  ")),
        ("typo in extra", edit(conn, ["extra", "protocl"], "tcp")),
        ("bad protocol", edit(conn, ["extra", "protocol"], "udp")),
        ("num_workers 0", edit(conn, ["extra", "num_workers"], 0)),
        ("timeout negative", edit(conn, ["extra", "transfer_timeout"], -1.0)),
        ("timeout a string", edit(conn, ["extra", "transfer_timeout"], "30")),
        ("boolean port", edit(conn, ["kv_port"], True)),
    ]
    bad_kv = [
        ("typo in a key", edit(kv, ["num_layer"], 32)),
        ("block_size 0", edit(kv, ["block_size"], 0)),
        ("bad dtype", edit(kv, ["dtype"], "fp16")),
        ("heads a string", edit(kv, ["groups", 0, "num_kv_heads"], "8")),
        ("bad group type", edit(kv, ["groups", 0, "type"], "flash")),
        ("unknown group key", edit(kv, ["groups", 0, "head_sise"], 128)),
        ("memory not a size", edit(kv, ["memory"], "lots")),
        ("memory negative", edit(kv, ["memory"], -5)),
        ("no groups", edit(kv, ["groups"], [])),
        ("mla with heads", {"num_layers": 2, "num_blocks": 2, "groups": [{"type": "mla", "head_size": 64,
                                                                           "num_kv_heads": 2}]}),
    ]
    out += [("connector", f"bad connector: {label}", d) for label, d in bad_connector]
    out += [("kv_cache", f"bad kv_cache: {label}", d) for label, d in bad_kv]
    out += [("role", "bad role", {"role": "both"}), ("role", "role typo key", {"rol": "worker"})]
    return out


@pytest.mark.parametrize("group,label,data", variants(), ids=[v[1] for v in variants()])
def test_json_schema_and_pydantic_agree(group, label, data):
    pytest.importorskip("jsonschema")
    js = jsonschema_verdict(f"{group}.schema.json", data)
    pd = pydantic_verdict(group, data)
    assert js == pd, f"{label}: JSON Schema says {'valid' if js else 'invalid'}, pydantic {'valid' if pd else 'invalid'}"
    assert js == label.startswith("shipped")


# ---- the conformance kit -----------------------------------------------------------------------------


def conformance(target: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """The kit run on ``target``; the host tier with 64 MiB (its default 1 GiB pool is zeroed at
    registration: seconds, in each of the kit's five tests)."""
    if "Offloading" in target:
        extra = ("--kvconf-override", "connector.extra.cpu_bytes_to_use=64MiB", *extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--kvconf-connector",
                           target, *extra], cwd=cwd, env=kvconf_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("target", ["kvconf_connectors.example:ExampleConnector",
                                    "kvconf_connectors.offloading:OffloadingConnector",
                                    "kvconf_connectors.shared_storage:SharedStorageConnector",
                                    "kvconf_connectors.mooncake:MooncakeConnector",
                                    "kvconf_connectors.nixl:NixlConnector"])
@pytest.mark.torch
def test_built_in_connectors_pass_the_conformance_kit(workdir, tmp_path, target):
    extra = ("--kvconf-override", f"connector.extra.shared_storage_path={tmp_path / 'kv'}") if "shared" in target else ()
    proc = conformance(target, workdir, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "5 passed" in proc.stdout


@pytest.mark.torch
def test_conformance_kit_fails_a_broken_connector_with_a_readable_reason(workdir):
    proc = conformance("zoo.connectors:LeaksCaches", workdir)
    assert proc.returncode == 1
    assert "after shutdown() the connector still holds tensors" in proc.stdout
    assert "connector.kept" in proc.stdout
    proc = conformance("zoo.connectors:Swallows", workdir)
    assert proc.returncode == 1 and "did not pass kv_cache_config to super().__init__()" in proc.stdout


def test_pre_commit_hook_runs_kvconf_validate(workdir):
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "kvconf-validate" and hook["entry"].split()[:2] == ["kvconf", "validate"]
    proc = subprocess.run([str(Path(sys.executable).with_name("kvconf")), "validate",
                           str(CONF / "connector/mooncake.yaml")], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_matrix_composes_each_combination_as_hydra_does(tmp_path):
    from kvconf.ci.validate import _hydra_compose, combinations

    user = tmp_path / "u"
    (user / "kv_cache").mkdir(parents=True)
    (user / "kv_cache" / "mine.yaml").write_text("num_layers: 1\nnum_blocks: 2\ngroups: [{type: mla, head_size: 8}]\n")
    combos = list(combinations([user]))
    assert len(combos) == 7 * 2 * 6  # connectors x roles x (5 shipped layouts + mine)
    for combo in combos:
        hydra = _hydra_compose([user], combo.chosen)
        for key in ("engine_id",):
            hydra["connector"].pop(key, None), combo.data["connector"].pop(key, None)
        assert combo.data == hydra, combo.label


WRITES_AT_IMPORT = '''
from pathlib import Path

from kvconf_connectors.example import ExampleConnector

Path(__file__).with_name("imported.txt").write_text("this module ran")


class Loud(ExampleConnector):
    """A connector whose module writes a file when imported."""
'''


@pytest.mark.parametrize("form", ["matrix", "whole-config"])
def test_validate_never_runs_a_module_path_module_unless_asked(form, tmp_path):
    pkg = tmp_path / "code"
    pkg.mkdir()
    (pkg / "loud.py").write_text(WRITES_AT_IMPORT)
    conf = tmp_path / "conf"
    (conf / "connector").mkdir(parents=True)
    node = "name: Loud\nmodule_path: loud\nkv_role: kv_both\n"
    (conf / "connector" / "loud.yaml").write_text(node)
    whole = tmp_path / "whole.yaml"
    whole.write_text("connector:\n  " + node.replace("\n", "\n  ").rstrip() + "\nrole: scheduler\nkv_cache:\n"
                     "  num_layers: 2\n  num_blocks: 8\n  groups: [{type: full_attention, num_kv_heads: 1, head_size: 8}]\n")
    args = ["--matrix", "--config-dir", str(conf)] if form == "matrix" else [str(whole)]
    env = kvconf_env(PYTHONPATH=str(pkg))
    run = [sys.executable, "-m", "kvconf", "validate", *args]
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (pkg / "imported.txt").exists()  # read from source: checked, never run
    proc = subprocess.run([*run, "--import-modules"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (pkg / "imported.txt").read_text() == "this module ran"


def test_validate_reads_a_legacy_connector_from_source_and_rejects_it(tmp_path):
    conf = tmp_path / "conf"
    (conf / "connector").mkdir(parents=True)
    (conf / "connector" / "old.yaml").write_text("name: Legacy\nmodule_path: zoo.connectors\nkv_role: kv_both\n")
    proc = subprocess.run([sys.executable, "-m", "kvconf", "validate", "--matrix", "--config-dir", str(conf)],
                          cwd=tmp_path, env=kvconf_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "legacy 2-argument constructor" in proc.stdout

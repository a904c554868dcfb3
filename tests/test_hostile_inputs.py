"""The hostile-input corpus (tests/hostile_corpus.py) through the app and through validate, lint
and import, as a user runs them: each input ends with the exit code a config error has (2 from
the app, 1 from validate/lint/import: the file is invalid), the file and line or the key named, no
traceback, no control character sent to the terminal, within a bound on time and memory that the
harness measures (generous: the corpus is timed on its own in benchmarks/bench_hostile_inputs.py).
Real configs still pass: tests/test_ci_tools.py, test_lint.py and test_readme.py run them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hostile_corpus import CORPUS, Case

from conftest import kvconf_env

SECONDS = 10.0
"""Per command, with room for a loaded CI machine (alone, each takes under a second here)."""
MEMORY_MB = 500


_MEASURE = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(json.loads(sys.argv[1]))\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[2], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n")
"""Runs a command and writes its exit code and peak memory. A small process of its own starts it:
Linux counts the memory of the process that forked a child into the child's peak (at ``exec``),
and pytest's worker holds hundreds of MB."""


def measured(args: list[str | bytes], cwd: Path) -> tuple[int, str, float, float]:
    """``python -m kvconf ARGS``: (exit code, stdout and stderr, seconds, peak memory in MB),
    measured for that process alone (``wait4``); stopped past twice :data:`SECONDS`."""
    import json

    argv = [os.fsdecode(a) if isinstance(a, bytes) else a for a in args]
    cmd = [sys.executable, "-m", "kvconf", *argv]
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile(suffix=".json") as result:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, json.dumps(cmd), result.name], cwd=cwd,
                                env=kvconf_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timer = threading.Timer(2 * SECONDS, lambda: os.killpg(proc.pid, 9))
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        code, kb = json.loads(Path(result.name).read_text() or "[-9, 0]")
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    return code, text, seconds, kb / 1024


def check(run: tuple[int, str, float, float], code: int, *named: str, chars: int = 20_000) -> None:
    rc, text, seconds, mb = run
    assert rc == code, f"exit {rc}, expected {code}:\n{text[-3000:]}"
    for piece in named:
        assert piece in text, f"{piece!r} is not named:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert not any(c in text for c in "\x00\x01\x1b\x7f"), "a control character reached the terminal"
    assert len(text) < chars, f"{len(text)} characters of output: a value was not shortened"
    assert seconds < SECONDS, f"{seconds:.1f} s"
    assert mb < MEMORY_MB, f"{mb:.0f} MB"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def files_of(case: Case, root: Path) -> Path:
    """Where ``case``'s file is written under ``root``."""
    if case.kind == "file":
        return root / case.id / "conf" / case.group / f"{case.option}.yaml"
    if case.kind == "json":
        return root / case.id / ("launch.sh" if "script" in case.id else "transfer.json")
    return root / case.id / "model" / "config.json"


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_a_hostile_input_is_one_clear_message_in_bounded_time_and_memory(case: Case, tmp_path: Path) -> None:
    """Through the app (files, overrides, a model's config.json) or ``kvconf import`` (vLLM's
    JSON); validate and lint read the same files in the two tests below, all in one process each."""
    file = files_of(case, tmp_path) if case.kind != "override" else None
    if file is not None:
        write(file, case.content)
    if case.kind == "file":
        assert file is not None
        conf = file.parents[1]
        named = (f"{file.name}:{case.line}",) if case.key is None else (case.key,)
        check(measured(["--config-dir", str(conf), f"{case.group}={case.option}", *case.extra_args,
                        "action=check"], tmp_path), 2, *named)
    elif case.kind == "override":
        check(measured([*case.args, "action=check"], tmp_path), 2, str(case.key))
    elif case.kind == "json":
        check(measured(["import", str(file)], tmp_path), case.import_code)
    else:
        check(measured([f"kv_cache.model={file}", "action=check"], tmp_path), 2, str(case.key),
              case.named or f"config.json:{case.line}")


@pytest.mark.parametrize("command", ["validate", "lint"])
def test_validate_and_lint_mark_each_hostile_file_invalid_at_its_line(command: str, tmp_path: Path) -> None:
    """Every file of the corpus in one ``kvconf validate`` (group files) or ``kvconf lint`` (vLLM's
    JSON, launch scripts): each named at its line, the run bounded as one input is."""
    kind = "file" if command == "validate" else "json"
    cases = [c for c in CORPUS if c.kind == kind]
    files = [write(files_of(c, tmp_path), c.content) for c in cases]
    rc, text, seconds, mb = measured([command, *map(str, files)], tmp_path)
    check((rc, text, seconds / len(files), mb), 1, chars=5_000 * len(files))
    for case, file in zip(cases, files):
        assert f"{file}:{case.line}:" in text, (case.id, text[-3000:])
    if command == "validate":
        assert f"{len(files)} files checked, {len(files)} invalid" in text, text[-500:]


def test_the_corpus_holds_every_kind_the_issue_names() -> None:
    ids = [c.id for c in CORPUS]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    for kind in ("laughs", "deep", "MiB", "KiB", "control", "utf8", "size-", "override-"):
        assert sum(kind in i for i in ids) >= 2, kind


def test_validate_matrix_refuses_a_hostile_folder_before_composing_it(tmp_path: Path) -> None:
    from hostile_corpus import CONNECTOR_HEAD, laughs

    write(tmp_path / "conf" / "connector" / "evil.yaml", CONNECTOR_HEAD + "extra:\n" + laughs(8))
    run = measured(["validate", "--matrix", "--config-dir", str(tmp_path / "conf")], tmp_path)
    check(run, 1, "evil.yaml:8")


def test_schemas_check_refuses_a_hostile_schema_file(tmp_path: Path) -> None:
    import shutil

    from conftest import REPO

    out = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas", out)
    write(out / "connector.schema.json", "{\n" + '"a": ' + "[" * 5000 + "]" * 5000 + "}")
    proc = subprocess.run([sys.executable, "-m", "kvconf.ci.schemas", "--check", "--out", str(out)],
                          capture_output=True, text=True, env=kvconf_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "connector.schema.json" in proc.stdout + proc.stderr
    assert "nested more than 64 levels deep" in proc.stdout + proc.stderr


def test_a_primary_config_of_ones_own_is_read_under_the_same_bounds(tmp_path: Path) -> None:
    """``--config-path DIR`` (``-cp``): a primary config.yaml of one's own, read by Hydra, is
    checked first as a ``--config-dir`` folder is."""
    from hostile_corpus import laughs

    write(tmp_path / "mine" / "config.yaml", "defaults:\n  - _self_\nx:\n" + laughs(8))
    check(measured(["-cp", str(tmp_path / "mine"), "-cn", "config", "action=check"], tmp_path), 2, "config.yaml:8")

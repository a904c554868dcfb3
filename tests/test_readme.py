"""Every command in the README's shell blocks runs as written and exits 0 (or the code its comment
gives: ``# exit 2: ...``), unless its own comment says what it needs (``# needs: ...``: a second
terminal, your own module). The set-up
scripts are not run from inside the suite (``bash scripts/test.sh`` is what runs it); the command
``scripts/run.sh`` ends with is. Commands run in a folder of their own (``kvconf/`` and ``conf/``
linked into it, for the paths the README gives), with this environment's ``python``, ``kvconf``
and ``pytest`` first on PATH. An ``action=bench`` command runs with :data:`QUICK` appended: the
same jobs through the same paths, in a fraction of the time (the suite checks that the command
works; the figures are the benchmarks' business, and the README's table came from the command as
written)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, kvconf_env

PROGRAMS = ("python -m kvconf", "kvconf ", "pytest --kvconf", 'eval "$(python -m kvconf')
NO_TORCH = ("action=check", "action=export", "role=scheduler", "--help", "--version", "-sc ", "validate",
            "check-connector")
"""What runs without torch (nothing is allocated)."""
QUICK = "bench.repetitions=1 bench.warmup=0 bench.min_seconds=0"
"""Appended to an ``action=bench`` command: one repetition of one round."""


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, what it needs or None) for each command line of the README's shell blocks; a
    command whose comment starts ``exit N:`` keeps the comment, for :func:`expected_exit`."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        lang, body = block
        if lang not in ("", "sh", "bash", "console"):
            continue
        for line in body.splitlines():
            if not line.startswith(PROGRAMS):
                continue
            command, _, comment = line.partition("  #")
            note = comment.strip()
            needs = note[len("needs:"):].strip() if note.startswith("needs:") else None
            out.append((command.strip() + (f"  # {note}" if note.startswith("exit ") else ""), needs))
    return out


def run_sh_command() -> str:
    """The command ``scripts/run.sh`` runs once the set-up is done, as a user would type it."""
    line = next(ln for ln in (REPO / "scripts" / "run.sh").read_text().splitlines() if "-m kvconf" in ln)
    args = line.split("-m kvconf", 1)[1].replace('"$@"', "").strip()
    return f"python -m kvconf {args}"


def _marks(command: str) -> list:
    marks = []
    if not any(x in command for x in NO_TORCH) or "pytest --kvconf" in command:
        marks.append(pytest.mark.torch)
        for engine in ("mooncake", "nixl"):
            if engine in command:
                marks.append(getattr(pytest.mark, engine))
    return marks


CASES = [pytest.param(c, n, marks=_marks(c), id=c[:80]) for c, n in readme_commands()]
CASES.append(pytest.param(run_sh_command(), None, marks=_marks(run_sh_command()), id="scripts/run.sh's command"))


def test_the_readme_has_commands_and_says_what_the_others_need():
    commands = readme_commands()
    assert len(commands) >= 20
    assert any(needs for _, needs in commands)
    assert run_sh_command() == "python -m kvconf connector=mooncake role=worker"


@pytest.mark.parametrize(("command", "needs"), CASES)
def test_readme_command_runs_as_written(command, needs, tmp_path):
    if needs:
        pytest.skip(f"the README says it needs {needs}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "kvconf").symlink_to(REPO / "kvconf")
    (cwd / "conf").symlink_to(REPO / "conf")  # the README names conf/models/...
    env = kvconf_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command, _, note = command.partition("  # ")
    expected = int(note.split(":")[0].split()[1]) if note.startswith("exit ") else 0
    if "action=bench" in command and command.startswith("python -m kvconf"):
        command = f"{command} {QUICK}"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == expected, f"{shlex.quote(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr

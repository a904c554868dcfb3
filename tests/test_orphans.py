"""No orphans: a peer process started by ``action=run`` dies with its parent, SIGKILL included, and
leaves no temporary file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import kvconf_env, owned_processes


def listening(pid: int, state: str = "0A") -> bool:
    """Whether process ``pid`` holds a TCP socket in ``state`` (0A: listening, 01: connected)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(r.split()[3] == state and r.split()[9] in inodes for r in rows):
            return True
    return False


@pytest.mark.torch
@pytest.mark.mooncake
def test_sigkill_of_action_run_leaves_no_process_and_no_temporary_file(workdir):
    tmp = Path(os.environ["TMPDIR"])
    log = workdir / "parent.log"  # what the job said, for the message where it ended before the kill
    with log.open("w") as out:
        parent = subprocess.Popen([sys.executable, "-m", "kvconf", "connector=mooncake", "self_test.transfer_bytes=4GiB",
                                   "output=json"], cwd=workdir, env=kvconf_env(), stdout=out, stderr=subprocess.STDOUT)

    def said() -> str:
        return f"the job exited {parent.returncode}: {log.read_text()[-2000:]}"

    try:
        deadline = time.monotonic() + 120
        while (time.monotonic() < deadline and parent.poll() is None
               and not any(listening(p) for p in owned_processes() if p != parent.pid)):
            time.sleep(0.05)  # until the producer peer serves (its side channel listens)
        assert parent.poll() is None, said()
        assert any(listening(p) for p in owned_processes() if p != parent.pid), "the producer peer never served"
        while time.monotonic() < deadline and parent.poll() is None and not listening(parent.pid, "01"):
            time.sleep(0.05)  # until the consumer is connected to it: the transfer is under way
        assert parent.poll() is None, said()
        time.sleep(0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and owned_processes():
            time.sleep(0.1)
        assert owned_processes() == [], "a kvconf process outlived its parent by 10 s"
        assert not list(tmp.glob("kvconf-peer-*")), "the peer's config file was left behind"
    finally:
        if parent.poll() is None:
            parent.kill()


PEER_THAT_HANGS = """
import os, signal, sys, time
from kvconf.runtime.process import die_with_parent
die_with_parent(grace=float(sys.argv[1]))
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM: shutting down slowly", flush=True))
print("ready", flush=True)
time.sleep(600)  # a shutdown that never ends (a peer stuck in a large request)
"""

PARENT = """
import os, subprocess, sys
from kvconf.runtime.process import PARENT_ENV
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env={**os.environ, PARENT_ENV: str(os.getpid())})
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("grace", [0.5, 2.0])
def test_a_peer_that_does_not_stop_on_sigterm_ends_its_grace_after_its_parent_died(workdir, grace):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, PEER_THAT_HANGS, str(grace)], cwd=workdir, env=kvconf_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert parent.stdout.readline() == "ready\n"  # the peer catches SIGTERM from here on
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        while time.monotonic() < killed + grace + 10 and child in owned_processes():
            time.sleep(0.05)
        ended = time.monotonic() - killed
        assert child not in owned_processes(), f"the peer outlived its parent by {grace + 10:g} s"
        assert ended >= grace * 0.9, f"the peer ended {ended:.2f} s after its parent: before its {grace:g} s grace"
    finally:
        if parent.poll() is None:
            parent.kill()


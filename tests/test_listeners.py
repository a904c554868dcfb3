"""What a kvconf process listens on is reported, with whether each listener is authenticated; the
engine listeners beyond loopback are named in a warning; NIXL's UCX listens on the side channel's
interface only. The cases with an address beyond loopback run in a network namespace the test makes
(a veth pair: the producer serves on 10.77.0.1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import json_out, kvconf_env, run_kvconf
from test_mooncake import producer  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.torch, pytest.mark.mooncake]

NETNS = """set -e
mount -t sysfs none /sys
ip link add v0 type veth peer name v1
ip addr add 10.77.0.1/24 dev v0
ip addr add 10.77.0.2/24 dev v1
ip link set lo up
ip link set v0 up
ip link set v1 up
exec "$@"
"""
"""Run by ``unshare -nm``: a fresh network namespace with loopback and two addresses on a veth pair (and
its own /sys, where UCX looks for network devices)."""

TWO_HOSTS = """
import json, signal, subprocess, sys
connector = sys.argv[1]
base = [sys.executable, "-m", "kvconf", f"connector={connector}", "role=worker", "output=json"]
serve = subprocess.Popen(base + ["connector.kv_role=kv_producer", "action=serve",
                                 "connector.extra.side_channel_host=10.77.0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
line = serve.stdout.readline()
address, key = line.split()[2], line.split("(key: ")[1].rstrip().rstrip(")")
consumer = subprocess.run(base + ["connector.kv_role=kv_consumer", f"connector.extra.peer={address}",
                                  f"connector.extra.auth_key_file={key}", "self_test.requests=2"],
                          capture_output=True, text=True, timeout=120)
serve.send_signal(signal.SIGTERM)
out, err = serve.communicate(timeout=60)
print(json.dumps({"address": address, "consumer": consumer.returncode, "consumer_err": consumer.stderr[-3000:],
                  "serve": json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]),
                  "serve_err": err[-3000:]}))
"""
"""Inside the namespace: a producer serving on 10.77.0.1, and a consumer given that address."""


def namespace_problem() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (iproute2) to make a network namespace"
    probe = subprocess.run(["unshare", "-nm", "sh", "-c", NETNS, "sh", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine does not let the test make a network namespace: {probe.stderr.strip()[:200]}"
    return None


def two_hosts(connector: str, workdir) -> dict:
    why = namespace_problem()
    if why:
        pytest.skip(why)
    proc = subprocess.run(["unshare", "-nm", "sh", "-c", NETNS, "sh", sys.executable, "-c", TWO_HOSTS, connector],
                          cwd=workdir, env=kvconf_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_serve_reports_its_side_channel_as_authenticated_and_warns_of_the_engines_listeners(producer):  # noqa: F811
    p = producer()
    code, out, err = p.stop()
    assert code == 0, err
    report = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    listeners = {x["address"]: x for x in report["listeners"]}
    assert listeners[p.address] == {"address": p.address, "what": "side channel", "authenticated": True,
                                    "loopback": True}
    engine = [x for x in report["listeners"] if x["what"] == "mooncake transfer engine"]
    assert engine and not any(x["authenticated"] for x in engine)
    open_ = [x["address"] for x in engine if not x["loopback"]]
    assert open_  # Mooncake binds every interface whatever it is told: a known engine limitation
    warning = next(ln for ln in err.splitlines() if ln.startswith("kvconf: warning:"))
    assert all(a in warning for a in open_) and "firewall" in warning
    assert f"{p.address} (side channel, authenticated)" in err  # said at start too
    assert report["serve"]["listeners"] == report["listeners"]


def test_the_text_report_of_a_run_says_what_listened(workdir):
    proc = run_kvconf("connector=mooncake", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("listening"))
    assert "mooncake transfer engine (not authenticated" in line


def test_nixl_listens_on_loopback_only_by_default(workdir):
    proc = run_kvconf("connector=nixl", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    listeners = json_out(proc)["listeners"]
    assert listeners and all(x["loopback"] for x in listeners), listeners
    assert "kvconf: warning" not in proc.stderr


@pytest.mark.nixl
def test_nixl_between_two_hosts_listens_on_the_side_channels_address_only(workdir):
    got = two_hosts("nixl", workdir)
    assert got["consumer"] == 0, got["consumer_err"]
    hosts = {x["address"].rsplit(":", 1)[0] for x in got["serve"]["listeners"]}
    assert hosts == {"10.77.0.1"}, got["serve"]["listeners"]  # UCX too: not 127.0.0.1, not every interface
    assert got["serve"]["serve"]["served_requests"] > 0


def test_mooncake_between_two_hosts_serves_and_names_its_open_engine_listeners(workdir):
    got = two_hosts("mooncake", workdir)
    assert got["consumer"] == 0, got["consumer_err"]
    side = [x for x in got["serve"]["listeners"] if x["what"] == "side channel"]
    assert side == [{"address": got["address"], "what": "side channel", "authenticated": True, "loopback": False}]
    assert got["address"].startswith("10.77.0.1:")
    assert "kvconf: warning: the mooncake transfer engine listens beyond loopback" in got["serve_err"]

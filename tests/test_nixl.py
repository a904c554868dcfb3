"""The nixl connector moves real KV blocks between two processes through NIXL's UCX backend (the
decode READs the blocks its kv_transfer_params name); every kvconf process that used NIXL exits 0
on success despite NIXL's exit crash."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TESTS, json_out, kvconf_env, owned_processes, run_kvconf, side_channel
from test_mooncake import EXIT_SLACK, TRANSFER_TIMEOUT, consumer_against, producer  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.torch, pytest.mark.nixl]

MiB = 1 << 20


def test_two_process_transfer_is_verified_and_every_process_exits_0(workdir):
    proc = run_kvconf("connector=nixl", "role=worker", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr  # not 139: the UCX exit crash is sidestepped
    st = json_out(proc)["self_test"]
    assert st["verified"] is True and st["bytes"] >= 64 * MiB and st["gbps"] > 0
    assert st["transport"] == "nixl-ucx" and "the decode reads" in st["transport_reason"]
    assert "exited with" not in proc.stderr  # the producer peer exited 0 too
    assert owned_processes() == []


def test_a_producer_started_by_run_starts_and_verifies_a_consumer(workdir):
    proc = run_kvconf("connector=nixl", "connector.kv_role=kv_producer", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    st = json_out(proc)["self_test"]
    assert st["verified"] and st["served_requests"] == st["loaded_requests"] > 0


def test_serve_workflow_and_sigterm(workdir, producer):  # noqa: F811
    p = producer(connector="nixl")
    consumer = run_kvconf("connector=nixl", "connector.kv_role=kv_consumer", *p.peer_args, "self_test.requests=3",
                          "output=json", cwd=workdir)
    assert consumer.returncode == 0, consumer.stderr
    st = json_out(consumer)["self_test"]
    assert st["verified"] and st["peer"] == p.address
    code, out, err = p.stop(signal.SIGTERM)
    assert code == 0, err
    report = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert report["serve"]["served_requests"] == st["loaded_requests"]
    host, port = p.address.rsplit(":", 1)
    with socket.socket() as s:
        s.bind((host, int(port)))
    assert owned_processes() == []


def test_frozen_producer_fails_requests_within_the_timeout(workdir, producer):  # noqa: F811
    p = producer("kv_cache=llama3_8b", connector="nixl")
    c = consumer_against(p, workdir, "connector.kv_load_failure_policy=recompute", connector="nixl")
    try:
        p.wait_served(consumer=c)
        p.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        out, err = c.communicate(timeout=60)
        elapsed = time.monotonic() - frozen
    finally:
        c.kill()
        p.proc.send_signal(signal.SIGCONT)
    assert c.returncode == 0, err
    st = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["self_test"]
    assert st["recomputed"] and st["loaded_requests"] >= 1 and st["verified"]
    assert elapsed < 2 * TRANSFER_TIMEOUT + EXIT_SLACK


def test_garbage_on_the_side_channel_is_rejected_and_serving_goes_on(workdir, producer):  # noqa: F811
    import msgpack

    p = producer(connector="nixl")
    s = side_channel(p.address, p.key_file)  # garbage from a peer that holds the key
    for junk in (b"\x00garbage", msgpack.packb({"v": 1, "type": "release"}), msgpack.packb({"v": 2})):
        s.send(junk)
    replies = [msgpack.unpackb(s.recv()) for _ in range(3) if s.poll(30000)]
    s.close()
    assert [r["type"] for r in replies] == ["rejected"] * 3
    consumer = run_kvconf("connector=nixl", "connector.kv_role=kv_consumer", *p.peer_args,
                          "self_test.requests=2", cwd=workdir)
    assert consumer.returncode == 0, consumer.stderr
    code, _, err = p.stop()
    assert code == 0 and "rejected a side-channel message" in err


def test_missing_nixl_exits_2_with_the_install_command(workdir):
    env = kvconf_env()
    env["PYTHONPATH"] = f"{TESTS / 'fake_nixl'}:{env['PYTHONPATH']}"
    proc = run_kvconf("connector=nixl", "role=worker", cwd=workdir, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1" in proc.stderr and "Traceback" not in proc.stderr


def test_nixl_and_mooncake_share_one_side_channel_module():
    from kvconf_connectors.mooncake import MooncakeConnector
    from kvconf_connectors.nixl import NixlConnector
    from kvconf_connectors.p2p.connector import P2PConnector

    assert issubclass(MooncakeConnector, P2PConnector) and issubclass(NixlConnector, P2PConnector)
    folder = REPO / "connectors"
    servers = [str(p.relative_to(folder)) for p in folder.rglob("*.py") if "zmq.ROUTER" in p.read_text()]
    assert servers == ["p2p/producer.py"]
    for name in ("mooncake.py", "nixl.py"):
        text = (folder / name).read_text()
        assert "zmq" not in text and "msgpack" not in text


def test_export_names_vllms_nixl_connector(workdir):
    proc = run_kvconf("connector=nixl", "action=export", "connector.kv_role=kv_consumer", cwd=workdir)
    out = json.loads(proc.stdout)
    assert out["kv_connector"] == "NixlConnector" and out["kv_connector_extra_config"] == {"backends": ["UCX"]}


def test_five_consumers_killed_mid_transfer_leave_no_blocks_pinned(workdir, producer):  # noqa: F811
    # each consumer holds the blocks it had prefilled for it; SIGKILL ends its connection
    p = producer("kv_cache=llama3_8b", "connector.extra.transfer_timeout=600", connector="nixl")
    consumers = [subprocess.Popen(
        [sys.executable, "-m", "kvconf", "connector=nixl", "connector.kv_role=kv_consumer", *p.peer_args,
         "kv_cache=llama3_8b", "self_test.transfer_bytes=32GiB", "output=json"],
        cwd=workdir, env=kvconf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(5)]
    try:
        for _ in range(5):
            p.wait_served(timeout=180)  # they are reading by now, or soon
        for c in consumers:
            c.kill()
            c.wait()
    finally:
        for c in consumers:
            c.kill()
            c.communicate()
    last = run_kvconf("connector=nixl", "connector.kv_role=kv_consumer", *p.peer_args, "kv_cache=llama3_8b",
                      "self_test.requests=1", "output=json", cwd=workdir)  # one request: every block of the cache
    assert last.returncode == 0, last.stderr
    assert json_out(last)["self_test"]["failed_requests"] == 0
    code, out, err = p.stop()
    assert code == 0, err
    serve = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["serve"]
    assert serve["expired_leases"] == 0  # released because their consumers went away, not by a timeout


def test_a_peer_serving_a_thousand_requests_keeps_answering(workdir):
    """The producer peer that kvconf starts logs a line per request it serves. Nobody read that
    pipe: 64 KiB in (about 830 requests), the peer blocked on its next line and the run failed
    with 'stopped answering'. 1,100 MiB in requests of 1 MiB are 1,100 of them, however fast the
    machine is (a second's worth was 816 on a loaded machine)."""
    proc = run_kvconf("connector=nixl", "kv_cache=tiny", "action=bench", "output=json", "bench.repetitions=1",
                      "bench.warmup=0", "bench.min_seconds=0", "self_test.transfer_bytes=1100MiB", "bench.raw=false",
                      "bench.ceilings=false", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    f = json_out(proc)["bench"]["figures"]
    assert f["requests"] > 1000 and f["verified"] is True

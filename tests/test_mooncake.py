"""The mooncake connector moves real KV blocks between two processes through the Mooncake
Transfer Engine (TCP on loopback); every test stops every process it starts."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TESTS, json_out, kvconf_env, owned_processes, run_kvconf, side_channel

pytestmark = [pytest.mark.torch, pytest.mark.mooncake]

MiB = 1 << 20


class Producer:
    """``python -m kvconf connector=mooncake ... action=serve`` in the background."""

    def __init__(self, cwd: Path, *overrides: str, connector: str = "mooncake") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvconf", f"connector={connector}", "role=worker", "connector.kv_role=kv_producer",
             "action=serve", "output=json", *overrides],
            cwd=cwd, env=kvconf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._seen = {"stdout": 0, "stderr": 0}
        self._more = threading.Condition()
        self._readers = [threading.Thread(target=self._collect, args=(name, getattr(self.proc, name)), daemon=True)
                         for name in self.lines]
        for t in self._readers:
            t.start()
        line = self._read_until("stdout", "serving on ", 60)  # serving on HOST:PORT (key: FILE)
        self.address = line.split()[2]
        self.key_file = line.split("(key: ", 1)[1].rstrip().rstrip(")")
        self.peer_args = (f"connector.extra.peer={self.address}", f"connector.extra.auth_key_file={self.key_file}")
        """What a consumer is given: the address and the key file the producer printed."""

    def _collect(self, name: str, stream) -> None:
        """One thread per pipe reads every line (a selector on a buffered text stream misses lines
        already in its buffer)."""
        for line in stream:
            with self._more:
                self.lines[name].append(line)
                self._more.notify_all()
        with self._more:
            self.lines[name].append("")  # end of stream
            self._more.notify_all()

    def _read_until(self, name: str, prefix: str, timeout: float,
                    peer: subprocess.Popen | None = None) -> str:
        """The next line on ``name`` that starts with ``prefix``, past those already read; fails at
        once when ``peer`` (the consumer it serves) has exited, with what the peer printed."""
        deadline = time.monotonic() + timeout
        why = f"within {timeout:g} s"
        with self._more:
            while True:
                lines = self.lines[name]
                while self._seen[name] < len(lines):
                    line = lines[self._seen[name]]
                    self._seen[name] += 1
                    if line.startswith(prefix):
                        return line
                    if line == "":
                        break
                else:
                    left = deadline - time.monotonic()
                    if peer is not None and peer.poll() is not None:
                        out, err = peer.communicate()
                        why = f"before its consumer exited ({peer.returncode}: {err[:3000]}{out[-300:]})"
                    elif left > 0:
                        self._more.wait(min(left, 1.0))
                        continue
                break
        self.proc.kill()
        self._join()
        raise AssertionError(f"producer never printed {prefix!r} {why} (exit code {self.proc.returncode}); its "
                             f"stderr:\n{''.join(self.lines['stderr'])}")

    def wait_served(self, timeout: float = 300, consumer: subprocess.Popen | None = None) -> str:
        """The next ``served`` line. Generous: on a loaded 2-core CI machine (a hundred consumers in
        the next test) a consumer can take minutes to start; one that exits fails this at once."""
        return self._read_until("stderr", "served ", timeout, consumer)

    def _join(self) -> None:
        self.proc.wait(timeout=30)
        for t in self._readers:
            t.join(timeout=30)

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str, str]:
        """Signals the producer and returns its exit code and everything it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self._join()
        return self.proc.returncode, "".join(self.lines["stdout"]), "".join(self.lines["stderr"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self._join()


@pytest.fixture
def producer(workdir):
    made = []

    def start(*overrides: str, connector: str = "mooncake") -> Producer:
        p = Producer(workdir, *overrides, connector=connector)
        made.append(p)
        return p

    yield start
    for p in made:
        p.kill()


def test_headline_command_moves_64_MiB_verified_between_two_processes(workdir):
    proc = run_kvconf("connector=mooncake", "role=worker", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    st = json_out(proc)["self_test"]
    assert st["verified"] is True and st["bytes"] >= 64 * MiB and st["peer_started"] is True
    assert st["transport"] == "tcp" and "no RDMA device" in st["transport_reason"]
    assert st["seconds"] > 0 and st["gbps"] > 0
    assert owned_processes() == []


def test_text_report_names_the_transport(workdir):
    proc = run_kvconf("connector=mooncake", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "transport tcp" in proc.stdout and "verified" in proc.stdout


def test_a_producer_started_by_run_starts_and_verifies_a_consumer(workdir):
    proc = run_kvconf("connector=mooncake", "connector.kv_role=kv_producer", "output=json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    st = json_out(proc)["self_test"]
    assert st["verified"] and st["bytes"] >= 64 * MiB and st["served_requests"] == st["loaded_requests"]


def test_sigusr1_prints_every_threads_stack_and_the_producer_goes_on_serving(workdir, producer):
    p = producer()
    p.proc.send_signal(signal.SIGUSR1)  # where a job seems to hang: kill -USR1 PID
    p._read_until("stderr", "Thread 0x", 30)
    consumer = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", *p.peer_args, "self_test.requests=1",
                          "output=json", cwd=workdir)
    assert consumer.returncode == 0, consumer.stderr
    code, _, err = p.stop()
    assert code == 0, err
    assert "(most recent call first)" in err and "in serve_producer" in err  # the main thread, serving


def test_two_terminal_serve_workflow(workdir, producer):
    p = producer()
    host, port = p.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    consumer = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", "action=run",
                          *p.peer_args, "self_test.requests=3", "output=json", cwd=workdir)
    assert consumer.returncode == 0, consumer.stderr
    st = json_out(consumer)["self_test"]
    assert st["verified"] and st["peer_started"] is False and st["peer"] == p.address
    code, out, err = p.stop(signal.SIGTERM)
    assert code == 0, err
    report = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert report["serve"]["served_requests"] == st["loaded_requests"]
    with socket.socket() as s:  # the side-channel port is free again
        s.bind((host, int(port)))
    assert owned_processes() == []


def test_sigint_stops_the_producer_cleanly(workdir, producer):
    p = producer()
    code, _, err = p.stop(signal.SIGINT)
    assert code == 0, err


def test_producer_keeps_serving_after_garbage_on_the_side_channel(workdir, producer):
    import msgpack

    p = producer()
    host, port = p.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:  # not even zmq
        raw.sendall(os.urandom(4096))
    s = side_channel(p.address, p.key_file)  # garbage from a peer that holds the key
    for junk in (b"\xff\x00garbage", msgpack.packb({"v": 99, "type": "hello"}),
                 msgpack.packb({"v": 2, "type": "release", "request_id": "x"}), msgpack.packb([1, 2, 3]),
                 b"x" * (5 * MiB)):
        s.send(junk)
    replies = []
    while len(replies) < 5 and s.poll(10000):
        replies.append(msgpack.unpackb(s.recv()))
    s.close()
    huge = side_channel(p.address, p.key_file)  # past the socket's limit: zmq drops the connection
    huge.send(b"x" * (80 * MiB))
    time.sleep(0.3)
    huge.close()
    assert [r["type"] for r in replies] == ["rejected"] * 5
    assert "msgpack" in replies[0]["reason"] and "version" in replies[1]["reason"]
    assert "over the" in replies[4]["reason"] and "limit" in replies[4]["reason"]
    consumer = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", *p.peer_args,
                          "self_test.requests=2", cwd=workdir)
    assert consumer.returncode == 0, consumer.stderr
    code, out, err = p.stop()
    assert code == 0 and "rejected a side-channel message" in err
    assert json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["serve"]["rejected_messages"] >= 5


TRANSFER_TIMEOUT = 6.0
"""The consumers' ``connector.extra.transfer_timeout`` in the killed-producer tests: long enough
for a producer to prefill a request (64 MiB of pattern) while a hundred consumers of another test
load the same 2 cores (2 s was not: the first request timed out and the rest were given up)."""
EXIT_SLACK = 15.0
"""Time for a consumer that gave up to report and exit, on a loaded 2-core machine."""


def consumer_against(p: Producer, workdir: Path, *overrides: str, connector: str = "mooncake") -> subprocess.Popen:
    """A consumer with a long run of requests against ``p``, and a short transfer timeout."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvconf", f"connector={connector}", "connector.kv_role=kv_consumer",
         *p.peer_args, "kv_cache=llama3_8b", "self_test.transfer_bytes=32GiB",
         f"connector.extra.transfer_timeout={TRANSFER_TIMEOUT:g}", "output=json", *overrides],
        cwd=workdir, env=kvconf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("connector", ["mooncake", pytest.param("nixl", marks=pytest.mark.skipif(
    importlib.util.find_spec("nixl") is None, reason="NIXL is not installed"))])
def test_killed_producer_fails_requests_within_the_timeout(workdir, producer, connector):
    p = producer("kv_cache=llama3_8b", connector=connector)
    c = consumer_against(p, workdir, connector=connector)
    try:
        p.wait_served(consumer=c)
        p.proc.kill()
        killed = time.monotonic()
        out, err = c.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        c.kill()
    assert c.returncode == 1, err
    assert "failed to load" in err and "kv_load_failure_policy=fail" in err
    # the request in flight times out, then the next prefill does; the rest fail at once
    assert elapsed < 2 * TRANSFER_TIMEOUT + EXIT_SLACK
    out_json = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert out_json["ok"] is False and out_json["error"]["exit_code"] == 1


def test_killed_producer_with_policy_recompute_marks_requests_for_recompute(workdir, producer):
    p = producer("kv_cache=llama3_8b")
    c = consumer_against(p, workdir, "connector.kv_load_failure_policy=recompute")
    try:
        p.wait_served(consumer=c)
        p.wait_served(consumer=c)  # the first request's answer has surely left
        p.proc.kill()
        out, err = c.communicate(timeout=60)
    finally:
        c.kill()
    assert c.returncode == 0, err
    st = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["self_test"]
    assert st["recomputed"] and st["failed_requests"] == len(st["recomputed"])
    assert st["loaded_requests"] >= 1 and st["verified"] is True


def test_unreachable_producer_fails_within_the_handshake_timeout(workdir):
    from kvconf_connectors.p2p.protocol import free_port

    handshake_timeout = 1.0
    t0 = time.monotonic()
    proc = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer",
                      f"connector.extra.peer=127.0.0.1:{free_port()}",
                      f"connector.extra.handshake_timeout={handshake_timeout:g}", cwd=workdir)
    assert proc.returncode == 1 and "did not answer within 1 s" in proc.stderr
    assert time.monotonic() - t0 < handshake_timeout + 2 * EXIT_SLACK  # start-up, the timeout, the report


def test_missing_engine_exits_2_with_the_install_command(workdir, tmp_path):
    env = kvconf_env()
    env["PYTHONPATH"] = f"{TESTS / 'fake_mooncake'}:{env['PYTHONPATH']}"
    proc = run_kvconf("connector=mooncake", "role=worker", cwd=workdir, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "pip install mooncake-transfer-engine-non-cuda" in proc.stderr
    assert "apt-get install libibverbs1 librdmacm1 libnuma1" in proc.stderr
    assert "Traceback" not in proc.stderr and "libibverbs.so.1" in proc.stderr


def test_scheduler_side_needs_no_engine(workdir):
    env = kvconf_env()
    env["PYTHONPATH"] = f"{TESTS / 'fake_mooncake'}:{env['PYTHONPATH']}"
    proc = run_kvconf("connector=mooncake", "role=scheduler", "output=json", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["allocated_bytes"] == 0


def test_serve_is_refused_for_a_connector_that_cannot_serve(workdir):
    proc = run_kvconf("action=serve", cwd=workdir)
    assert proc.returncode == 2 and "cannot serve" in proc.stderr


PINNER = """
import sys, time, msgpack
sys.path.insert(0, sys.argv[4])
from conftest import side_channel
s = side_channel(sys.argv[1], sys.argv[2])
tag, n = sys.argv[3], 32
def ask(msg):
    s.send(msgpack.packb({"v": 2, **msg}))
    assert s.poll(30000), msg["type"]
    return msgpack.unpackb(s.recv())
ack = ask({"type": "hello", "engine_id": tag})
pre = ask({"type": "prefill", "request_id": tag, "seed": 1, "num_blocks": n})
if not pre["ok"]:
    print("refused: " + pre["reason"], flush=True)
    sys.exit(0)
print("held " + ",".join(map(str, pre["params"]["remote_block_ids"][0])), flush=True)
time.sleep(3600)  # its decode never comes, until it is killed: never a Release
"""
"""A consumer that has 32 of a producer's blocks prefilled and held for it (Hello, Prefill) and
never reads nor releases them: argv ADDRESS KEY_FILE TAG TESTS."""


def pinning_consumer(p: Producer, tag: str) -> tuple[subprocess.Popen, str]:
    """A :data:`PINNER` process against ``p``, and the producer's answer to its prefill."""
    proc = subprocess.Popen([sys.executable, "-c", PINNER, p.address, p.key_file, tag, str(TESTS)],
                            env=kvconf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    return proc, line or proc.stderr.read()


def test_consumers_killed_holding_blocks_do_not_pin_the_producer(workdir, producer):
    # the tiny layout: 128 blocks of 4 layers x 8 KiB; four consumers hold all of them
    p = producer("connector.extra.lease_seconds=600")  # no hold ends by its lease in this test
    pinners = [pinning_consumer(p, f"gone-{i}") for i in range(5)]
    try:
        held = [answer for _, answer in pinners[:4]]
        assert all(h.startswith("held ") for h in held), held
        assert sorted(int(b) for h in held for b in h[5:].split(",")) == list(range(128))  # every block, once
        assert pinners[4][1].startswith("refused: no free blocks")  # held, while they live
        for proc, _ in pinners:
            proc.kill()  # SIGKILL: no Release ever comes
            proc.wait()
    finally:
        for proc, _ in pinners:
            proc.kill()
            proc.communicate()
    consumer = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", *p.peer_args,
                          "self_test.requests=2", "output=json", cwd=workdir)
    assert consumer.returncode == 0, consumer.stderr
    st = json_out(consumer)["self_test"]
    assert st["failed_requests"] == 0 and st["blocks_per_request"] == 64  # two requests in flight: all 128 blocks
    code, out, err = p.stop()
    assert code == 0 and "gone-0" in err and "disconnected holding 1 request(s)" in err
    serve = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["serve"]
    assert serve["disconnected_consumers"] == 4 and serve["expired_leases"] == 0


def test_a_hold_no_decode_releases_ends_with_its_lease(workdir, producer):
    p = producer("connector.extra.lease_seconds=2")
    pinners = [pinning_consumer(p, f"stuck-{i}") for i in range(4)]  # alive, connected, never releasing
    try:
        assert all(answer.startswith("held ") for _, answer in pinners), pinners
        time.sleep(2.5)  # past the producer's lease
        consumer = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", *p.peer_args,
                              "self_test.requests=2", cwd=workdir)
        assert consumer.returncode == 0, consumer.stderr
    finally:
        for proc, _ in pinners:
            proc.kill()
            proc.communicate()
    code, out, err = p.stop()
    assert code == 0 and "lease of stuck-0 expired" in err
    assert json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["serve"]["expired_leases"] == 4


CONSUMERS = """
import sys, time
from kvconf.config.layout import KVCacheLayout
from kvconf.config.models import ConnectorConfig
from kvconf.contract.api import KVConnectorRole
from kvconf.runtime.allocate import allocate, layer_views
from kvconf_connectors.mooncake import MooncakeConnector
from kvconf_connectors.p2p import protocol as sc
from kvconf_connectors.p2p.connector import P2PMetadata, Recv
from kvconf_connectors.p2p.selftest import Control

address, key_file, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = KVCacheLayout(num_layers=4, block_size=16, dtype="float16", num_blocks=128, groups=[
    {"type": "full_attention", "num_kv_heads": 4, "head_size": 32}]).to_config()  # the tiny layout
ok = 0
for i in range(first, first + count):  # each a consumer of its own: its own engine, connections and socket
    conn = MooncakeConnector(ConnectorConfig(name="mooncake", kv_role="kv_consumer", engine_id=f"c{i}", extra={
        "peer": address, "auth_key_file": key_file}), KVConnectorRole.WORKER, cfg)
    buffers = allocate(cfg, "cpu")
    conn.register_kv_caches(layer_views(cfg, buffers))
    control = Control(conn, address)
    control.ask(sc.Hello(engine_id=f"c{i}"), 30)
    ack = control.ask(sc.Prefill(request_id=f"r{i}", seed=i, num_blocks=4), 30)
    if ack.ok:
        remote = sc.read_params(ack.params, 1)
        conn.bind_connector_metadata(P2PMetadata([Recv(f"r{i}", [[0, 1, 2, 3]], remote.peer, remote.request_id,
                                                       remote.block_ids, remote.engine_id)]))
        conn.start_load_kv(None)
        conn.clear_connector_metadata()
        deadline = time.monotonic() + 60
        done = set()
        while not done and time.monotonic() < deadline and not conn._failed:
            done = conn.get_finished(set())[1] or set()
            conn.wait_for_results(0.05)
        ok += f"r{i}" in done and f"r{i}" not in conn._failed
        if conn._failed:
            print(f"r{i} failed: {conn._failed}", file=sys.stderr, flush=True)
    else:
        print(f"r{i} was not prefilled: {ack.reason}", file=sys.stderr, flush=True)
    control.close()
    conn.shutdown()
print("loaded", ok, flush=True)
"""
"""``count`` consumers one after another, each with its own transfer engine, each loading one request
of four blocks from the producer at argv ADDRESS (key in KEY_FILE): argv ADDRESS KEY_FILE FIRST COUNT."""


@pytest.mark.serial  # a hundred consumers starve whatever runs beside them on 2 cores
def test_a_producer_serves_100_consumers_with_a_flat_descriptor_count(workdir, producer):
    p = producer()

    def run(first: int, count: int) -> list[subprocess.Popen]:
        return [subprocess.Popen([sys.executable, "-c", CONSUMERS, p.address, p.key_file, str(first + k * count),
                                  str(count)], env=kvconf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k in range(10 if count > 1 else 1)]

    def loaded(procs: list[subprocess.Popen]) -> int:
        outs = [proc.communicate(timeout=300) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
        print("\n".join(err for _, err in outs if "failed:" in err or "not prefilled" in err))  # shown where one fails
        return sum(int(out.split("loaded ")[1]) for out, _ in outs)

    assert loaded(run(0, 1)) == 1  # the producer's own engine is warm: connections it keeps for good are made
    before = len(os.listdir(f"/proc/{p.proc.pid}/fd"))
    assert loaded(run(1, 10)) == 100  # ten processes of 10 consumers each, one after another
    deadline = time.monotonic() + 30  # the last releases may still be on their way (a loaded machine)
    while time.monotonic() < deadline and sum(ln.startswith("served ") for ln in p.lines["stderr"]) < 101:
        time.sleep(0.1)
    time.sleep(1)
    after = len(os.listdir(f"/proc/{p.proc.pid}/fd"))
    assert after <= before + 10, f"{before} descriptors before 100 consumers, {after} after"
    code, out, err = p.stop()
    assert code == 0, err
    assert json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["serve"]["served_requests"] == 101


BATCH = """
import json, sys, time
import torch
from kvconf.config.layout import KVCacheLayout
from kvconf.config.models import ConnectorConfig
from kvconf.contract.api import KVConnectorRole
from kvconf.runtime.allocate import allocate, layer_views
from kvconf.runtime.pattern import block_pattern
from kvconf_connectors.mooncake import MooncakeConnector
from kvconf_connectors.p2p import protocol as sc
from kvconf_connectors.p2p.connector import P2PMetadata, Recv
from kvconf_connectors.p2p.selftest import Control

address, key_file = sys.argv[1], sys.argv[2]
cfg = KVCacheLayout(num_layers=4, block_size=16, dtype="float16", num_blocks=128, groups=[
    {"type": "full_attention", "num_kv_heads": 4, "head_size": 32}]).to_config()  # the tiny layout
conn = MooncakeConnector(ConnectorConfig(name="mooncake", kv_role="kv_consumer", engine_id="batch", extra={
    "peer": address, "auth_key_file": key_file}), KVConnectorRole.WORKER, cfg)
conn.register_kv_caches(layer_views(cfg, allocate(cfg, "cpu")))
views = conn._views  # each layer's blocks as rows of bytes
control = Control(conn, address)
control.ask(sc.Hello(engine_id="batch"), 30)
wanted = {f"r{i}": (i, list(range(8 * i, 8 * i + 8))) for i in range(6)}
params = {}
for rid, (seed, _) in wanted.items():
    ack = control.ask(sc.Prefill(request_id=rid, seed=seed, num_blocks=8), 30)
    assert ack.ok
    params[rid] = sc.read_params(ack.params, 1)
recvs = [Recv(rid, [ids], address, rid, params[rid].block_ids, params[rid].engine_id)
         for rid, (_, ids) in wanted.items()]
before = {name: v[100:108].clone() for name, v in views.items()}
# among the others: remote blocks past the producer's 128, and an engine id that is not the producer's
recvs.insert(3, Recv("out-of-range", [list(range(100, 108))], address, "r0", [list(range(125, 133))], ""))
recvs.insert(5, Recv("stale", [list(range(100, 108))], address, "r1", params["r1"].block_ids, "another-engine"))
# and params whose lease at the producer has ended (its blocks may be another request's by now)
recvs.insert(7, Recv("expired", [list(range(100, 108))], address, "r2", params["r2"].block_ids, "", time.time() - 1))
conn.bind_connector_metadata(P2PMetadata(recvs))  # one step: the transfer requests leave together
conn.start_load_kv(None)
conn.clear_connector_metadata()
deadline, done = time.monotonic() + 60, set()
while len(done) < len(recvs) and time.monotonic() < deadline:
    done |= conn.get_finished(set())[1] or set()
    conn.wait_for_results(0.05)
failed = conn.take_failures()  # a failed load is finished too (vLLM's meaning), and reported failed
loaded = sorted(done - set(failed))
wrong = [rid for rid in loaded for li, name in enumerate(views) for j, b in enumerate(wanted[rid][1])
         if not torch.equal(views[name][b], block_pattern(wanted[rid][0], li, j, views[name].shape[1]))]
untouched = all(torch.equal(v[100:108], before[name]) for name, v in views.items())
print(json.dumps({"loaded": loaded, "failed": failed, "wrong": wrong, "untouched": untouched}), flush=True)
control.close()
conn.shutdown()
"""
"""One consumer reads nine requests in one step, three of them with params it must refuse: argv
ADDRESS KEY_FILE."""


def test_requests_of_one_step_are_read_and_bad_params_fail_alone_with_nothing_read(workdir, producer):
    # requests whose params name blocks out of the producer's range, or another engine, fail with
    # their reason before anything is read; the others arrive, each block where its own request put it
    p = producer()
    proc = subprocess.run([sys.executable, "-c", BATCH, p.address, p.key_file], env=kvconf_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [f"r{i}" for i in range(6)] and out["wrong"] == []
    assert sorted(out["failed"]) == ["expired", "out-of-range", "stale"]
    assert "out of range, the producer at" in out["failed"]["out-of-range"]
    assert "lease on its blocks ended" in out["failed"]["expired"]
    assert "remote_engine_id" in out["failed"]["stale"] and out["untouched"]
    code, _, err = p.stop()
    assert code == 0 and err.count("served r") == 6

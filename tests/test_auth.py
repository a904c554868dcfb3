"""Nobody reads a producer's KV cache without the key: the side channel's CURVE handshake refuses
a peer without the shared secret before it learns an address, an engine's metadata or a prefill,
the consumer says that authentication failed (exit 1), and the producer goes on serving the peers
that hold the key. Real producers (``action=serve``) and consumers, over loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import json_out, kvconf_env, run_kvconf, side_channel, stacks_then_kill
from test_mooncake import producer  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.torch, pytest.mark.mooncake]


def no_key_env() -> dict[str, str]:
    env = kvconf_env()
    env.pop("KVCONF_AUTH_KEY", None)
    return env


def key_file(folder: Path, text: str, mode: int = 0o600) -> Path:
    path = folder / f"key-{uuid.uuid4().hex[:6]}"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def serve_report(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["serve"]


def test_consumers_without_the_key_are_refused_and_the_producer_keeps_serving(workdir, producer, tmp_path):  # noqa: F811
    p = producer()
    wrong = key_file(tmp_path, "not-the-producers-key-" + uuid.uuid4().hex)
    attempts = {
        "no key at all": ((), no_key_env()),
        "another key in a file": ((f"connector.extra.auth_key_file={wrong}",), no_key_env()),
        "another key in KVCONF_AUTH_KEY": ((), {**no_key_env(), "KVCONF_AUTH_KEY": uuid.uuid4().hex}),
    }
    procs = {what: subprocess.Popen([sys.executable, "-m", "kvconf", "connector=mooncake", "connector.kv_role=kv_consumer",
                                     f"connector.extra.peer={p.address}", *overrides], cwd=workdir, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for what, (overrides, env) in attempts.items()}  # at once: each is a process start
    for what, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hung: its threads' stacks
            _, err = stacks_then_kill(proc)
            raise AssertionError(f"{what}: still running after 120 s: {err[-6000:]}") from None
        assert proc.returncode == 1, (what, err)
        assert "authentication failed" in err and "Traceback" not in err, (what, err)
        assert p.address in err and "serving on" in err  # where the right key is
    good = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", *p.peer_args, "self_test.requests=2",
                      "output=json", cwd=workdir, env=no_key_env())
    assert good.returncode == 0, good.stderr
    assert json_out(good)["self_test"]["verified"] is True
    code, out, err = p.stop()
    assert code == 0, err
    assert serve_report(out)["refused_peers"] >= 3
    assert "refused the peer at 127.0.0.1:" in err and "authentication failed" in err


def test_a_stranger_on_the_side_channel_gets_nothing(workdir, producer):  # noqa: F811
    """Plays the attacker of #13: Hello -> Prefill -> Release without the key, with another key,
    and with the producer's public key but a key pair of its own; not one answer comes."""
    import msgpack
    import zmq

    from kvconf_connectors.p2p import auth

    p = producer()
    key = auth.load_key(p.key_file)
    assert key is not None
    bare = side_channel(p.address, None)
    other = zmq.Context.instance().socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    auth.client_keys(other, auth.AuthKey.generate())
    other.connect(f"tcp://{p.address}")
    posing = zmq.Context.instance().socket(zmq.DEALER)  # knows the producer's public key, not the secret
    posing.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    posing.curve_publickey, posing.curve_secretkey = public, secret
    posing.curve_serverkey = key.public("producer")
    posing.connect(f"tcp://{p.address}")
    probes = [{"type": "hello", "engine_id": "stranger"},
              {"type": "prefill", "request_id": "r", "seed": 1, "num_blocks": 4},
              {"type": "release", "request_id": "r", "ok": True}]
    for s in (bare, other, posing):
        for msg in probes:
            s.send(msgpack.packb({"v": 2, **msg}))
    time.sleep(3)  # time enough for any answer to come
    answers = [s.recv() for s in (bare, other, posing) if s.poll(0)]
    for s in (bare, other, posing):
        s.close()
    assert answers == []
    code, out, err = p.stop()
    assert code == 0, err
    report = serve_report(out)
    assert report["refused_peers"] >= 3 and report["served_requests"] == 0
    assert "knows the producer's public key but not the secret" in err


def test_serve_without_a_key_writes_one_to_a_private_file_and_removes_it_at_stop(workdir, producer):  # noqa: F811
    p = producer()
    path = Path(p.key_file)
    assert path.parent == Path(os.environ["XDG_CACHE_HOME"]) / "kvconf" / "keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_text().strip()) == 64
    code, out, _ = p.stop()
    assert code == 0 and not path.exists()
    assert serve_report(out)["auth_key"] == str(path)


def test_the_key_from_the_environment_serves_without_a_file(workdir, producer, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KVCONF_AUTH_KEY", "a-shared-secret-" + uuid.uuid4().hex)
    p = producer()
    assert p.key_file == "$KVCONF_AUTH_KEY"
    assert not (Path(os.environ["XDG_CACHE_HOME"]) / "kvconf" / "keys").exists() or \
        not any((Path(os.environ["XDG_CACHE_HOME"]) / "kvconf" / "keys").iterdir())
    proc = run_kvconf("connector=mooncake", "connector.kv_role=kv_consumer", f"connector.extra.peer={p.address}",
                      "self_test.requests=2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr


def test_a_request_belongs_to_the_consumer_that_prefilled_it(workdir, producer):  # noqa: F811
    import msgpack

    p = producer()
    a, b = side_channel(p.address, p.key_file), side_channel(p.address, p.key_file)

    def ask(s, **msg) -> dict:
        s.send(msgpack.packb({"v": 2, **msg}))
        assert s.poll(10000), msg["type"]
        return msgpack.unpackb(s.recv())

    before = ask(b, type="release", request_id="r-a", ok=True)
    assert before["type"] == "rejected" and "hello first" in before["reason"]
    ask(a, type="hello", engine_id="engine-a")
    ask(b, type="hello", engine_id="engine-b")
    assert ask(a, type="prefill", request_id="r-a", seed=1, num_blocks=4)["ok"] is True
    theft = ask(b, type="release", request_id="r-a", ok=True)  # freeing another's blocks under its decode
    assert theft["type"] == "rejected" and "not yours" in theft["reason"]
    assert ask(b, type="prefill", request_id="r-a", seed=2, num_blocks=4)["ok"] is False  # nor re-prefill it
    a.send(msgpack.packb({"v": 2, "type": "release", "request_id": "r-a", "ok": True}))  # its own decode's
    assert not a.poll(500)  # a release has no answer
    a.close()
    b.close()
    code, out, err = p.stop()
    assert code == 0 and "another consumer asked for that request" in err
    assert serve_report(out)["served_requests"] == 1


def test_a_connector_whose_key_is_refused_fails_its_requests_saying_so(producer, monkeypatch):  # noqa: F811
    """The worker's own request loop (what vLLM drives), in this process: a refused handshake fails
    the request at once, with the reason, and marks its blocks as load errors."""
    from kvconf.config.layout import KVCacheLayout
    from kvconf.config.models import ConnectorConfig
    from kvconf.contract.api import KVConnectorRole
    from kvconf.runtime.allocate import allocate, layer_views
    from kvconf_connectors.mooncake import MooncakeConnector
    from kvconf_connectors.p2p.connector import P2PMetadata, Recv

    p = producer()
    monkeypatch.setenv("KVCONF_AUTH_KEY", "some-other-secret-" + uuid.uuid4().hex)
    cfg = KVCacheLayout(num_layers=2, block_size=4, dtype="float16", num_blocks=8, groups=[
        {"type": "full_attention", "num_kv_heads": 1, "head_size": 64}]).to_config()
    conn = MooncakeConnector(ConnectorConfig(name="mooncake", kv_role="kv_consumer", engine_id="e",
                                             extra={"peer": p.address}), KVConnectorRole.WORKER, cfg)
    buffers = allocate(cfg, "cpu")
    try:
        conn.register_kv_caches(layer_views(cfg, buffers))
        conn.bind_connector_metadata(P2PMetadata([Recv("r-1", [[0, 1, 2]], p.address, "r-1", [[0, 1, 2]])]))
        conn.start_load_kv(None)
        conn.clear_connector_metadata()
        conn.wait_for_results(30)
        failures = conn.take_failures()
        assert "authentication failed" in failures.get("r-1", ""), failures
        assert conn.get_block_ids_with_load_errors() == {0, 1, 2}
    finally:
        conn.shutdown()


@pytest.mark.parametrize(("text", "mode", "says"), [
    ("short", 0o600, "needs 16 to 4096"),
    ("a-perfectly-long-secret-value", 0o644, "other users can read"),
    ("a-perfectly-long-secret-value", 0o620, "other users can read or change"),
])
def test_an_unusable_key_file_is_a_config_error_at_check_time(text, mode, says, workdir, tmp_path):
    path = key_file(tmp_path, text, mode)
    proc = run_kvconf("connector=mooncake", "role=worker", f"connector.extra.auth_key_file={path}", "action=check",
                      cwd=workdir)
    assert proc.returncode == 2 and "connector.extra.auth_key_file" in proc.stderr and says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_short_key_in_the_environment_is_a_config_error_at_check_time(workdir):
    proc = run_kvconf("connector=nixl", "role=worker", "action=check", cwd=workdir,
                      env={**kvconf_env(), "KVCONF_AUTH_KEY": "abc"})
    assert proc.returncode == 2 and "KVCONF_AUTH_KEY" in proc.stderr and "3 characters" in proc.stderr
    assert "abc" not in proc.stderr.replace("KVCONF", "")  # the secret itself is never printed

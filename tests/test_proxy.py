"""``python -m kvconf action=proxy`` against instances that misbehave on purpose: small HTTP
servers in this process stand in for vLLM's (a prefill that fails, answers no params, refuses a
request or is gone; a decode that stays silent), so that each failure is one clear HTTP error and
nothing hangs. The proxy's path with real instances (two ``vllm serve`` processes, streamed and
whole answers, a prefill gone) is tests/test_vllm_serve_pd.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import kvconf_env

PARAMS = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[1, 2]],
          "remote_host": "127.0.0.1", "remote_port": 1}


class Instance:
    """An HTTP server on 127.0.0.1 that answers each POST with ``reply(body)``: (status, JSON or
    a list of stream events, None to stay silent, or "partial" to stall mid-answer); it keeps what
    it was sent."""

    def __init__(self, reply: Callable[[dict[str, Any]], tuple[int, Any]]) -> None:
        self.seen: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append(body)
                status, doc = reply(body)
                if doc is None:
                    time.sleep(30)  # silent
                    return
                if doc == "partial":  # starts its answer, then stalls
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": ')
                    self.wfile.flush()
                    time.sleep(30)
                    return
                if isinstance(doc, list):  # a stream, piece by piece
                    self.send_response(status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for event in doc + ["[DONE]"]:
                        data = f"data: {event if event == '[DONE]' else json.dumps(event)}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prefill_ok(body: dict[str, Any]) -> tuple[int, Any]:
    return 200, {"choices": [{"text": "x"}], "kv_transfer_params": {**PARAMS, "remote_request_id": body["prompt"]}}


def decode_ok(body: dict[str, Any]) -> tuple[int, Any]:
    if body.get("stream"):
        return 200, [{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}]
    return 200, {"choices": [{"text": "decoded " + body["prompt"]}]}


@pytest.fixture
def instances() -> Iterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(reply: Callable[[dict[str, Any]], tuple[int, Any]]) -> Instance:
        made.append(Instance(reply))
        return made[-1]

    yield make
    for i in made:
        i.close()


class Proxy:
    def __init__(self, tmp: Path, prefill: list[str], decode: list[str], *more: str) -> None:
        self.log = tmp / "proxy.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvconf", "action=proxy", "proxy.port=0",
                                         f"proxy.prefill=[{','.join(prefill)}]", f"proxy.decode=[{','.join(decode)}]",
                                         *more], stdout=out, stderr=subprocess.STDOUT, env=kvconf_env(), cwd=tmp)
        deadline = time.monotonic() + 60
        while not (found := re.search(r"proxy on (http://\S+) ", self.log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.url = found.group(1)

    def post(self, path: str, body: Any, timeout: float = 60) -> tuple[int, Any, str]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, raw, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text, status = resp.read().decode(), resp.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        doc = json.loads(text) if text.startswith("{") else None
        return status, doc, text

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return self.log.read_text()


def test_requests_go_to_a_prefill_then_a_decode_with_its_params_in_turn(instances, tmp_path):
    prefills = [instances(prefill_ok), instances(prefill_ok)]
    decodes = [instances(decode_ok), instances(decode_ok)]
    proxy = Proxy(tmp_path, [p.url for p in prefills], [d.url for d in decodes])
    try:
        for i in range(4):
            status, doc, _ = proxy.post("/v1/completions", {"model": "m", "prompt": f"p{i}", "max_tokens": 20,
                                                              "stream": False})
            assert status == 200 and doc["choices"][0]["text"] == f"decoded p{i}"
        status, _, text = proxy.post("/v1/completions", {"model": "m", "prompt": "s", "max_tokens": 20, "stream": True,
                                                         "stream_options": {"include_usage": True}})
        assert status == 200 and text.count("data: ") == 3 and text.rstrip().endswith("data: [DONE]"), text
    finally:
        out = proxy.stop()
    assert proxy.proc.returncode == 0, out
    assert "5 request(s), 5 completed, 0 failed" in out
    # round robin: 3 and 2 requests, alternately
    assert [len(p.seen) for p in prefills] == [3, 2] and [len(d.seen) for d in decodes] == [3, 2]
    first = prefills[0].seen[0]
    assert first["max_tokens"] == 1 and first["stream"] is False and first["kv_transfer_params"]["do_remote_decode"]
    assert "stream_options" not in prefills[0].seen[-1]
    # the decode gets the client's request as it was, with the params its prefill answered
    assert decodes[0].seen[0] == {"model": "m", "prompt": "p0", "max_tokens": 20, "stream": False,
                                  "kv_transfer_params": {**PARAMS, "remote_request_id": "p0"}}
    assert decodes[0].seen[-1]["stream"] is True and decodes[0].seen[-1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("case", ["prefill fails", "prefill answers no params", "prefill is gone",
                                  "decode is gone", "decode is silent", "prefill refuses the request",
                                  "prefill stalls mid-answer"])
def test_a_failing_instance_is_one_clear_http_error(case, instances, tmp_path):
    prefill, decode = instances(prefill_ok), instances(decode_ok)
    urls = [prefill.url, decode.url]
    if case == "prefill fails":
        urls[0] = instances(lambda b: (500, {"error": "engine dead"})).url
    elif case == "prefill answers no params":
        urls[0] = instances(lambda b: (200, {"choices": [{"text": "x"}]})).url
    elif case == "prefill refuses the request":
        urls[0] = instances(lambda b: (400, {"error": {"message": "prompt too long"}})).url
    elif case == "prefill stalls mid-answer":
        urls[0] = instances(lambda b: (200, "partial")).url
    elif case == "decode is silent":
        urls[1] = instances(lambda b: (200, None)).url
    elif case.endswith("is gone"):
        gone = instances(prefill_ok)
        gone.close()
        urls[0 if case.startswith("prefill") else 1] = gone.url
    proxy = Proxy(tmp_path, [urls[0]], [urls[1]], "proxy.timeout=2", "proxy.connect_timeout=2")
    started = time.monotonic()
    try:
        status, doc, text = proxy.post("/v1/completions", {"model": "m", "prompt": "p", "max_tokens": 5})
    finally:
        out = proxy.stop()
    assert time.monotonic() - started < 15  # nothing hangs
    expected = {"prefill fails": (502, f"the prefill instance {urls[0]} answered 500"),
                "prefill answers no params": (502, f"the prefill instance {urls[0]} answered no kv_transfer_params"),
                "prefill is gone": (502, f"the prefill instance {urls[0]} could not be reached"),
                "decode is gone": (502, f"the decode instance {urls[1]} could not be reached"),
                "decode is silent": (504, f"the decode instance {urls[1]} did not answer within 2 s (proxy.timeout)"),
                "prefill refuses the request": (400, "prompt too long"),
                "prefill stalls mid-answer": (504, f"the prefill instance {urls[0]} did not finish its answer "
                                                   "within 2 s (proxy.timeout)")}[case]
    assert status == expected[0], text
    assert doc is not None and expected[1] in json.dumps(doc), doc
    if status != 400:
        assert doc["error"]["code"] == status and doc["error"]["type"] == "kvconf_proxy_error"
        assert expected[1] in out  # logged too
    assert proxy.proc.returncode == 0 and "1 failed" in out


def test_a_bad_request_or_path_is_refused_by_the_proxy_itself(instances, tmp_path):
    prefill, decode = instances(prefill_ok), instances(decode_ok)
    proxy = Proxy(tmp_path, [prefill.url], [decode.url])
    try:
        status, doc, _ = proxy.post("/v1/completions", b"{not json")
        assert status == 400 and "not a JSON object" in doc["error"]["message"]
        status, doc, _ = proxy.post("/v1/embeddings", {"input": "x"})
        assert status == 404 and "/v1/completions" in doc["error"]["message"]
        with urllib.request.urlopen(proxy.url + "/health", timeout=10) as resp:
            assert json.loads(resp.read())["decode"] == [decode.url]
    finally:
        proxy.stop()
    assert prefill.seen == [] and decode.seen == []


@pytest.mark.parametrize("overrides,path,fix", [
    ([], "proxy.prefill", "proxy.prefill=[http://127.0.0.1:8100]"),
    (["proxy.prefill=[127.0.0.1:8100]", "proxy.decode=[http://127.0.0.1:8200]"], "proxy.prefill",
     "write http://127.0.0.1:8100"),
    (["proxy.prefill=[http://127.0.0.1:8100]", "proxy.decode=[http://127.0.0.1:8200/v1]"], "proxy.decode",
     "write http://127.0.0.1:8200"),
])
def test_a_proxy_without_instances_or_with_bad_urls_exits_2_saying_what_to_write(overrides, path, fix, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvconf", "action=proxy", *overrides], capture_output=True,
                          text=True, env=kvconf_env(), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert path in proc.stderr and fix in proc.stderr and "Traceback" not in proc.stderr

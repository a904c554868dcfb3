"""``python -m kvconf action=proxy``: an OpenAI-compatible front for disaggregated serving.

Each completion (``POST /v1/completions`` or ``/v1/chat/completions``) goes first to a prefill
instance, as it was asked but with ``max_tokens=1``, no streaming and
``kv_transfer_params={"do_remote_decode": true, ...}``: the prefill computes the prompt's KV cache,
keeps its blocks and answers the ``kv_transfer_params`` that name them. The request then goes, as
it was asked, with those params, to a decode instance, which reads the blocks from the prefill's
memory and generates; its answer (streamed where the client asked for a stream) is the client's.
Instances are taken in turn (round robin), each list on its own.

A prefill or decode that cannot be reached, fails or stays silent is one HTTP error with an
OpenAI-style body naming the instance: 502 (unreachable, a 5xx, no ``kv_transfer_params``), 504
(no answer within ``proxy.timeout``); an instance's own 4xx (a bad request) is passed on as it is.
Nothing hangs: every upstream call has a connect and a read timeout. A decode that fails after its
stream began ends the stream (its status was sent already).

``GET /health`` answers 200 (the proxy runs); ``GET /v1/models`` is the first decode instance's.
The instances are vLLM servers started with kvconf's exported JSON: ``python -m kvconf
connector=mooncake connector.kv_role=kv_producer action=export export.target=kvconf`` for a
prefill's ``--kv-transfer-config``, ``kv_consumer`` for a decode's (docs/vllm.md).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import urlsplit

from kvconf.config.models import ProxyConfig
from kvconf.errors import ConfigError, ConnectorRuntimeError, Problem
from kvconf.runtime.process import stop_on_signals

__all__ = ["COMPLETIONS", "Proxy", "UpstreamError", "check", "decode_request", "prefill_request", "serve_proxy"]

COMPLETIONS = ("/v1/completions", "/v1/chat/completions")
"""The paths that go prefill -> decode."""

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
"""What a prefill request carries: the prefill keeps the blocks for a remote decode."""


class UpstreamError(Exception):
    """What the client gets instead of an answer: an HTTP status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request a prefill instance gets: the client's, for one token, whole (no stream),
    asking it to keep the blocks for a remote decode.

    >>> r = prefill_request({"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True,
    ...                      "stream_options": {"include_usage": True}})
    >>> r["max_tokens"], r["stream"], "stream_options" in r, r["kv_transfer_params"]["do_remote_decode"]
    (1, False, False, True)
    """
    out = {k: v for k, v in body.items() if k not in ("stream_options", "kv_transfer_params")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_PARAMS))
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    return out


def decode_request(body: dict[str, Any], prefill_answer: dict[str, Any], instance: str) -> dict[str, Any]:
    """The request a decode instance gets: the client's, with the params the prefill answered.

    >>> decode_request({"prompt": "hi"}, {"kv_transfer_params": {"remote_block_ids": [[1]]}}, "p")
    {'prompt': 'hi', 'kv_transfer_params': {'remote_block_ids': [[1]]}}
    >>> decode_request({"prompt": "hi"}, {"choices": []}, "http://127.0.0.1:8100")
    Traceback (most recent call last):
    ...
    kvconf.proxy.UpstreamError: the prefill instance http://127.0.0.1:8100 answered no kv_transfer_params: \
start it with kvconf's exported JSON for kv_role kv_producer (python -m kvconf connector=... \
connector.kv_role=kv_producer action=export export.target=kvconf)
    """
    params = prefill_answer.get("kv_transfer_params") if isinstance(prefill_answer, dict) else None
    if not isinstance(params, dict) or not params:
        raise UpstreamError(502, f"the prefill instance {instance} answered no kv_transfer_params: start it with "
                                 "kvconf's exported JSON for kv_role kv_producer (python -m kvconf connector=... "
                                 "connector.kv_role=kv_producer action=export export.target=kvconf)")
    return {**{k: v for k, v in body.items() if k != "kv_transfer_params"}, "kv_transfer_params": params}


def check(cfg: ProxyConfig) -> None:
    """A :class:`ConfigError` where the proxy has nothing to send requests to."""
    problems = [Problem(f"proxy.{side}", f"no {side} instance: the proxy needs at least one", value=[],
                        fix=f"proxy.{side}=[http://127.0.0.1:{8100 if side == 'prefill' else 8200}] (base URLs of "
                            "vLLM servers started with kvconf's exported JSON)")
                for side in ("prefill", "decode") if not getattr(cfg, side)]
    if problems:
        raise ConfigError(problems)


class Proxy:
    """The instances, taken in turn, and what was served."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self._turns = {"prefill": itertools.cycle(cfg.prefill), "decode": itertools.cycle(cfg.decode)}
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "completed": 0, "failed": 0}

    def next(self, side: str) -> str:
        with self._lock:
            return next(self._turns[side])

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def open(self, side: str, url: str, method: str, path: str,
             body: Optional[dict[str, Any]] = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Sends one request to an instance; its connection and response (headers read), or an
        :class:`UpstreamError` saying which instance did what."""
        parts = urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname or "", parts.port, timeout=self.cfg.connect_timeout)
        what = f"the {side} instance {url}"
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise UpstreamError(502, f"{what} could not be reached: {exc} (proxy.connect_timeout "
                                     f"{self.cfg.connect_timeout:g} s)") from None
        try:
            assert conn.sock is not None
            conn.sock.settimeout(self.cfg.timeout)
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise UpstreamError(504, f"{what} did not answer within {self.cfg.timeout:g} s (proxy.timeout)") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise UpstreamError(502, f"{what} failed: {type(exc).__name__}: {exc}") from None
        if resp.status >= 500:
            text = resp.read()[:500].decode(errors="replace")
            conn.close()
            raise UpstreamError(502, f"{what} answered {resp.status}: {text}")
        return conn, resp


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is not kvconf's style; failures are logged below

    def _json(self, status: int, doc: Any) -> None:
        self._raw(status, "application/json", json.dumps(doc).encode())

    def _error(self, status: int, message: str) -> None:
        print(f"kvconf: proxy: {self.command} {self.path}: {status}: {message}", file=sys.stderr, flush=True)
        self._json(status, {"error": {"message": message, "type": "kvconf_proxy_error", "code": status}})

    def do_GET(self) -> None:
        proxy = self.server.proxy
        if self.path == "/health":
            self._json(200, {"status": "ok", "prefill": proxy.cfg.prefill, "decode": proxy.cfg.decode})
        elif self.path == "/v1/models":
            try:
                conn, resp = proxy.open("decode", proxy.cfg.decode[0], "GET", "/v1/models")
            except UpstreamError as exc:
                self._error(exc.status, exc.message)
                return
            with contextlib.closing(conn):
                self._relay(resp, "decode", proxy.cfg.decode[0])
        else:
            self._error(404, f"no such path: {self.path} (the proxy serves {', '.join(COMPLETIONS)}, "
                             "/v1/models and /health)")

    def do_POST(self) -> None:
        try:
            self._completion()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except Exception as exc:  # a bug here: the client still gets an answer
            self.server.proxy.count("failed")
            self._error(500, f"the proxy failed: {type(exc).__name__}: {exc}")

    def _completion(self) -> None:
        proxy = self.server.proxy
        if self.path not in COMPLETIONS:
            self._error(404, f"no such path: {self.path} (the proxy serves {', '.join(COMPLETIONS)})")
            return
        proxy.count("requests")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            proxy.count("failed")
            self._error(400, f"the request body is not a JSON object: {exc}")
            return
        try:
            url = proxy.next("prefill")
            conn, resp = proxy.open("prefill", url, "POST", self.path, prefill_request(body))
            with contextlib.closing(conn):
                try:
                    raw = resp.read()
                except TimeoutError:
                    raise UpstreamError(504, f"the prefill instance {url} did not finish its answer within "
                                             f"{proxy.cfg.timeout:g} s (proxy.timeout)") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise UpstreamError(502, f"the prefill instance {url} broke off: {exc}") from None
                if resp.status != 200:  # the instance refused the request itself: the client's to see
                    proxy.count("failed")
                    self._raw(resp.status, resp.getheader("Content-Type", "application/json"), raw)
                    return
                try:
                    answer = json.loads(raw)
                except ValueError:
                    raise UpstreamError(502, f"the prefill instance {url} answered no JSON") from None
            wanted = decode_request(body, answer, url)
            durl = proxy.next("decode")
            conn, resp = proxy.open("decode", durl, "POST", self.path, wanted)
        except UpstreamError as exc:
            proxy.count("failed")
            self._error(exc.status, exc.message)
            return
        with contextlib.closing(conn):
            ok = self._relay(resp, "decode", durl)
        proxy.count("completed" if ok and resp.status == 200 else "failed")

    def _raw(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _relay(self, resp: http.client.HTTPResponse, side: str, url: str) -> bool:
        """The instance's answer, as it comes (chunk by chunk where it streams); False where it
        broke off."""
        content_type = resp.getheader("Content-Type", "application/json")
        if resp.getheader("Content-Length") is not None:
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._error(504 if isinstance(exc, TimeoutError) else 502, f"the {side} instance {url} broke off: {exc}")
                return False
            self._raw(resp.status, content_type, data)
            return True
        self.send_response(resp.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ok = True
        while True:
            try:
                piece = resp.read1(65536)
            except (OSError, http.client.HTTPException) as exc:
                print(f"kvconf: proxy: the {side} instance {url} broke off its stream: {exc}", file=sys.stderr,
                      flush=True)
                ok = False
                break
            if not piece:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        if ok:
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.close_connection = True  # the client sees the stream end early
        return ok


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], proxy: Proxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)


def serve_proxy(cfg: ProxyConfig) -> dict[str, Any]:
    """Runs the proxy until SIGINT or SIGTERM; what it served. Prints where it listens (stderr)
    once it does."""
    check(cfg)
    proxy = Proxy(cfg)
    try:
        server = _Server((cfg.host, cfg.port), proxy)
    except OSError as exc:
        raise ConnectorRuntimeError(Problem("proxy.port", f"cannot listen on {cfg.host}:{cfg.port}: {exc}",
                                            value=cfg.port, fix="choose another proxy.port (0: a free one)")) from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="kvconf-proxy",
                              daemon=True)
    thread.start()
    address = f"http://{host}:{port}"
    print(f"kvconf: proxy on {address} (prefill: {', '.join(cfg.prefill)}; decode: {', '.join(cfg.decode)})",
          file=sys.stderr, flush=True)
    with stop_on_signals(threading.Event()) as stop:
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
    return {"address": address, "prefill": cfg.prefill, "decode": cfg.decode, **proxy.counts}

"""A fork server: a process that has imported what is slow to import (vLLM: about 10 seconds here)
forks a child for each request, so that each run is still a new process, with only the imports
shared. Used by ``bench.engine=vllm`` (:mod:`kvconf.bench.vllm_engine`) and by the suite's real-vLLM
tests.

The protocol, one JSON object a line: the caller writes a request (a dict; ``stdout`` and
``stderr``, paths the child writes, the same path for one file as ``2>&1``); the server forks, the
child takes a process group of its own (the caller stops it and what it started at once) and its
files, runs the server's function on the request and exits with the code it returns. The server
answers ``{"pid": N}`` at once and ``{"exit": CODE}`` when the child ends, one request at a time.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Optional

__all__ = ["ForkClient", "serve"]


def _take_files(req: dict[str, Any]) -> None:
    opened: dict[str, int] = {}
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        if path not in opened:
            opened[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened[path], fd)
    for out in opened.values():
        os.close(out)
    sys.stdin = open(os.devnull)


def serve(child: Callable[[dict[str, Any]], int], exit_handlers: bool = False) -> None:
    """Serves the requests on stdin until its end; each child runs ``child(request)``, then exits
    with its code: through the exit handlers a normal exit runs where ``exit_handlers`` (vLLM's
    shutdown of the engine processes it started), else at once (a one-process engine's threads do
    not hold it). A child that raises prints the traceback and exits 1."""
    replies = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                _take_files(req)
                code = child(req)
            except BaseException:  # what a process of its own would print before exiting 1
                traceback.print_exc()
            finally:
                try:
                    if exit_handlers:
                        atexit._run_exitfuncs()
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class ForkClient:
    """The caller's side: starts the server (``argv``), sends requests, reads the answers."""

    def __init__(self, argv: list[str], env: Optional[dict[str, str]] = None, cwd: Optional[str] = None,
                 stderr: Any = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     env=env, cwd=cwd)
        self.replies: queue.Queue[Optional[dict[str, int]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)  # the server is gone

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, request: dict[str, Any], timeout: float) -> Optional[int]:
        """Forks one child; its pid, or None where the server is gone or did not answer in time."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        reply = self._reply(timeout)
        return reply["pid"] if reply is not None and "pid" in reply else None

    def end(self, timeout: float) -> Optional[int]:
        """The child's exit code once it ended; None while it runs after ``timeout`` s (0: now)."""
        reply = self._reply(timeout)
        return reply["exit"] if reply is not None and "exit" in reply else None

    def _reply(self, timeout: float) -> Optional[dict[str, int]]:
        try:
            return self.replies.get(timeout=timeout) if timeout > 0 else self.replies.get_nowait()
        except queue.Empty:
            return None

    @staticmethod
    def kill(pid: int) -> None:
        """Stops a child and what it started (its process group)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

    def close(self, wait: float = 10) -> None:
        """Ends the server: its input closed, killed where it does not end within ``wait`` s."""
        if self.proc.poll() is not None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=wait)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

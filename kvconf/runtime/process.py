"""How kvconf's processes end, where an engine would crash the interpreter's normal exit.

NIXL's UCX backend segfaults in ``_dl_fini`` at interpreter exit in every process that created an
agent. A connector that loads such an engine calls :func:`request_hard_exit`; kvconf's command
line, its peer processes and its pytest plugin then end with :func:`hard_exit` (``os._exit``) once
their output is flushed. Any other exit of such a process (vLLM's own, a library user's
``sys.exit``, an uncaught exception) ends with ``_exit`` and its status before the libraries'
destructors run: :func:`request_hard_exit` registers ``_exit`` with glibc's ``on_exit``.

>>> hard_exit_requested()
False
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

__all__ = ["PARENT_ENV", "PARENT_GRACE_SECONDS", "die_with_parent", "hard_exit", "hard_exit_requested", "request_hard_exit",
           "STACKS_SIGNAL", "stacks_on_signal", "stop_on_signals"]

_hard_exit = False


def request_hard_exit() -> None:
    """Says that this process must end with ``os._exit`` once its work is flushed. Also makes any
    other exit of the process (vLLM's, a library user's ``sys.exit``, an uncaught exception) skip
    the shared libraries' destructors, with the exit status kept: C's ``exit`` calls ``_exit`` with
    its status before ``_dl_fini`` runs (``on_exit``, installed once; Python has finalized by then)."""
    global _hard_exit
    if not _hard_exit:
        _skip_library_destructors()
    _hard_exit = True


def _skip_library_destructors() -> bool:
    """Registers ``_exit`` with glibc's ``on_exit``: it receives ``exit``'s status first, as
    ``_exit``'s argument. False where there is no such call (not glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.on_exit(ctypes.cast(libc._exit, ctypes.c_void_p), None) == 0)
    except (OSError, AttributeError):
        return False


def hard_exit_requested() -> bool:
    """Whether a connector of this process asked for :func:`request_hard_exit`."""
    return _hard_exit


def hard_exit(code: object) -> None:
    """Where asked for, flushes stdout and stderr and ends the process with ``code`` (``None``: 0;
    a message: 1), as ``sys.exit`` would have; otherwise returns."""
    if not _hard_exit:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


PARENT_ENV = "KVCONF_PEER_PARENT"
"""Set by a parent that starts a peer process: the parent's pid (:func:`die_with_parent`)."""


PARENT_GRACE_SECONDS = 3.0
"""How long a peer whose parent died may take to shut down cleanly before it ends anyway."""


def die_with_parent(signum: int = 15, grace: float | None = PARENT_GRACE_SECONDS) -> bool:
    """In a peer process: asks the kernel to send ``signum`` (SIGTERM: the peer shuts down as on
    Ctrl-C) when the parent that started it dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``);
    if the parent is already gone, sends it now. A clean shutdown can take long (a peer in the
    middle of a large request, a machine under load), so where ``grace`` is a number the process
    also ends with ``os._exit(128 + signum)`` that many seconds after its parent died, whatever it
    was doing. False where the platform has no such call."""
    parent = os.environ.get(PARENT_ENV)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signum, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    ppid = int(parent) if parent is not None and parent.isdigit() else os.getppid()
    if grace is not None:
        threading.Thread(target=_end_after_parent, args=(ppid, grace, 128 + signum), daemon=True,
                         name="kvconf-parent-watch").start()
    if os.getppid() != ppid:
        os.kill(os.getpid(), signum)  # the parent died before the request took effect
    return True


def _end_after_parent(ppid: int, grace: float, code: int) -> None:
    while os.getppid() == ppid:
        time.sleep(0.1)
    time.sleep(grace)  # the signal's clean shutdown had this long
    os._exit(code)  # no flush: its output went to the parent, and a flush could block on the pipe


STACKS_SIGNAL = signal.SIGUSR1
"""``kill -USR1 PID`` makes a kvconf process print every thread's stack to stderr and go on."""


def stacks_on_signal() -> bool:
    """Makes :data:`STACKS_SIGNAL` print every thread's Python stack to stderr (the process goes on):
    where a job seems to hang, ``kill -USR1 PID`` says where. Not where the signal already has a
    handler or a disposition other than the default (someone else's); False then."""
    import faulthandler

    if signal.getsignal(STACKS_SIGNAL) is not signal.SIG_DFL:
        return False
    try:
        faulthandler.register(STACKS_SIGNAL, all_threads=True, chain=False)
    except (ValueError, RuntimeError, OSError):  # no usable stderr
        return False
    return True


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """Within it, SIGINT and SIGTERM set ``stop`` (a long-lived server's way to end cleanly); the
    handlers before it come back after. Off the main thread (where Python allows no handler) it
    changes nothing."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

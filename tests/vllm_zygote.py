"""vLLM imported once, a fresh process forked for each run of :mod:`vllm_runner` or :mod:`vllm_pd`
(importing vLLM takes about 10 of the 15 seconds a small run takes here; the suite runs a few dozen).

    python vllm_zygote.py            # then, on stdin, one JSON request per line

A request: ``argv`` (the script's), ``env`` (the child's whole environment), ``cwd``, ``stdout``
and ``stderr`` (files the child writes; the same path: one file, as ``2>&1``), and ``module``
(``vllm_runner`` where not given). The zygote forks
(:func:`kvconf.runtime.forkserver.serve`); the child takes the request's environment, folder and
files, runs the module's ``main()`` and exits with its code, running the exit handlers a normal exit
runs (vLLM's shutdown of its engine processes among them). The zygote answers ``{"pid": N}`` at
once and ``{"exit": CODE}`` when the child ends, one request at a time.
The child is a new process with a new engine, as a run of its own is; only the imports are shared.
Ends with its parent (pytest's worker) or at the end of its input.
"""

from __future__ import annotations

import os
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))


def _child(req: dict) -> int:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    tempfile.tempdir = None  # the run's TMPDIR, not the zygote's
    sys.path[:0] = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.argv = list(req["argv"])
    import importlib

    try:
        importlib.import_module(req.get("module", "vllm_runner")).main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def main() -> None:
    sys.path.insert(0, TESTS)
    sys.path.insert(0, os.path.dirname(TESTS))
    from vllm_runner import ENV

    for key, value in ENV.items():  # as the runner sets them before it imports vLLM
        os.environ.setdefault(key, value)
    from kvconf.runtime.process import die_with_parent

    die_with_parent()
    import vllm  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401

    from kvconf.runtime.forkserver import serve

    serve(_child, exit_handlers=True)


if __name__ == "__main__":
    main()

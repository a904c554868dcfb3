"""What kvconf's sweeper (``hydra/sweeper=kvconf``, the default; the class lives in
``hydra_plugins/kvconf_sweeper`` because Hydra only loads plugins from there) adds to Hydra's basic
sweeper:

- **Results that travel with the jobs.** Each job returns its record (:func:`kvconf.cli.app.execute`:
  its overrides, exit code, message and, for a bench, the content of its ``results.json``); a
  launcher (basic, joblib, Ray, submitit) hands the returns back to the launching process, which
  keeps them (:func:`job_records`) for the summary and the exit code. A job's folder on another
  machine is not needed.
- **Placement.** A job that runs two processes (a peer-to-peer self-test or bench starts its peer
  beside it) asks the launcher for that many CPUs: Ray's ``num_cpus``, submitit's
  ``cpus_per_task`` (:func:`launch_placed`), never fewer than the user set. On Ray each job runs in
  a worker process of its own (``max_calls=1``, unless set): a transfer engine's threads and ports
  never outlive their job into the next.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf, open_dict

__all__ = ["cpus_needed", "job_records", "launch", "launch_placed", "ray_temp_folder", "stop_local_ray"]

def job_records(returns: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """One record per job from the sweeper's batches of ``JobReturn``: what the job returned, or, where
    the task raised (a launcher's failure, not kvconf's: kvconf's task reports its own errors), the
    exception with exit code 1.

    >>> from hydra.core.utils import JobReturn, JobStatus
    >>> bad = JobReturn(overrides=["kv_cache=tiny"], status=JobStatus.FAILED, _return_value=OSError("disk full"))
    >>> job_records([[bad]])[0]["message"], job_records([[bad]])[0]["exit_code"]
    ('OSError: disk full', 1)
    """
    from hydra.core.utils import JobStatus

    out = []
    for batch in returns:
        for jr in batch:
            label = " ".join(jr.overrides or []) or "(defaults)"
            try:
                value = jr.return_value  # a failed job's raises what the task raised
            except Exception as exc:
                value = exc
            if jr.status == JobStatus.COMPLETED and isinstance(value, dict):
                out.append(dict(value))
                continue
            message = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else "the job returned nothing"
            choices = dict(o.split("=", 1) for o in jr.overrides or [] if "=" in o)
            out.append({"overrides": label, "exit_code": 1, "message": message, "connector": choices.get("connector"),
                        "kv_cache": choices.get("kv_cache"), "job_dir": None, "results": None})
    return out


def cpus_needed(hydra_context: Any, config: Any, overrides: Sequence[str]) -> int:
    """The processes a job runs at once: what its connector class says (``job_processes(job)``, the
    job's composed config: 2 where it starts a peer process), else 1; 1 where the job's config does
    not compose or its connector does not resolve (the job itself then says why)."""
    try:
        cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(cfg):
            cfg.pop("hydra", None)
        job = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(job, dict)
        from kvconf.contract.registry import resolve

        cls = resolve(str(job["connector"]["name"]), job["connector"].get("module_path")).target
        count = getattr(cls, "job_processes", None)
        return max(1, int(count(job))) if callable(count) else 1
    except Exception:  # the job reports its own error
        return 1


def _resource(launcher: Any) -> tuple[Any, str] | None:
    """Where ``launcher`` takes a job's CPU count: (mapping, key), or None (it runs jobs on this
    machine's cores as they come: basic, joblib)."""
    ray_cfg = getattr(launcher, "ray_cfg", None)
    if ray_cfg is not None and "remote" in ray_cfg:
        return ray_cfg.remote, "num_cpus"
    params = getattr(launcher, "params", None)
    if isinstance(params, dict) and "submitit_folder" in params:
        return params, "cpus_per_task"
    return None


def _local_ray(launcher: Any) -> bool:
    """Whether ``launcher`` is Hydra's Ray launcher starting a cluster of its own (no address)."""
    ray_cfg = getattr(launcher, "ray_cfg", None)
    return ray_cfg is not None and not (ray_cfg.get("init") or {}).get("address")


RAY_SOCKET_TAIL = len("/ray/session_2026-11-28_21-27-52_046303_99999/sockets/plasma_store")
"""What a local Ray cluster appends to its temp folder for its longest socket path; a Unix socket's
path holds 107 bytes."""


def ray_temp_folder(environ: Any = None) -> str | None:
    """Where a local Ray cluster should keep its sockets when the temp folder it would use
    (``RAY_TMPDIR``, else ``TMPDIR``) is too long for them: ``/tmp``; None where it fits.

    >>> ray_temp_folder({"TMPDIR": "/tmp"}) is None, ray_temp_folder({"TMPDIR": "/tmp/" + "x" * 60})
    (True, '/tmp')
    >>> ray_temp_folder({"RAY_TMPDIR": "/tmp/" + "x" * 60})  # the user chose it: Ray will say so
    """
    import tempfile

    env = os.environ if environ is None else environ
    if env.get("RAY_TMPDIR"):
        return None
    base = env.get("TMPDIR") or tempfile.gettempdir()
    return "/tmp" if len(base) + RAY_SOCKET_TAIL > 107 else None


def launch(launcher: Any, batch: Sequence[Sequence[str]], initial_job_idx: int, hydra_context: Any,
           config: Any) -> Sequence[Any]:
    """:func:`launch_placed`; a launcher that cannot run the jobs at all (Ray does not start, no
    SLURM) is a runtime failure, said in one message (exit 1)."""
    from kvconf.errors import ConnectorRuntimeError, KVConfError, Problem  # loaded once a sweep starts

    if _local_ray(launcher):
        short = ray_temp_folder()
        if short is not None:
            os.environ["RAY_TMPDIR"] = short
            print(f"kvconf: the temp folder is too long for a local Ray cluster's sockets (107 bytes at most): "
                  f"Ray keeps them under {short}/ray (set RAY_TMPDIR to choose)", file=sys.stderr, flush=True)
    try:
        return launch_placed(launcher, batch, initial_job_idx, hydra_context, config)
    except KVConfError:
        raise
    except Exception as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        name = type(launcher).__name__
        err = ConnectorRuntimeError(Problem(
            "hydra/launcher", f"the {name} could not run the jobs: {type(exc).__name__}: {exc}",
            value=name, fix="check the launcher's settings (hydra.launcher.*) and that its cluster is reachable; "
                            "HYDRA_FULL_ERROR=1 shows the traceback"))
        print(err.render(), file=sys.stderr, flush=True)
        from .state import state

        state.task_started = True  # composition went well: not a config error
        raise SystemExit(1) from None


def stop_local_ray(launcher: Any) -> None:
    """Stops the local Ray cluster a Ray launcher started for this sweep (none was given by
    address), waiting for its processes, before the summary: nothing of it outlives the sweep."""
    if not _local_ray(getattr(launcher, "launcher", launcher)):
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


def launch_placed(launcher: Any, batch: Sequence[Sequence[str]], initial_job_idx: int,
                  hydra_context: Any, config: Any) -> Sequence[Any]:
    """Launches ``batch`` in runs of consecutive jobs that need the same CPUs, each run with the
    launcher's CPU request raised to that need (the user's own request, where larger, stands);
    the jobs keep their order and numbers."""
    where = _resource(launcher)
    if where is None or not batch:
        return launcher.launch(batch, initial_job_idx=initial_job_idx)
    holder, key = where
    own = holder.get(key) if hasattr(holder, "get") else None
    fresh = key == "num_cpus" and holder.get("max_calls") is None
    if fresh:  # a Ray worker runs one job and exits: each job in a process of its own, as kvconf's jobs expect
        _set(holder, "max_calls", 1)
    needs = [cpus_needed(hydra_context, config, o) for o in batch]
    results: list[Any] = []
    start = 0
    while start < len(batch):
        end = start
        while end < len(batch) and needs[end] == needs[start]:
            end += 1
        want = max(needs[start], int(own or 1))
        _set(holder, key, want if want > 1 or own is not None else None)
        if want > 1:
            print(f"kvconf: jobs #{initial_job_idx + start}-#{initial_job_idx + end - 1} run {needs[start]} processes "
                  f"each: asking the launcher for {want} CPUs per job ({key})", file=sys.stderr, flush=True)
        results.extend(launcher.launch(batch[start:end], initial_job_idx=initial_job_idx + start))
        start = end
    _set(holder, key, own)
    if fresh:
        _set(holder, "max_calls", None)
    return results


def _set(holder: Any, key: str, value: Any) -> None:
    if isinstance(holder, dict):
        if value is None:
            holder.pop(key, None)
        else:
            holder[key] = value
        return
    with open_dict(holder):
        if value is None:
            holder.pop(key, None)
        else:
            holder[key] = value

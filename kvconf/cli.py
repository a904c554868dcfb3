"""``python -m kvconf [overrides]``: the Hydra app.

Hydra composes (conf/ inside the package, plus a user's ``--config-dir``); everything after that
is :func:`kvconf.pipeline.run_job`. Errors become one message block on stderr and an exit code:
2 for config and contract errors (Hydra's own composition errors included), 1 for runtime
failures. In a multirun sweep a failing job is reported and the others still run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError, ConnectorRuntimeError, KVConfError, Problem
from .help import help_template

__all__ = ["CONF_DIR", "SUBCOMMANDS", "main"]

SUBCOMMANDS = {"validate": "kvconf.validate", "check-connector": "kvconf.check_connector",
               "bench-compare": "kvconf.bench_compare"}
"""``kvconf NAME ...`` runs these tools instead of the Hydra app (no override is a bare word)."""


def _conf_dir() -> str:
    import kvconf.conf

    return str(Path(kvconf.conf.__file__).resolve().parent)


CONF_DIR = _conf_dir()


@dataclass
class _State:
    t0: float = field(default_factory=time.perf_counter)
    task_started: bool = False
    jobs: list[tuple[str, int]] = field(default_factory=list)
    """(overrides, exit code) of each job run in this process."""
    swept_failures: list[tuple[str, int]] = field(default_factory=list)
    """(job folder, exit code) of failed jobs that a launcher ran in other processes (joblib)."""


_state = _State()


def _want_traceback(data: Any) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or (isinstance(data, dict) and data.get("debug") is True)


def _task(cfg: DictConfig) -> None:
    """The task Hydra's main runs (once, or once per job of a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    _execute(cfg, multirun=hc.mode == RunMode.MULTIRUN, label=" ".join(hc.overrides.task) or "(defaults)",
             job_dir=Path(hc.runtime.output_dir), choices=dict(hc.runtime.choices))


def _execute(cfg: DictConfig, *, multirun: bool, label: str, job_dir: Path | None = None,
             choices: dict[str, Any] | None = None) -> None:
    _state.task_started = True
    compose_s = time.perf_counter() - _state.t0
    data: Any = None
    code = 0
    err_text = ""
    try:
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # an interpolation that does not resolve
            raise ConfigError(Problem(getattr(exc, "full_key", "") or "", str(exc).splitlines()[0],
                                      fix="fix the interpolation")) from None
        from .pipeline import run_job

        report = run_job(data)
        report["timings"] = {"compose": round(compose_s, 6), **report["timings"]}
        if report["action"] == "bench":
            from .results import write_results

            kv_label = (choices or {}).get("kv_cache") or f"{report['plan']['bytes_per_block']} B/block"
            report["results_file"] = str(write_results(report, data, job_dir or Path.cwd(), kv_label))
        _emit(report, data.get("output", "text"))
    except KVConfError as exc:
        code = exc.exit_code
        err_text = exc.problems[0].message if exc.problems else str(exc)
        _report_error(exc, data, label if multirun else None)
    except Exception as exc:  # a bug in a connector or in kvconf: a runtime failure
        err = ConnectorRuntimeError(Problem("", f"{type(exc).__name__}: {exc}",
                                            fix="rerun with debug=true (or HYDRA_FULL_ERROR=1) for the traceback"))
        err.__cause__ = exc
        code = 1
        err_text = f"{type(exc).__name__}: {exc}"
        _report_error(err, data, label if multirun else None, cause=exc)
    if code and multirun and job_dir is not None and isinstance(data, dict):
        name = (data.get("connector") or {}).get("name") if isinstance(data.get("connector"), dict) else None
        _write_error(job_dir, {**(choices or {}), **({"connector": name} if name else {})}, code, err_text)
    _state.jobs.append((label, code))
    _state.t0 = time.perf_counter()
    if code and not multirun:
        sys.stdout.flush()
        sys.exit(code)


def _write_error(job_dir: Path, choices: dict[str, Any], code: int, message: str) -> None:
    """A failed sweep job leaves error.json where its results.json would be, for the summary."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "error.json").write_text(json.dumps({
        "connector": choices.get("connector"), "kv_cache": choices.get("kv_cache"), "exit_code": code,
        "message": message}) + "\n")


def _report_error(exc: KVConfError, data: Any, job: str | None, cause: BaseException | None = None) -> None:
    if _want_traceback(data):
        traceback.print_exception(cause or exc, file=sys.stderr)
    prefix = f"[job {job}] " if job else ""
    print(prefix + exc.render(), file=sys.stderr)
    if isinstance(data, dict) and data.get("output") == "json":
        print(json.dumps({"ok": False, "error": exc.as_dict()}, default=str))


def _emit(report: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps({"ok": True, **report}, default=str))
        return
    if report["action"] == "export":
        print(json.dumps(report["kv_transfer_config"], indent=2))
        return
    from .report import render_text

    print(render_text(report))


def _store_help(full: bool) -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/help", name="kvconf", package="hydra.help", node={
        "app_name": "kvconf",
        "header": "kvconf: declare, validate and start KV-cache connectors.",
        "footer": "Powered by Hydra (https://hydra.cc). Use --hydra-help for Hydra's own flags.",
        "template": help_template() if full else "",
    })


_store_help(full=False)
_app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_task)


def _plain_run(argv: list[str]) -> bool:
    """A single run with overrides only: no flag, no sweep, nothing under ``hydra``. Such a run is
    composed once through Hydra's compose API (Hydra's main composes twice: once to learn the
    mode); every other command line goes through Hydra's main."""
    return not any(a.startswith("-") or a.lstrip("+~").startswith("hydra") for a in argv)


def _compose_and_run(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="kvconf"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
    except Exception as exc:  # composition failed: Hydra's message, as its main would print it
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        print("kvconf: config error\n" + "\n".join(f"  {ln}" for ln in lines), file=sys.stderr)
        raise SystemExit(2) from None
    _execute(cfg, multirun=False, label=" ".join(overrides) or "(defaults)", choices=choices)


def main() -> None:
    """Entry point of ``python -m kvconf`` and the ``kvconf`` console script."""
    code: Any = 0
    try:
        _main()
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        _hard_exit_if_asked(code)


def _hard_exit_if_asked(code: Any) -> None:
    """Ends the process with ``os._exit`` where an engine would crash the normal exit (NIXL)."""
    from .connector import hard_exit_requested

    if hard_exit_requested():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _main() -> None:
    _state.t0 = time.perf_counter()
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:  # kvconf validate ..., kvconf check-connector ...
        import importlib

        raise SystemExit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    from .overrides import check_overrides

    try:
        check_overrides(sys.argv[1:], CONF_DIR)
    except ConfigError as exc:
        _report_error(exc, None, None)
        raise SystemExit(2) from None
    argv = sys.argv[1:]
    if _plain_run(argv):
        _compose_and_run(argv)
        return
    if "--help" in argv or "-h" in argv:
        _store_help(full=True)
    try:
        _app()
    except SystemExit as exc:
        # Hydra exits 1 when composition fails (unknown group option, bad override): our task never
        # ran, so it is a config error.
        if exc.code == 1 and not _state.task_started:
            raise SystemExit(2) from None
        raise
    except Exception:
        if not _state.task_started:  # HYDRA_FULL_ERROR=1 lets composition errors through
            traceback.print_exc()
            raise SystemExit(2) from None
        raise
    if not _state.jobs and _state.swept_failures:  # a launcher ran the jobs in other processes
        print(f"kvconf: {len(_state.swept_failures)} job(s) failed:", file=sys.stderr)
        for folder, code in _state.swept_failures:
            print(f"  exit {code}: {folder}", file=sys.stderr)
        raise SystemExit(max(code for _, code in _state.swept_failures))
    failed = [j for j in _state.jobs if j[1]]
    if len(_state.jobs) > 1 or (failed and len(_state.jobs) != 1):
        if failed:
            print(f"kvconf: {len(failed)} of {len(_state.jobs)} jobs failed:", file=sys.stderr)
            for label, code in failed:
                print(f"  exit {code}: {label}", file=sys.stderr)
            raise SystemExit(max(code for _, code in failed))

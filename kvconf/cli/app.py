"""``python -m kvconf [overrides]``: the Hydra app, and the ``kvconf`` command with its subcommands.

Hydra composes (``kvconf.conf``: ``conf/`` in the repository, inside the package when installed,
plus a user's ``--config-dir``); everything after that is :func:`kvconf.runtime.pipeline.run_job`.
Errors become one message block on stderr and an exit code: 2 for config and contract errors
(Hydra's own composition errors included), 1 for runtime failures. In a multirun sweep a failing
job is reported and the others still run.
``kvconf NAME ...`` runs the subcommand ``NAME`` (:data:`SUBCOMMANDS`) instead.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from kvconf.conf import CONF_DIR, CONFIG_NAME, HYDRA_VERSION_BASE, compose, store_help
from kvconf.errors import MISSING, ConfigError, ConnectorRuntimeError, KVConfError, Problem
from kvconf.runtime.process import hard_exit, stacks_on_signal
from kvconf.version import __version__

from .state import state

__all__ = ["CONF_DIR", "SUBCOMMANDS", "execute", "main"]

SUBCOMMANDS = {
    "validate": ("kvconf.ci.validate", "validate config files, or every combination of the config groups (--matrix)"),
    "check-connector": ("kvconf.ci.check_connector", "check connector classes' constructor contract (MODULE:CLASS)"),
    "bench-compare": ("kvconf.bench.compare", "compare two benchmark results (results.json files or sweep folders)"),
    "lint": ("kvconf.ci.lint", "check vLLM --kv-transfer-config JSON (strings, files, launch scripts, manifests)"),
    "import": ("kvconf.ci.importer", "translate a vLLM --kv-transfer-config into kvconf's connector YAML"),
}
"""``kvconf NAME ...`` runs these tools instead of the Hydra app: name -> (module, what it does)."""

INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
"""Flags that only print (help, the config, completion scripts): a closed stdout ends them quietly."""


def _want_traceback(data: Any) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or (isinstance(data, dict) and data.get("debug") is True)


def _task(cfg: DictConfig) -> dict[str, Any]:
    """The task Hydra's main runs (once, or once per job of a sweep). Its return value is the job's
    record (:func:`execute`): a launcher hands it back to the process that launched the sweep,
    wherever the job ran."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kvconf.config.overrides import as_typed

    hc = HydraConfig.get()
    state.callbacks = [str(c.get("_target_")) for c in (hc.callbacks or {}).values() if hasattr(c, "get")]
    label = " ".join(as_typed(o) for o in hc.overrides.task) or "(defaults)"
    return execute(cfg, multirun=hc.mode == RunMode.MULTIRUN, label=label,
                   job_dir=Path(hc.runtime.output_dir), choices=dict(hc.runtime.choices))


def execute(cfg: DictConfig, *, multirun: bool, label: str, job_dir: Path | None = None,
            choices: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs one composed job and reports it (stdout) or its error (stderr); outside a sweep a
    failure ends the process with its exit code. Returns the job's record: ``overrides``,
    ``exit_code``, ``message`` (why it failed), ``connector``, ``kv_cache`` and, for a bench,
    ``results`` (the content of its ``results.json``)."""
    from kvconf.runtime.pipeline import run_job

    state.task_started = True
    compose_s = time.perf_counter() - state.t0
    data: Any = None
    code = 0
    err_text = ""
    results: dict[str, Any] | None = None
    try:
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # an interpolation that does not resolve
            raise ConfigError(Problem(getattr(exc, "full_key", "") or "", str(exc).splitlines()[0],
                                      fix="fix the interpolation")) from None
        if isinstance(data, dict) and data.get("action") == "proxy":
            _proxy(data)
            state.jobs.append((label, 0))
            return {"overrides": label, "exit_code": 0, "message": "", "connector": None, "kv_cache": None,
                    "job_dir": str(job_dir) if job_dir else None, "results": None}
        if _bench_engine(data) == "vllm":
            report = _bench_in_vllm(data)
        else:
            report = run_job(data, actions={"bench": _bench})
        report["timings"] = {"compose": round(compose_s, 6), **report["timings"]}
        report["callbacks"] = list(state.callbacks)
        if report["action"] == "bench":
            from kvconf.bench.results import results_document, write_results

            kv_label = (choices or {}).get("kv_cache") or f"{report['plan']['bytes_per_block']} B/block"
            results = results_document(report, data, kv_label)
            report["results_file"] = str(write_results(report, data, job_dir or Path.cwd(), kv_label, results))
        _emit(report, data.get("output", "text"))
    except KVConfError as exc:
        code = exc.exit_code
        err_text = _one_line(exc.problems[0]) if exc.problems else str(exc)
        _report_error(exc, data, label if multirun else None)
    except Exception as exc:  # a bug in a connector or in kvconf: a runtime failure
        err = ConnectorRuntimeError(Problem("", f"{type(exc).__name__}: {exc}",
                                            fix="rerun with debug=true (or HYDRA_FULL_ERROR=1) for the traceback"))
        err.__cause__ = exc
        code = 1
        err_text = f"{type(exc).__name__}: {exc}"
        _report_error(err, data, label if multirun else None, cause=exc)
    name = (data.get("connector") or {}).get("name") if isinstance(data, dict) and isinstance(
        data.get("connector"), dict) else None
    who = {**(choices or {}), **({"connector": name} if name else {})}
    if code and multirun and job_dir is not None and isinstance(data, dict):
        _write_error(job_dir, who, code, err_text)
    state.jobs.append((label, code))
    state.t0 = time.perf_counter()
    if code and not multirun:
        _flush()
        sys.exit(code)
    return {"overrides": label, "exit_code": code, "message": err_text, "connector": who.get("connector"),
            "kv_cache": who.get("kv_cache"), "job_dir": str(job_dir) if job_dir else None, "results": results}


def _proxy(data: dict[str, Any]) -> None:
    """``action=proxy``: validates the config, serves until SIGINT or SIGTERM, says what it served."""
    from kvconf.config.models import validate
    from kvconf.proxy import serve_proxy  # loaded by action=proxy alone

    served = serve_proxy(validate(data).proxy)
    if data.get("output") == "json":
        _print(json.dumps({"ok": True, "action": "proxy", "proxy": served}))
    else:
        _print(f"kvconf: proxy on {served['address']} stopped: {served['requests']} request(s), "
               f"{served['completed']} completed, {served['failed']} failed")


def _bench_engine(data: Any) -> Any:
    """``bench.engine`` of an ``action=bench`` job, else None."""
    if not isinstance(data, dict) or data.get("action") != "bench" or not isinstance(data.get("bench"), dict):
        return None
    return data["bench"].get("engine")


def _bench_in_vllm(data: dict[str, Any]) -> dict[str, Any]:
    """``action=bench bench.engine=vllm``: the job's checks (as ``action=check``), then the
    connector measured inside vLLM (:mod:`kvconf.bench.in_vllm`)."""
    from kvconf.bench.in_vllm import run_vllm_bench  # loaded by bench.engine=vllm alone
    from kvconf.runtime.pipeline import Job, load, run_job

    report = run_job({**data, "action": "check"})
    job = Job(data)
    load(job)
    assert job.cfg is not None
    t0 = time.perf_counter()
    report["action"] = "bench"
    report["bench"] = run_vllm_bench(data, report, job.cls, job.cfg)
    report["timings"]["bench"] = round(time.perf_counter() - t0, 6)
    return report


def _bench(connector: Any, kv_caches: Any, ctx: Any) -> dict[str, Any]:
    from kvconf.bench.run import run_bench  # loaded by action=bench alone

    return run_bench(connector, kv_caches, ctx)


def _one_line(p: Problem) -> str:
    """A problem in one line, for a sweep's list of failed jobs: path, message, value.

    >>> _one_line(Problem("connector.kv_role", "value is not one of the allowed values", value="sideways"))
    "connector.kv_role: value is not one of the allowed values (value 'sideways')"
    """
    text = f"{p.path}: {p.message}" if p.path else p.message
    return text + (f" (value {p.value!r})" if p.value is not MISSING else "")


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
        _print(json.dumps({"ok": False, "error": exc.as_dict()}, default=str))


def _emit(report: dict[str, Any], output: str) -> None:
    if output == "json":
        _print(json.dumps({"ok": True, **report}, default=str))
    elif report["action"] == "export":
        _print(json.dumps(report["kv_transfer_config"], indent=2))
        for note in report.get("export_notes", ()):  # on stderr: stdout stays the JSON alone
            print(f"kvconf: note: {note}", file=sys.stderr)
    else:
        from .report import render_text

        _print(render_text(report))


def _print(text: str) -> None:
    """Prints to stdout; a reader that closed it (``| head``) ends the output, quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_closed()


def _stdout_closed() -> None:
    """Points stdout at /dev/null, so that nothing more (the interpreter's last flush included)
    fails on the pipe its reader closed."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def _flush() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_closed()


def _store_help(full: bool, argv: Sequence[str] = ()) -> None:
    """``--help``'s text; with ``connector.module_path=M connector.name=C`` in ``argv``, the
    settings listed are that class's (its module imported), not the built-in connectors'."""
    from .help import help_template  # --help alone reads the models' docstrings

    given = dict(a.split("=", 1) for a in argv if a.startswith(("connector.module_path=", "connector.name=")))
    module_path = given.get("connector.module_path")
    own = (module_path, given.get("connector.name")) if module_path else None
    store_help(template=help_template(SUBCOMMANDS, own) if full else "",
               header=f"kvconf {__version__}: declare, validate and start KV-cache connectors.",
               footer="Powered by Hydra (https://hydra.cc). Use --hydra-help for Hydra's own flags.")


_store_help(full=False)
_app = hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONF_DIR, config_name=CONFIG_NAME)(_task)


def _plain_run(argv: list[str]) -> bool:
    """A single run with overrides only: no flag, no sweep, nothing under ``hydra``. Such a run is
    composed once through Hydra's compose API (Hydra's main composes twice: once to learn the
    mode); every other command line goes through Hydra's main."""
    return not any(a.startswith("-") or a.lstrip("+~").startswith("hydra") for a in argv)


def _compose_and_run(overrides: list[str]) -> None:
    from kvconf.config.overrides import as_typed

    try:
        cfg = compose(overrides, return_hydra_config=True, job_name="kvconf")
        label = " ".join(as_typed(o) for o in overrides) or "(defaults)"
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
    except Exception as exc:  # composition failed: Hydra's message, as its main would print it
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        print("kvconf: config error\n" + "\n".join(f"  {ln}" for ln in _exception_lines(exc)), file=sys.stderr)
        raise SystemExit(2) from None
    execute(cfg, multirun=False, label=label, choices=choices)


def _exception_lines(exc: BaseException) -> list[str]:
    """The message of ``exc``, or of the first exception behind it that has one (Hydra wraps an
    interpolation that does not parse in an exception with no text)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        lines = [ln for ln in str(cur).splitlines() if ln.strip()]
        if lines:
            return lines if cur is exc else [f"{type(cur).__name__}: {lines[0]}", *lines[1:]]
        cur = cur.__cause__ or cur.__context__
    return [f"{type(exc).__name__} (no message)"]


def main() -> None:
    """Entry point of ``python -m kvconf`` and the ``kvconf`` console script."""
    code: Any = 0
    stacks_on_signal()  # kill -USR1 PID: where a job that seems to hang is
    try:
        _main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
        raise
    except BrokenPipeError:  # a reader closed stdout before we were done: nothing more to say
        _stdout_closed()
    finally:
        hard_exit(code)


def _bare_word(arg: str) -> bool:
    """An argument that is neither a flag nor an override (``key=value``, ``~key``, ``+key=value``)."""
    return not arg.startswith(("-", "~", "+")) and "=" not in arg


def _in_vllm_terms(exc: ConfigError, argv: list[str]) -> ConfigError:
    """An unknown key that is vLLM's spelling (``connector.kv_connector``, mooncake's
    ``connector.extra.mooncake_protocol``) or a field vLLM removed, told as such."""
    from kvconf.config.vllm import explain
    from kvconf.contract import registry

    name = next((a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("connector=")), "example")
    vllm_name = registry.vllm_names().get(name)
    mapped: dict[str, str] = {}
    if vllm_name is not None:
        try:
            mapped = getattr(registry.resolve(name, None).target, "vllm_extra_keys", {})
        except Exception:  # the connector's module does not import: keep the plain message
            mapped = {}
    return ConfigError([explain(p, vllm_name, mapped) for p in exc.problems])


def _config_dirs(argv: list[str]) -> list[str]:
    """The folders of YAML files a user gives: ``--config-dir DIR`` (``--config-dir=DIR``, ``-cd
    DIR``) and ``--config-path DIR`` (``-cp DIR``: a primary config of one's own)."""
    out = []
    for i, a in enumerate(argv):
        if a in ("--config-dir", "-cd", "--config-path", "-cp") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(("--config-dir=", "--config-path=")):
            out.append(a.split("=", 1)[1])
    return out


def _completion_request(argv: list[str]) -> str | None:
    """The value of ``-sc``/``--shell-completion`` (``install=bash``), if given."""
    for i, a in enumerate(argv):
        if a in ("-sc", "--shell-completion") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--shell-completion="):
            return a.split("=", 1)[1]
    return None


def _main(argv: list[str]) -> None:
    state.t0 = time.perf_counter()
    if argv and argv[0] in SUBCOMMANDS:  # kvconf validate ..., kvconf check-connector ...
        raise SystemExit(importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:]))
    if "--version" in argv or "-V" in argv:
        _print(f"kvconf {__version__}")
        return
    completion = _completion_request(argv)
    if completion in ("install=bash", "uninstall=bash"):  # for `kvconf` and `python -m kvconf` alike
        from .completion import INSTALL_SCRIPT, UNINSTALL_SCRIPT

        _print(INSTALL_SCRIPT if completion == "install=bash" else UNINSTALL_SCRIPT)
        return
    if completion == "query=bash":
        from .completion import normalize_query_line

        normalize_query_line()
    if argv and _bare_word(argv[0]):
        word = argv[0]
        _report_error(ConfigError(Problem(
            "", f"{word!r} is neither a subcommand nor an override", value=word, allowed=list(SUBCOMMANDS),
            fix="run a subcommand (kvconf validate ...), or give overrides as key=value "
                "(python -m kvconf --help lists them)")), None, None)
        raise SystemExit(2)
    from kvconf.config.overrides import as_composable, check_overrides, external_connector, layout_from_model
    from kvconf.contract.registry import builtin_extra_model

    argv = external_connector(layout_from_model(argv))
    dirs = _config_dirs(argv)
    if dirs:  # a user's YAML: malformed, duplicate keys, alias bombs are one message, not a traceback
        from kvconf.config.inputs import config_dir_problems

        problems = [p for d in dirs if Path(d).is_dir() for p in config_dir_problems(Path(d))]
        if problems:
            _report_error(ConfigError(problems), None, None)
            raise SystemExit(2)
    try:
        check_overrides(argv, CONF_DIR, extra_model=builtin_extra_model)
    except ConfigError as exc:
        _report_error(_in_vllm_terms(exc, argv), None, None)
        raise SystemExit(2) from None
    argv = as_composable(argv, CONF_DIR)
    if _plain_run(argv):
        _compose_and_run(argv)
        return
    if any(a in INFO_FLAGS or a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head`: end as any Unix tool does
    if "--help" in argv or "-h" in argv:
        _store_help(full=True, argv=argv)
    sys.argv = [sys.argv[0], *argv]  # Hydra's main reads the overrides as kvconf made them composable
    try:
        _app()
    except SystemExit as exc:
        # Hydra exits 1 when composition fails (unknown group option, bad override): our task never
        # ran, so it is a config error.
        if exc.code == 1 and not state.task_started:
            raise SystemExit(2) from None
        raise
    except Exception:
        if not state.task_started:  # HYDRA_FULL_ERROR=1 lets composition errors through
            traceback.print_exc()
            raise SystemExit(2) from None
        raise
    if state.returns is not None:  # kvconf's sweeper: every job's record, wherever it ran
        failed_jobs = [r for r in state.returns if r.get("exit_code")]
        if failed_jobs:
            print(f"kvconf: {len(failed_jobs)} of {len(state.returns)} jobs failed:", file=sys.stderr)
            for r in failed_jobs:
                print(f"  exit {r['exit_code']}: {r['overrides']}" + (f": {r['message']}" if r.get("message") else ""),
                      file=sys.stderr)
            raise SystemExit(max(int(r["exit_code"]) for r in failed_jobs))
        return
    if not state.jobs and state.swept_failures:  # another sweeper; a launcher ran the jobs in other processes
        print(f"kvconf: {len(state.swept_failures)} job(s) failed:", file=sys.stderr)
        for folder, code in state.swept_failures:
            print(f"  exit {code}: {folder}", file=sys.stderr)
        raise SystemExit(max(code for _, code in state.swept_failures))
    failed = [j for j in state.jobs if j[1]]
    if len(state.jobs) > 1 or (failed and len(state.jobs) != 1):
        if failed:
            print(f"kvconf: {len(failed)} of {len(state.jobs)} jobs failed:", file=sys.stderr)
            for label, code in failed:
                print(f"  exit {code}: {label}", file=sys.stderr)
            raise SystemExit(max(code for _, code in failed))

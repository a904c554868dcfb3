"""The stages, in order: validate, resolve, contract, plan, then for ``action=run`` construct,
allocate, register, self-test, shut down. Each stage's wall time goes into the report.

Construction comes before allocation, as in vLLM's worker (``create_connector`` runs before
``initialize_kv_cache``): a connector that swallows ``kv_cache_config`` is rejected before any
KV memory exists. Everything up to construction imports no torch and touches no device.

What an action does once the connector is up is a function ``(connector, kv_caches, ctx) ->
report``: ``run`` and ``serve`` are this layer's (:data:`ACTIONS`); a later layer passes its own
(the CLI passes ``bench``), so that this layer knows nothing of the layers after it.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

from kvconf.config.layout import KVCacheLayout
from kvconf.config.models import KVConfConfig, validate, validate_extra
from kvconf.contract import registry
from kvconf.contract import signature as contract
from kvconf.contract.api import KVConnectorRole
from kvconf.contract.capabilities import (
    ChecksConfig,
    ChecksEnvironment,
    ReportsListeners,
    SelfTestContext,
    SupportsServe,
    supports_hma,
)
from kvconf.errors import ConfigError, ConnectorRuntimeError, ContractError, KVConfError, Problem
from kvconf.units import parse_bytes

from .plan import make_plan, resolve_device

__all__ = ["ACTIONS", "Action", "Job", "load", "run_job"]

Action = Callable[[Any, Optional[dict[str, Any]], SelfTestContext], dict[str, Any]]
"""What an action does with a constructed connector, its KV caches (None on the scheduler side)
and the job's context; its report."""


def _self_test(connector: Any, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext) -> dict[str, Any]:
    from .engine import self_test  # the engine and allocation load only when a job runs

    return self_test(connector, kv_caches, ctx)


def _serve(connector: Any, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext) -> dict[str, Any]:
    return connector.serve(kv_caches, ctx)


ACTIONS: dict[str, Action] = {"run": _self_test, "serve": _serve}
"""The actions this layer does itself; ``check`` and ``export`` stop before construction."""
REPORT_KEYS = {"run": "self_test"}
"""The report key of an action's result, where it is not the action's name."""


class Job:
    """One job's state as it moves through the stages; ``report`` is what the CLI prints."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.timings: dict[str, float] = {}
        self.report: dict[str, Any] = {}
        self.cfg: KVConfConfig | None = None
        self.cls: Any = None
        self.resolved: registry.Resolved | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 6)


def load(job: Job, *, environment: bool = True) -> None:
    """Validate, resolve, check the extra settings and the contract, and (``environment``) that
    this machine has what the action needs; every problem in one error."""
    problems: list[Problem] = []
    with job.stage("validate"):
        try:
            job.cfg = validate(job.data)
        except ConfigError as exc:
            problems.extend(exc.problems)
    connector = job.data.get("connector") if isinstance(job.data, dict) else None
    name = connector.get("name") if isinstance(connector, dict) else None
    module_path = connector.get("module_path") if isinstance(connector, dict) else None
    if not isinstance(name, str) or not name or (module_path is not None and
                                                  (not isinstance(module_path, str) or not module_path.strip())):
        raise ConfigError(problems)  # validate has reported why there is no name to resolve
    assert isinstance(connector, dict)
    contract_error = False
    with job.stage("resolve"):
        try:
            job.resolved = registry.resolve(name, module_path)
        except KVConfError as exc:
            problems.extend(exc.problems)
            contract_error = isinstance(exc, ContractError)
    if job.resolved is not None:
        with job.stage("contract"):
            try:
                job.cls = contract.require(job.resolved.target, module=job.resolved.module,
                                           attribute=job.resolved.attribute)
            except ContractError as exc:
                problems.extend(exc.problems)
                contract_error = True
        extra_ok = True
        try:
            extra = validate_extra(getattr(job.cls, "extra_config", None), connector.get("extra"))
        except ConfigError as exc:
            extra_ok = False
            problems.extend(exc.problems)
        if job.cls is not None and extra_ok:
            from kvconf.config.vllm import vllm_extra_problems

            problems.extend(vllm_extra_problems(getattr(job.cls, "vllm_name", None), connector,
                                                getattr(job.cls, "vllm_extra_keys", {})))
            if issubclass(job.cls, ChecksConfig):
                problems.extend(job.cls.config_problems(connector, job.cfg.kv_cache_config if job.cfg else None))
        if job.cls is not None and extra_ok and job.cfg is not None:
            if job.cfg.action == "serve" and job.cfg.role != "worker":
                problems.append(Problem("role", "action=serve needs the worker side: it holds the KV cache it "
                                        "serves", value=job.cfg.role, allowed=["worker"], fix="set role=worker"))
            if job.cfg.action not in ("check", "export") and contract.connector_base(job.cls) == "vllm":
                problems.append(Problem(
                    "action", f"{name} is written for vLLM (it subclasses vLLM's KVConnectorBase_V1): kvconf checks "
                    "its contract and exports its config, but runs only connectors on kvconf's base",
                    value=job.cfg.action, allowed=["check", "export"],
                    fix="use action=check (or export), or kvconf lint --import-modules; to run it under kvconf, "
                        "subclass kvconf.KVConnectorBase"))
            if job.cfg.action == "serve" and not issubclass(job.cls, SupportsServe):
                problems.append(Problem("action", f"the {name} connector cannot serve: action=serve is for "
                                        "peer-to-peer connectors (mooncake)", value="serve",
                                        allowed=["check", "run", "export"], fix="use action=run"))
            if environment and job.cfg.action not in ("check", "export"):  # the actions that construct
                with job.stage("environment"):
                    role = KVConnectorRole.from_name(job.cfg.role)
                    if role is KVConnectorRole.WORKER and importlib.util.find_spec("torch") is None:
                        problems.append(Problem(
                            "role", "the worker side allocates the KV cache with torch, which is not installed",
                            value="worker", fix="pip install torch --index-url https://download.pytorch.org/whl/cpu "
                            "(CPU-only machines; or bash scripts/setup.sh), pip install torch on a GPU host; "
                            "action=check and role=scheduler work without it"))
                    if issubclass(job.cls, ChecksEnvironment):
                        problems.extend(job.cls.check_environment(extra, role))
    if problems:
        from kvconf.config.vllm import explain

        problems = [explain(p, getattr(job.cls, "vllm_name", None), getattr(job.cls, "vllm_extra_keys", {}))
                    for p in problems]
        only_contract = contract_error and all(p.path.startswith("connector.name") or
                                               p.path.startswith("connector.module_path") for p in problems)
        raise (ContractError if only_contract else ConfigError)(problems)


def run_job(data: dict[str, Any], actions: Optional[Mapping[str, Action]] = None) -> dict[str, Any]:
    """Runs the job that ``data`` (the composed config as plain data) describes; its report.
    ``actions`` adds (or replaces) what an action does, by name."""
    job = Job(data)
    load(job)
    cfg, cls, resolved = job.cfg, job.cls, job.resolved
    assert cfg is not None and cls is not None and resolved is not None
    hybrid = (cls.supports_hma_config(data["connector"]) if issubclass(cls, ChecksConfig)
              else supports_hma(cls))
    kv_cache_config = cfg.kv_cache_config_for(hybrid)  # vLLM disables its hybrid plan for other connectors
    if not hybrid and len(kv_cache_config.kv_cache_groups) > 1 and cfg.action not in ("check", "export"):
        raise ConfigError(Problem(
            "kv_cache", f"the {cfg.connector.name} connector moves one block table (it is not SupportsHMA), and "
            f"this layout has {len(kv_cache_config.kv_cache_groups)} KV-cache groups that vLLM cannot merge "
            "(specs other than full and sliding-window attention, or different page sizes)",
            value=[g.kv_cache_spec.type for g in kv_cache_config.kv_cache_groups],
            fix="use a connector that supports hybrid groups (connector=example), or a layout of one spec"))
    role = KVConnectorRole.from_name(cfg.role)
    worker = role is KVConnectorRole.WORKER
    with job.stage("plan"):
        device = resolve_device(cfg.device)
        layout = cfg.kv_cache if isinstance(cfg.kv_cache, KVCacheLayout) else None
        # action=check with device=auto checks a config, perhaps for another machine: free memory
        # here is reported, not enforced (an explicit device, or an allocating action, enforces it)
        plan = make_plan(kv_cache_config, device, allocates=worker, check_capacity=cfg.action != "export",
                         enforce_capacity=not (cfg.action == "check" and cfg.device == "auto"),
                         max_model_len=layout.max_model_len if layout else None,
                         max_num_batched_tokens=layout.max_num_batched_tokens if layout else 2048,
                         budget=parse_bytes(layout.memory) if layout and layout.memory is not None else None)
    report = job.report
    report.update({
        "action": cfg.action,
        "connector": {"name": cfg.connector.name, "class": cls.__qualname__, "module": cls.__module__,
                      "source": resolved.source, "engine_id": cfg.connector.engine_id},
        "role": cfg.role,
        "kv_role": cfg.connector.kv_role,
        "device": device,
        "contract": "ok",
        "plan": {k: v for k, v in plan.as_dict().items() if k not in ("device",)},
        "allocated_bytes": 0,
        "timings": job.timings,
    })
    report["user_modules"] = registry.user_modules()  # the user code this job imported (ran)
    if layout is not None and layout.pipeline_parallel_size > 1:
        report["plan"]["workers"] = [{**w, "layers": len(w["layers"]), "first_layer": w["layers"][0],
                                      "last_layer": w["layers"][-1]} for w in layout.workers(hybrid)]
    if cfg.action == "export" and cfg.export.target == "kvconf":
        from .export import to_plugin

        report["kv_transfer_config"] = to_plugin(cfg.connector, cls)
    elif cfg.action == "export":
        from .export import to_vllm

        report["kv_transfer_config"] = to_vllm(cfg.connector, cls)
        notes = list(getattr(cls, "vllm_differences", ()))
        if notes:
            report["export_notes"] = notes
    elif cfg.action != "check":
        act = {**ACTIONS, **(actions or {})}.get(cfg.action)
        if act is None:
            raise ConfigError(Problem("action", f"action={cfg.action} is not available here", value=cfg.action,
                                      allowed=sorted({"check", "export", *ACTIONS, *(actions or {})}),
                                      fix="run it through python -m kvconf"))
        _run(job, cfg, cls, resolved, kv_cache_config, role, device, act)
    return report


def _run(job: Job, cfg: KVConfConfig, cls: Any, resolved: registry.Resolved, kv_cache_config: Any,
         role: KVConnectorRole, device: str, act: Action) -> None:
    report = job.report
    with job.stage("construct"):
        try:
            connector = cls(cfg.connector, role, kv_cache_config)
        except KVConfError:
            raise
        except TypeError as exc:
            raise ContractError(Problem(
                "connector.name", f"constructing {resolved.attribute} (module {resolved.module}) raised "
                f"TypeError: {exc}", value=resolved.attribute,
                fix="call super().__init__(config, role, kv_cache_config) and accept exactly those three")) from exc
        except Exception as exc:
            raise ConnectorRuntimeError(Problem(
                "connector", f"constructing {resolved.attribute} raised {type(exc).__name__}: {exc}",
                value=resolved.attribute)) from exc
        contract.check_received(connector, kv_cache_config, module=resolved.module, attribute=resolved.attribute)
    buffers: list[Any] = []
    try:
        kv_caches = None
        if role is KVConnectorRole.WORKER:
            with job.stage("import_torch"):
                import torch  # noqa: F401  (timed on its own: it dominates a small run)
            from .allocate import allocate, layer_views

            with job.stage("allocate"):
                try:
                    buffers = allocate(kv_cache_config, device)
                except (RuntimeError, AssertionError) as exc:
                    cpu_torch = "not compiled with CUDA" in str(exc)
                    raise ConnectorRuntimeError(Problem(
                        "device", f"allocating {kv_cache_config.total_bytes} B on {device} failed: {exc}",
                        value=device, fix="this torch is a CPU build: use device=cpu (or auto), or install a CUDA "
                        "build of torch" if cpu_torch else "choose another device, or a smaller kv_cache")) from exc
                kv_caches = layer_views(kv_cache_config, buffers)
            report["allocated_bytes"] = sum(b.numel() * b.element_size() for b in buffers)
            with job.stage("register"):
                connector.register_kv_caches(kv_caches)
        ctx = SelfTestContext(settings=cfg.self_test, data=job.data, device=device, output=cfg.output,
                              bench=cfg.bench)
        key = REPORT_KEYS.get(cfg.action, cfg.action)
        with job.stage(key):
            try:
                report[key] = act(connector, kv_caches, ctx)
                if isinstance(connector, ReportsListeners):
                    report["listeners"] = connector.listeners()
            except KVConfError:
                raise
            except Exception as exc:
                raise ConnectorRuntimeError(Problem(
                    "self_test", f"{resolved.attribute} raised {type(exc).__name__}: {exc}",
                    value=resolved.attribute)) from exc
    finally:
        with job.stage("shutdown"):
            connector.shutdown()
            buffers.clear()

"""The stages, in order: validate, resolve, contract, plan, then for ``action=run`` construct,
allocate, register, self-test, shut down. Each stage's wall time goes into the report.

Construction comes before allocation, as in vLLM's worker (``create_connector`` runs before
``initialize_kv_cache``): a connector that swallows ``kv_cache_config`` is rejected before any
KV memory exists. Everything up to construction imports no torch and touches no device.
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import contextmanager
from typing import Any, Iterator

from pydantic import ValidationError

from . import contract, factory
from .connector import KVConnectorRole, SelfTestContext
from .errors import ConfigError, ConnectorRuntimeError, ContractError, KVConfError, Problem
from .plan import make_plan, resolve_device
from .schema import KVConfConfig, problems_from_validation_error, validate

__all__ = ["Job", "load", "run_job"]


class Job:
    """One job's state as it moves through the stages; ``report`` is what the CLI prints."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.timings: dict[str, float] = {}
        self.report: dict[str, Any] = {}
        self.cfg: KVConfConfig | None = None
        self.cls: Any = None
        self.resolved: factory.Resolved | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 6)


def load(job: Job) -> None:
    """Validate, resolve, check the extra settings and the contract; every problem in one error."""
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
    contract_error = False
    with job.stage("resolve"):
        try:
            job.resolved = factory.resolve(name, module_path)
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
        model = getattr(job.cls, "extra_config", None)
        extra = connector.get("extra") or {}
        extra_ok = True
        if model is not None:
            try:
                extra = model.model_validate(extra)
            except ValidationError as exc:
                extra_ok = False
                problems.extend(problems_from_validation_error(exc, model, extra, prefix="connector.extra"))
        if job.cls is not None and extra_ok and job.cfg is not None:
            if job.cfg.action == "serve" and job.cfg.role != "worker":
                problems.append(Problem("role", "action=serve needs the worker side: it holds the KV cache it "
                                        "serves", value=job.cfg.role, allowed=["worker"], fix="set role=worker"))
            if job.cfg.action == "serve" and not getattr(job.cls, "can_serve", False):
                problems.append(Problem("action", f"the {name} connector cannot serve: action=serve is for "
                                        "peer-to-peer connectors (mooncake)", value="serve",
                                        allowed=["check", "run", "export"], fix="use action=run"))
            if job.cfg.action in ("run", "serve", "bench"):
                with job.stage("environment"):
                    role = KVConnectorRole.from_name(job.cfg.role)
                    if role is KVConnectorRole.WORKER and importlib.util.find_spec("torch") is None:
                        problems.append(Problem(
                            "role", "the worker side allocates the KV cache with torch, which is not installed",
                            value="worker", fix="pip install torch --index-url https://download.pytorch.org/whl/cpu "
                            "(CPU-only machines; or bash scripts/setup.sh), pip install torch on a GPU host; "
                            "action=check and role=scheduler work without it"))
                    problems.extend(job.cls.check_environment(extra, role))
    if problems:
        only_contract = contract_error and all(p.path.startswith("connector.name") or
                                               p.path.startswith("connector.module_path") for p in problems)
        raise (ContractError if only_contract else ConfigError)(problems)


def run_job(data: dict[str, Any]) -> dict[str, Any]:
    """Runs the job that ``data`` (the composed config as plain data) describes; its report."""
    job = Job(data)
    load(job)
    cfg, cls, resolved = job.cfg, job.cls, job.resolved
    assert cfg is not None and cls is not None and resolved is not None
    kv_cache_config = cfg.kv_cache_config
    role = KVConnectorRole.from_name(cfg.role)
    worker = role is KVConnectorRole.WORKER
    with job.stage("plan"):
        device = resolve_device(cfg.device)
        plan = make_plan(kv_cache_config, device, allocates=worker, check_capacity=cfg.action != "export")
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
    if cfg.action == "export":
        from .export import to_vllm

        report["kv_transfer_config"] = to_vllm(cfg.connector, cls)
    elif cfg.action in ("run", "serve", "bench"):
        _run(job, cfg, cls, resolved, kv_cache_config, role, device)
    return report


def _run(job: Job, cfg: KVConfConfig, cls: Any, resolved: factory.Resolved, kv_cache_config: Any,
         role: KVConnectorRole, device: str) -> None:
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
        with job.stage(cfg.action if cfg.action in ("serve", "bench") else "self_test"):
            try:
                if cfg.action == "serve":
                    report["serve"] = connector.serve(kv_caches, ctx)
                elif cfg.action == "bench":
                    from .bench import run_bench

                    report["bench"] = run_bench(connector, kv_caches, ctx)
                else:
                    report["self_test"] = connector.self_test(kv_caches, ctx)
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

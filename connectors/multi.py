"""The multi connector (vLLM's ``MultiConnector``): several connectors behind one, e.g. nixl for
prefill-to-decode transfer plus offloading for a host tier.

Each child is a connector config as the ``connector`` group has it (``name``, ``kv_role``,
``extra``, ...), given under ``connector.extra.connectors``; each is constructed with the same three
arguments (its own config, the role, the same ``kv_cache_config``) and keeps the parent's
``engine_id`` (a child may not set one: vLLM builds each child with the parent's). As in vLLM:

- saves go to every child;
- a load comes from the child that holds the most of the request's blocks (the first, in order,
  among equals; vLLM's takes the first child with any);
- failures are reported per child (a block's reason names the child);
- hybrid KV-cache groups are supported only when every child supports them.

``action=run`` runs each child's own self-test (a peer-to-peer child moves bytes to a peer process,
a tier saves and loads them back) and, when every child can be driven by kvconf's engine, the
engine through the multi connector itself; every byte is verified.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from pydantic import Field, ValidationError

from kvconf.config.base import StrictModel
from kvconf.config.diagnostics import problems_from_validation_error
from kvconf.config.models import ConnectorConfig, validate_extra
from kvconf.contract import registry
from kvconf.contract import signature as contract
from kvconf.contract.api import KVCacheBlocks, KVConnectorMetadata, Request, SchedulerOutput
from kvconf.contract.base import KVConnectorBase
from kvconf.contract.capabilities import (
    ChecksConfig,
    ExplainsFailures,
    ExportsToVLLM,
    ReportsListeners,
    SelfTestContext,
    SupportsHMA,
    SupportsSelfTest,
    supports_hma,
)
from kvconf.errors import ConfigError, ConnectorRuntimeError, KVConfError, Problem

__all__ = ["MultiConnector", "MultiExtra", "MultiMetadata", "children"]


class MultiExtra(StrictModel):
    """Settings of the multi connector."""

    connectors: list[dict[str, Any]] = Field(min_length=1)
    """The child connectors, in order (loads come from the first that has the blocks): each a
    connector config as the ``connector`` group has it, with its own ``kv_role`` and no ``engine_id``."""


@dataclass(frozen=True)
class MultiMetadata(KVConnectorMetadata):
    """One step's metadata: each child's own, in order."""

    children: tuple[KVConnectorMetadata, ...]


def _moved(p: Problem, prefix: str) -> Problem:
    path = p.path
    for old in ("connector.module_path", "connector.name", "connector.extra", "connector"):
        if path == old or path.startswith(old + "."):
            path = prefix + path[len("connector"):]
            break
    return dataclasses.replace(p, path=path)


def children(connector: dict[str, Any],
             kv_cache_config: Any = None) -> tuple[list[tuple[ConnectorConfig, type]], list[Problem]]:
    """Each child's validated config and class, and every problem (paths under
    ``connector.extra.connectors.N``); nothing is constructed. The children are resolved once per
    connector node (a job checks, plans and constructs with the same one); each child's own
    ``config_problems`` are asked again, since they depend on ``kv_cache_config``."""
    key = json.dumps(connector.get("extra"), sort_keys=True, default=repr)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(connector)
        while len(_RESOLVED) > 16:
            _RESOLVED.pop(next(iter(_RESOLVED)))
    found, problems = resolved
    problems = list(problems)
    for _, cls, node, prefix in found:
        if issubclass(cls, ChecksConfig):
            problems.extend(_moved(p, prefix) for p in cls.config_problems(node, kv_cache_config))
    return [(cfg, cls) for cfg, cls, _, _ in found], problems


_RESOLVED: dict[str, tuple[list[tuple[ConnectorConfig, type, dict[str, Any], str]], list[Problem]]] = {}
""":func:`children`' resolutions, by the connector's ``extra`` (a few at most: one a job)."""


def _resolve(connector: dict[str, Any]) -> tuple[list[tuple[ConnectorConfig, type, dict[str, Any], str]], list[Problem]]:
    extra = connector.get("extra") or {}
    nodes = extra.get("connectors") if isinstance(extra, dict) else None
    out: list[tuple[ConnectorConfig, type, dict[str, Any], str]] = []
    problems: list[Problem] = []
    if not isinstance(nodes, list):
        return out, problems  # MultiExtra's validation says what is wrong
    seen: dict[tuple[Any, Any], int] = {}
    for i, node in enumerate(nodes):
        prefix = f"connector.extra.connectors.{i}"
        if not isinstance(node, dict):
            problems.append(Problem(prefix, "a child connector must be a mapping (name, kv_role, extra)", value=node,
                                    fix=f"set {prefix} to e.g. {{name: offloading, kv_role: kv_both}}"))
            continue
        if node.get("engine_id") is not None:
            problems.append(Problem(f"{prefix}.engine_id", "a child connector may not set engine_id: every child "
                                    "runs under the multi connector's (vLLM would fail with a duplicate keyword)",
                                    value=node["engine_id"], fix=f"remove {prefix}.engine_id; set connector.engine_id"))
            node = {k: v for k, v in node.items() if k != "engine_id"}
        key = (node.get("name"), node.get("module_path"))
        if key in seen:
            problems.append(Problem(f"{prefix}.name", f"the same connector as connectors.{seen[key]}: a duplicate "
                                    "child saves every block twice", value=node.get("name"),
                                    fix=f"remove {prefix} or merge its settings into connectors.{seen[key]}"))
            continue
        seen[key] = i
        try:
            cfg = ConnectorConfig.model_validate(node)
        except ValidationError as exc:
            problems.extend(problems_from_validation_error(exc, ConnectorConfig, node, prefix=prefix))
            continue
        try:
            resolved = registry.resolve(cfg.name, cfg.module_path)
            cls = contract.require(resolved.target, module=resolved.module, attribute=resolved.attribute)
            validate_extra(getattr(cls, "extra_config", None), cfg.extra)
        except KVConfError as exc:
            problems.extend(_moved(p, prefix) for p in exc.problems)
            continue
        out.append((cfg, cls, node, prefix))
    return out, problems


class MultiConnector(KVConnectorBase, ChecksConfig, ExportsToVLLM, ExplainsFailures, SupportsHMA,
                     SupportsSelfTest, ReportsListeners):
    """Several connectors behind one; see the module's docstring."""

    extra_config = MultiExtra
    vllm_name: ClassVar[str] = "MultiConnector"

    def __init__(self, config, role, kv_cache_config) -> None:
        super().__init__(config, role, kv_cache_config)
        found, problems = children(config.model_dump())
        if problems:
            raise ConfigError(problems)
        self.children: list[KVConnectorBase] = []
        self.names: list[str] = []
        try:
            for cfg, cls in found:
                child = cls(cfg.model_copy(update={"engine_id": config.engine_id}), role, kv_cache_config)
                self.children.append(child)
                self.names.append(cfg.name)
        except Exception:
            self.shutdown()
            raise
        self._loader: dict[str, int] = {}

    # ---- config ------------------------------------------------------------------------------
    @classmethod
    def config_problems(cls, connector: dict[str, Any], kv_cache_config: Any = None) -> list[Problem]:
        return children(connector, kv_cache_config)[1]

    @classmethod
    def child_classes(cls, connector: dict[str, Any]) -> list[tuple[str, type]]:
        """Each child's name and class (resolved, not constructed)."""
        found, _ = children(connector)
        return [(cfg.name, c) for cfg, c in found]

    @classmethod
    def supports_hma_config(cls, connector: dict[str, Any]) -> bool:
        found, _ = children(connector)
        return bool(found) and all(
            c.supports_hma_config(cfg.model_dump()) if issubclass(c, ChecksConfig) else supports_hma(c)
            for cfg, c in found)

    @classmethod
    def vllm_extra_config(cls, extra: Any) -> dict[str, Any]:
        from kvconf.runtime.export import to_vllm

        found, problems = children({"extra": extra.model_dump()})
        if problems:
            raise ConfigError(problems)
        return {"connectors": [to_vllm(cfg, c) for cfg, c in found]}

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        for c in self.children:
            c.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, MultiMetadata)
        for c, m in zip(self.children, connector_metadata.children):
            c.bind_connector_metadata(m)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        for c in self.children:
            c.clear_connector_metadata()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        for c in self.children:
            c.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        for c in self.children:
            c.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        for c in self.children:
            c.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        for c in self.children:
            c.wait_for_save()

    def transfer_totals(self) -> dict[str, float]:
        """Every child's transfer totals, summed (for benchmarks)."""
        out: dict[str, float] = {}
        for c in self.children:
            hook = getattr(c, "transfer_totals", None)
            for k, v in (hook() if callable(hook) else {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        sending: set[str] = set()
        recving: set[str] = set()
        for c in self.children:
            s, r = c.get_finished(finished_req_ids)
            sending |= s or set()
            recving |= r or set()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out: set[int] = set()
        for c in self.children:
            out |= c.get_block_ids_with_load_errors()
        return out

    def get_load_error_reasons(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for name, c in zip(self.names, self.children):
            if isinstance(c, ExplainsFailures):
                out.update({b: f"{name}: {why}" for b, why in c.get_load_error_reasons().items()})
        return out

    def get_save_errors(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, c in zip(self.names, self.children):
            if isinstance(c, ExplainsFailures):
                for req, why in c.get_save_errors().items():
                    out[req] = f"{out[req]}; " if req in out else ""
                    out[req] += f"{name}: {why}"
        return out

    def listeners(self) -> list[dict[str, Any]]:
        """Its children's, each once (children share the process, so each sees every listener)."""
        seen: dict[str, dict[str, Any]] = {}
        for c in self.children:
            if isinstance(c, ReportsListeners):
                for x in c.listeners():
                    seen.setdefault(x["address"], x)
        return [seen[k] for k in sorted(seen)]

    def shutdown(self) -> None:
        errors = []
        for name, c in zip(self.names, self.children):
            try:
                c.shutdown()
            except Exception as exc:  # every child is shut down; the failures are reported together
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        if errors:
            raise RuntimeError("shutting the children down failed: " + "; ".join(errors))

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        """The longest hit of any child (the first in order among equals); every child is asked,
        as vLLM's MultiConnector asks them, so that each knows what it holds itself (a tier then
        saves only what it lacks). vLLM's takes the first child with any hit: a host tier holding a
        shared prefix would then shadow a disk tier holding the whole prompt."""
        found: tuple[Optional[int], bool] = (0, False)
        loader = None
        for i, c in enumerate(self.children):
            n, is_async = c.get_num_new_matched_tokens(request, num_computed_tokens)
            if n is None:
                self._loader.pop(request.request_id, None)
                return None, False  # that child asks to be asked again: so does the whole
            if n > (found[0] or 0):
                loader, found = i, (n, is_async)
        if loader is None:
            self._loader.pop(request.request_id, None)
        else:
            self._loader[request.request_id] = loader
        return found

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        chosen = self._loader.get(request.request_id)
        for i, c in enumerate(self.children):
            # every child sees the blocks (it may save into them); only the loader loads
            c.update_state_after_alloc(request, blocks, num_external_tokens if i == chosen else 0)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return MultiMetadata(tuple(c.build_connector_meta(scheduler_output) for c in self.children))

    def update_connector_output(self, finished_sending: set[str], finished_recving: set[str]) -> None:
        for c in self.children:
            c.update_connector_output(finished_sending, finished_recving)

    def report_save_failed(self, request_id: str) -> None:
        for c in self.children:
            if isinstance(c, ExplainsFailures):
                c.report_save_failed(request_id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        return self._finished([c.request_finished(request, block_ids) for c in self.children], request)

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, Optional[dict[str, Any]]]:
        results = [c.request_finished_all_groups(request, block_ids) if isinstance(c, SupportsHMA)
                   else c.request_finished(request, block_ids[0]) for c in self.children]
        return self._finished(results, request)

    def _finished(self, results: list[tuple[bool, Optional[dict[str, Any]]]],
                  request: Request) -> tuple[bool, Optional[dict[str, Any]]]:
        self._loader.pop(request.request_id, None)
        params: dict[str, Any] = {}
        for _, p in results:
            for k, v in (p or {}).items():
                params.setdefault(k, v)
        return any(delay for delay, _ in results), params or None

    # ---- action=run ----------------------------------------------------------------------------
    def self_test(self, kv_caches: Optional[dict[str, Any]], ctx: SelfTestContext) -> dict[str, Any]:
        from kvconf.runtime.engine import drive, self_test

        nodes = self.extra.connectors
        report: dict[str, Any] = {"children": []}
        total = 0
        for i, (name, c) in enumerate(zip(self.names, self.children)):
            node = {**nodes[i], "engine_id": None}
            child_ctx = dataclasses.replace(ctx, data={**ctx.data, "connector": node})
            try:
                result = self_test(c, kv_caches, child_ctx)
            except KVConfError as exc:
                raise type(exc)([dataclasses.replace(p, message=f"child {i} ({name}): {p.message}")
                                 for p in exc.problems]) from exc
            report["children"].append({"index": i, "name": name, **result})
            total += int(result.get("bytes") or 0)
        if not any(isinstance(c, SupportsSelfTest) for c in self.children):
            report["multi"] = drive(self, kv_caches, ctx)
            total += int(report["multi"].get("bytes") or 0)
        parts = report["children"] + ([report["multi"]] if "multi" in report else [])
        seconds = sum(float(r.get("seconds") or 0) for r in parts)
        report["bytes"] = total
        report["seconds"] = round(seconds, 6)
        report["gbps"] = round(total / seconds / 1e9, 3) if seconds > 0 else None
        report["requests"] = max(int(r.get("requests") or 0) for r in parts)
        if all(r.get("scheduler_only") for r in parts):
            report["scheduler_only"] = True
        report["verified"] = all(r.get("verified") for r in report["children"]) and (
            report.get("multi", {}).get("verified", True))
        if not report["verified"]:
            raise ConnectorRuntimeError(Problem("self_test", "a child's self-test did not verify its bytes",
                                        details=tuple(str(r) for r in report["children"])))
        return report

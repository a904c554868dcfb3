"""kvconf's conformance tests for a connector class, run by ``pytest --kvconf-connector MODULE:CLASS``.

Each test reads as the rule it checks; a failure says what the connector did and what to change.
"""

from __future__ import annotations

import gc
import importlib
import threading
import time
from typing import Any

import pytest

from kvconf.conf import compose_data
from kvconf.config.models import validate, validate_extra
from kvconf.contract import signature as contract
from kvconf.contract.api import KVCacheBlocks, KVConnectorRole, Request, SchedulerOutput
from kvconf.contract.capabilities import SelfTestContext, SupportsHMA
from kvconf.contract.registry import builtin_name_of
from kvconf.runtime.allocate import allocate, layer_views
from kvconf.runtime.engine import self_test


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _compose(cls: type, overrides: list[str]) -> dict[str, Any]:
    """The composed config the connector is built with: its built-in YAML when it is a built-in
    connector, else the default config pointed at the class by module path, with ``extra``
    holding only what the overrides set (the class's model fills in its defaults). The overrides
    go through the same checks and rewrites as ``python -m kvconf``'s: a misspelt key is kvconf's
    message, a ``connector.extra.KEY`` the file lacks is added."""
    from kvconf.conf import CONF_DIR
    from kvconf.config.overrides import as_composable, check_overrides, external_connector

    builtin = builtin_name_of(cls)
    base = [f"connector={builtin}"] if builtin else [
        f"connector.module_path={cls.__module__}", f"connector.name={cls.__qualname__}"]
    argv = external_connector([*base, "device=cpu", "role=worker", *overrides])
    check_overrides(argv, CONF_DIR, extra_model=lambda name: getattr(cls, "extra_config", None))
    return compose_data(as_composable(argv, CONF_DIR))


class Built:
    """A validated config, the class, and helpers to build it as an engine does."""

    def __init__(self, target: str, overrides: list[str]) -> None:
        self.cls = _load(target)
        verdict = contract.check(self.cls, target)
        if not verdict.ok:
            pytest.fail(f"{target}: {verdict.verdict}: {verdict.message}; fix: {verdict.fix}", pytrace=False)
        self.data = _compose(self.cls, overrides)
        self.cfg = validate(self.data)
        self.extra = validate_extra(getattr(self.cls, "extra_config", None), self.cfg.connector.extra)
        self.kv = self.cfg.kv_cache_config_for(hybrid=issubclass(self.cls, SupportsHMA))  # as the pipeline plans

    def make(self, role: KVConnectorRole) -> Any:
        conn = self.cls(self.cfg.connector, role, self.kv)
        contract.check_received(conn, self.kv, module=self.cls.__module__, attribute=self.cls.__qualname__)
        return conn

    def caches(self) -> tuple[list[Any], dict[str, Any]]:
        buffers = allocate(self.kv, "cpu")
        return buffers, layer_views(self.kv, buffers)


def settings_of(target: str, overrides: list[str]) -> str:
    """The connector settings ``target`` is tested with, as one line (``KEY=VALUE, ...``); a
    :class:`~kvconf.errors.ConfigError` where the overrides or the settings are wrong, before any
    test runs."""
    built = Built(target, overrides)
    extra = built.extra.model_dump(mode="json") if hasattr(built.extra, "model_dump") else dict(built.extra)
    return ", ".join(f"{k}={v}" for k, v in extra.items()) or "(none)"


def _tensors_held(obj: Any, depth: int = 4) -> list[str]:
    """Attribute paths of tensors reachable from ``obj``'s attributes."""
    import torch

    found, seen = [], set()

    def walk(x: Any, path: str, d: int) -> None:
        if id(x) in seen or d < 0:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(path)
        elif isinstance(x, dict):
            for k, v in list(x.items())[:10000]:
                walk(v, f"{path}[{k!r}]", d - 1)
        elif isinstance(x, (list, tuple, set)):
            for i, v in enumerate(list(x)[:10000]):
                walk(v, f"{path}[{i}]", d - 1)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for k, v in vars(x).items():
                walk(v, f"{path}.{k}", d - 1)

    walk(obj, "connector", depth)
    return found


@pytest.fixture
def built(kvconf_target: str, request) -> Built:
    return Built(kvconf_target, request.config.getoption("--kvconf-override"))


def test_constructor_takes_config_role_and_kv_cache_config(kvconf_target: str) -> None:
    cls = _load(kvconf_target)
    v = contract.check(cls, kvconf_target)
    assert v.ok, f"{v.verdict}: {v.message}; signature {v.signature}; fix: {v.fix}"


def test_scheduler_side_allocates_nothing(built: Built) -> None:
    conn = built.make(KVConnectorRole.SCHEDULER)
    try:
        bs = built.kv.kv_cache_groups[0].kv_cache_spec.block_size
        req = Request("conformance-0", list(range(4 * bs + 1)))
        matched, _ = conn.get_num_new_matched_tokens(req, 0)
        assert matched is None or (isinstance(matched, int) and matched >= 0), f"matched tokens {matched!r}"
        ids = [0, 1, 2, 3]
        conn.update_state_after_alloc(req, KVCacheBlocks(tuple(list(ids) for _ in built.kv.kv_cache_groups)),
                                      matched or 0)
        conn.build_connector_meta(SchedulerOutput([req.request_id]))
        conn.request_finished(req, ids)
        held = _tensors_held(conn)
        assert not held, f"the scheduler side holds tensors: {', '.join(held[:5])}"
    finally:
        conn.shutdown()


def test_worker_side_accepts_registered_caches(built: Built) -> None:
    conn = built.make(KVConnectorRole.WORKER)
    try:
        _, caches = built.caches()
        conn.register_kv_caches(caches)
    finally:
        conn.shutdown()


def test_save_then_load_returns_the_same_bytes(built: Built) -> None:
    conn = built.make(KVConnectorRole.WORKER)
    try:
        _, caches = built.caches()
        conn.register_kv_caches(caches)
        ctx = SelfTestContext(settings=built.cfg.self_test, data=built.data, device="cpu", output="json")
        result = self_test(conn, caches, ctx)
        assert result.get("verified") is True, f"the self-test did not verify: {result}"
        assert result.get("bytes", 0) > 0, f"the self-test moved no bytes: {result}"
    finally:
        conn.shutdown()


def test_shutdown_releases_everything(built: Built) -> None:
    import torch

    before = set(threading.enumerate())
    conn = built.make(KVConnectorRole.WORKER)
    buffers, caches = built.caches()
    storages = {b.untyped_storage().data_ptr() for b in buffers}
    conn.register_kv_caches(caches)
    ctx = SelfTestContext(settings=built.cfg.self_test, data=built.data, device="cpu", output="json")
    self_test(conn, caches, ctx)
    conn.shutdown()
    del buffers, caches
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (set(threading.enumerate()) - before):
        time.sleep(0.05)
    left = sorted(t.name for t in set(threading.enumerate()) - before if t.is_alive())
    assert not left, f"threads still running after shutdown(): {', '.join(left)}"
    held = _tensors_held(conn)
    assert not held, f"after shutdown() the connector still holds tensors: {', '.join(held[:5])}"
    # type(), not isinstance(): isinstance reads __class__, and some of the objects gc holds are
    # torch's deprecated aliases, which warn when touched (a FutureWarning on every run)
    alive = [o for o in gc.get_objects()
             if issubclass(type(o), torch.Tensor) and o.untyped_storage().data_ptr() in storages]
    assert not alive, (f"after shutdown() the connector still holds the KV cache: {len(alive)} tensor(s) viewing it "
                       "are alive (kept by a module-level object?)")

"""The connector misconfigurations vLLM users hit, as data: one :class:`Entry` per misconfiguration,
with its detector, what is wrong, the fix, the source that documents it, a ``--kv-transfer-config``
that shows it and (where it applies) the overrides that show it in ``python -m kvconf``.

``kvconf lint`` runs every detector on each JSON (and on each MultiConnector child). The tables
the detectors read (vLLM's fields, names and extra keys) are in :mod:`kvconf.config.vllm`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

from kvconf.config import vllm as V
from kvconf.errors import did_you_mean

from .plugin_tree import is_plugin, plugin_findings

__all__ = ["CATALOGUE", "NOTICES", "Entry", "Hit", "Target", "render_path"]

Path = tuple[Any, ...]
EXTRA = "kv_connector_extra_config"


def render_path(path: Path) -> str:
    """``("kv_connector_extra_config", "connectors", 1, "kv_role")`` ->
    ``kv_connector_extra_config.connectors[1].kv_role``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<config>"


@dataclass(frozen=True)
class Target:
    """One KVTransferConfig: the document's root, or a MultiConnector child."""

    data: dict[str, Any]
    path: Path
    child: bool = False
    import_modules: bool = False

    def at(self, *keys: Any) -> Path:
        return self.path + keys

    @property
    def connector(self) -> Optional[str]:
        name = self.data.get("kv_connector")
        return name if isinstance(name, str) else None

    @property
    def external(self) -> bool:
        return isinstance(self.data.get("kv_connector_module_path"), str) and bool(self.data["kv_connector_module_path"])

    @property
    def extra(self) -> dict[str, Any]:
        e = self.data.get(EXTRA)
        return e if isinstance(e, dict) else {}


@dataclass(frozen=True)
class Hit:
    """Where a detector found its misconfiguration."""

    path: Path
    value: Any = None
    detail: Optional[str] = None
    """What exactly is wrong here, added to the entry's message."""
    fix: Optional[str] = None
    """A fix for this case, instead of the entry's."""
    severity: Optional[str] = None


@dataclass(frozen=True)
class Entry:
    """One misconfiguration."""

    id: str
    message: str
    fix: str
    source: str
    example: str
    """A ``--kv-transfer-config`` value that shows it."""
    detect: Callable[[Target], Iterable[Hit]]
    hydra: Optional[tuple[str, ...]] = None
    """Overrides that show it in ``python -m kvconf`` (exit 2), where it applies there."""
    severity: str = "error"
    """``error`` (exit 1) or ``warning`` (reported; the config is taken as it is)."""


# ---- detectors ---------------------------------------------------------------------------------------


def _removed_field(t: Target) -> Iterable[Hit]:
    for key, gone in V.REMOVED_FIELDS.items():
        if key in t.data:
            yield Hit(t.at(key), t.data[key], f"{key!r}: {gone.advice}", f"remove {key!r}")


def _role_as_key(t: Target) -> Iterable[Hit]:
    for key in V.KV_ROLES:
        if key in t.data:
            yield Hit(t.at(key), t.data[key], f"{key!r} is a kv_role value, written as a key",
                      f'write "kv_role": "{key}" (the data direction), and remove "{key}"')


def _unknown_key(t: Target) -> Iterable[Hit]:
    for key in t.data:
        if key in V.TRANSFER_FIELDS or key in V.REMOVED_FIELDS or key in V.KV_ROLES:
            continue
        right = V.MISSPELLINGS.get(key) or V.vllm_spelling(key) or did_you_mean(key, V.TRANSFER_FIELDS)
        why = (f"{key!r} is kvconf's spelling; vLLM calls it {right!r}" if V.vllm_spelling(key)
               else f"{key!r} is not a KVTransferConfig field")
        yield Hit(t.at(key), t.data[key], why, f"write {right!r}" if right else
                  "remove it; the fields are: " + ", ".join(V.TRANSFER_FIELDS))


def _renamed(t: Target) -> Iterable[Hit]:
    gone = V.RENAMED_CONNECTORS.get(t.connector or "")
    if gone is not None and not t.external:
        yield Hit(t.at("kv_connector"), t.connector, f"{t.connector}: {gone.advice}",
                  f'write "kv_connector": "{gone.replacement}"')


def _removed(t: Target) -> Iterable[Hit]:
    gone = V.REMOVED_CONNECTORS.get(t.connector or "")
    if gone is not None and not t.external:
        yield Hit(t.at("kv_connector"), t.connector, f"{t.connector}: {gone.advice}",
                  "use one of " + ", ".join(V.TRANSFER_CONNECTORS) + " (e.g. \"kv_connector\": \"NixlConnector\")")


def _unknown_connector(t: Target) -> Iterable[Hit]:
    name = t.connector
    if name is None or t.external or name in V.VLLM_CONNECTORS:
        return
    if name in V.RENAMED_CONNECTORS or name in V.REMOVED_CONNECTORS:
        return
    from kvconf.contract.registry import vllm_names

    ours = vllm_names().get(name)  # kvconf's name written where vLLM's belongs
    hint = ours or did_you_mean(name, V.VLLM_CONNECTORS)
    yield Hit(t.at("kv_connector"), name, f"{name!r} is not a connector vLLM registers"
              + (f" ({name!r} is kvconf's name)" if ours else ""),
              (f'write "kv_connector": "{hint}"' if hint else "use one of " + ", ".join(V.VLLM_CONNECTORS))
              + ", or give your class's module in kv_connector_module_path")


_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "kv_connector": (str, "a string"),
    "engine_id": (str, "a string"),
    "kv_connector_module_path": (str, "a string"),
    "enable_permute_local_kv": (bool, "true or false"),
    EXTRA: (dict, "a JSON object"),
}


def _wrong_type(t: Target) -> Iterable[Hit]:
    for key, (typ, what) in _TYPES.items():
        v = t.data.get(key)
        if v is not None and not isinstance(v, typ):
            yield Hit(t.at(key), v, f"{key} must be {what}", f"write {key} as {what}")


def _missing_role(t: Target) -> Iterable[Hit]:
    if t.connector is not None and t.data.get("kv_role") is None:
        yield Hit(t.at("kv_connector") if "kv_role" not in t.data else t.at("kv_role"), t.connector,
                  ("a MultiConnector child needs its own kv_role: vLLM builds each child as a full "
                   "KVTransferConfig" if t.child else f"{t.connector} is set but kv_role is not"),
                  'add "kv_role": "kv_producer" (prefill), "kv_consumer" (decode) or "kv_both"')


def _bad_role(t: Target) -> Iterable[Hit]:
    role = t.data.get("kv_role")
    if role is not None and role not in V.KV_ROLES:
        hint = did_you_mean(role, V.KV_ROLES) if isinstance(role, str) else None
        hint = hint or {"producer": "kv_producer", "prefill": "kv_producer", "consumer": "kv_consumer",
                        "decode": "kv_consumer", "both": "kv_both"}.get(str(role).lower())
        yield Hit(t.at("kv_role"), role, "allowed: " + ", ".join(V.KV_ROLES),
                  f'write "kv_role": "{hint}"' if hint else "use one of " + ", ".join(V.KV_ROLES))


def _no_connector(t: Target) -> Iterable[Hit]:
    if t.data.get("kv_connector") is not None or t.child:
        return
    given = [k for k in ("kv_role", EXTRA, "kv_connector_module_path") if t.data.get(k) not in (None, {}, "")]
    if given:
        yield Hit(t.at(given[0]), t.data[given[0]], "settings without kv_connector: vLLM starts with KV transfer "
                  "off and says nothing", 'add "kv_connector": "<the connector>" (and "kv_role"), or drop the settings')


def _empty_module_path(t: Target) -> Iterable[Hit]:
    if t.data.get("kv_connector_module_path") == "":
        yield Hit(t.at("kv_connector_module_path"), "", None)


def _policy(t: Target) -> Iterable[Hit]:
    v = t.data.get("kv_load_failure_policy", "fail")
    if v not in V.LOAD_FAILURE_POLICIES:
        hint = did_you_mean(v, V.LOAD_FAILURE_POLICIES) if isinstance(v, str) else None
        yield Hit(t.at("kv_load_failure_policy"), v, "allowed: fail, recompute",
                  f'write "kv_load_failure_policy": "{hint}"' if hint else None)


def _port(t: Target) -> Iterable[Hit]:
    if "kv_port" not in t.data:
        return
    v = t.data["kv_port"]
    n: Optional[int] = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and v.strip().isdigit():
        n = int(v)  # vLLM's lax validation takes "30000"
    if n is None:
        yield Hit(t.at("kv_port"), v, "kv_port must be an integer")
    elif not 1 <= n <= 65535:
        yield Hit(t.at("kv_port"), v, f"{n} is not a TCP port (1-65535)")


def _device(t: Target) -> Iterable[Hit]:
    v = t.data.get("kv_buffer_device")
    if v is not None and v not in V.BUFFER_DEVICES:
        yield Hit(t.at("kv_buffer_device"), v, "allowed: " + ", ".join(V.BUFFER_DEVICES),
                  f'write "kv_buffer_device": "{did_you_mean(v, V.BUFFER_DEVICES) or "cuda"}"')


def _unknown_extra(t: Target) -> Iterable[Hit]:
    table = V.EXTRA_KEYS.get(t.connector or "")
    if table is None or t.external:
        return
    for key, v in t.extra.items():
        if key in table.keys or key in table.retired:
            continue
        right = V.vllm_spelling(key, t.connector or "") or did_you_mean(key, table.keys)
        why = (f"{key!r} is kvconf's spelling; vLLM's {t.connector} reads {right!r}"
               if V.vllm_spelling(key, t.connector or "") else f"{t.connector} does not read {key!r}")
        yield Hit(t.at(EXTRA, key), v, why,
                  f"write {right!r}" if right else f"remove it; {t.connector} reads: " + ", ".join(table.keys))


def _retired_extra(t: Target) -> Iterable[Hit]:
    table = V.EXTRA_KEYS.get(t.connector or "")
    for key, instead in (table.retired.items() if table and not t.external else ()):
        if key in t.extra:
            yield Hit(t.at(EXTRA, key), t.extra[key], f"{t.connector} no longer reads {key!r}",
                      f"use {instead}")


def _offload_bytes(t: Target) -> Iterable[Hit]:
    if t.connector != "OffloadingConnector" or t.external:
        return
    spec = t.extra.get("spec_name", "CPUOffloadingSpec")
    if spec == "CPUOffloadingSpec" and "cpu_bytes_to_use" not in t.extra:
        yield Hit(t.at(EXTRA), t.extra, "the CPU offloading spec needs cpu_bytes_to_use (vLLM fails at start: "
                  "\"cpu_bytes_to_use must be specified in kv_connector_extra_config\")",
                  'add "cpu_bytes_to_use": <bytes of host memory, across all workers>, e.g. 4000000000')


def _offload_chunk(t: Target) -> Iterable[Hit]:
    if t.connector == "OffloadingConnector" and "block_size" in t.extra and "blocks_per_chunk" in t.extra:
        yield Hit(t.at(EXTRA, "blocks_per_chunk"), t.extra["blocks_per_chunk"],
                  "block_size and blocks_per_chunk both set the offload chunk", "keep one of them")


def _extra_value(t: Target) -> Iterable[Hit]:
    """The extra keys kvconf's own connector of that kind reads, checked by its model."""
    if t.external or t.connector is None or t.connector == "MultiConnector":
        return
    from kvconf.ci.translate import extra_problems

    table = V.EXTRA_KEYS.get(t.connector)
    for key, v in t.extra.items():
        whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        if table is not None and table.integer(key) and v is not None and (isinstance(v, bool) or not whole):
            yield Hit(t.at(EXTRA, key), v, f"{t.connector} reads {key} as an integer",
                      f"write a plain number{' of bytes (4G is 4 GiB)' if 'bytes' in key else ''}")
    for key, message, literal in extra_problems(t.connector, t.extra):
        yield Hit(t.at(EXTRA, key), t.extra.get(key), message,
                  severity="warning" if literal else None,
                  fix=("vLLM may accept it, but kvconf's connector cannot run it" if literal else None))


def _multi_children(t: Target) -> Iterable[Hit]:
    if t.connector != "MultiConnector" or t.external:
        return
    kids = t.extra.get("connectors")
    if not isinstance(kids, list) or not kids:
        yield Hit(t.at(EXTRA, "connectors") if "connectors" in t.extra else t.at(EXTRA), kids,
                  "a MultiConnector needs kv_connector_extra_config.connectors, a non-empty list of child configs")


def _children(t: Target) -> list[tuple[int, Any]]:
    kids = t.extra.get("connectors") if t.connector == "MultiConnector" else None
    return list(enumerate(kids)) if isinstance(kids, list) else []


def _multi_child_object(t: Target) -> Iterable[Hit]:
    for i, kid in _children(t):
        if not isinstance(kid, dict):
            yield Hit(t.at(EXTRA, "connectors", i), kid, "a child must be a KVTransferConfig object")
        elif kid.get("kv_connector") is None:
            yield Hit(t.at(EXTRA, "connectors", i), kid, "this child names no kv_connector",
                      'add "kv_connector" (and "kv_role") to it')


def _multi_engine_id(t: Target) -> Iterable[Hit]:
    for i, kid in _children(t):
        if isinstance(kid, dict) and "engine_id" in kid:
            yield Hit(t.at(EXTRA, "connectors", i, "engine_id"), kid["engine_id"], None)


def _multi_duplicate(t: Target) -> Iterable[Hit]:
    seen: dict[tuple[Any, Any], int] = {}
    for i, kid in _children(t):
        if not isinstance(kid, dict):
            continue
        key = (kid.get("kv_connector"), kid.get("kv_connector_module_path"))
        if key in seen:
            yield Hit(t.at(EXTRA, "connectors", i, "kv_connector"), key[0],
                      f"the same connector as connectors[{seen[key]}]")
        else:
            seen[key] = i


def _plugin_tree(t: Target) -> Iterable[Hit]:
    for path, value, detail, fix, severity in plugin_findings(t.data, t.path, t.import_modules):
        yield Hit(path, value, detail, fix, severity)


def _external(t: Target) -> Iterable[Hit]:
    if not t.external or t.connector is None or is_plugin(t.data):
        return
    module = t.data["kv_connector_module_path"]
    if not t.import_modules:
        yield Hit(t.at("kv_connector_module_path"), module, f"the contract of {t.connector} (module {module}) "
                  "was not checked: importing runs the module's code", "pass --import-modules to check it",
                  severity="note")
        return
    from kvconf.ci.check_connector import check_target

    r = check_target(f"{module}:{t.connector}")
    if not r["ok"]:
        yield Hit(t.at("kv_connector_module_path"), module, f"{t.connector} (module {module}): {r['verdict']}: "
                  f"{r['message']}", r.get("fix"))


def _nixl_both(t: Target) -> Iterable[Hit]:
    if (t.connector or "").startswith("Nixl") and t.data.get("kv_role") == "kv_both" and not t.external:
        yield Hit(t.at("kv_role"), "kv_both", None)


def _document(t: Target) -> Iterable[Hit]:
    """The whole text's entries are found by ``kvconf lint`` while it reads the text."""
    return ()


def _j(**kw: Any) -> str:
    import json

    return json.dumps(kw)


_NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}
_MC = {"kv_connector": "MooncakeConnector", "kv_role": "kv_producer"}
_OFF = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}

CATALOGUE: tuple[Entry, ...] = (
    Entry("json-syntax", "not JSON (vLLM: argparse's \"invalid loads value\")", "fix the JSON at the line given",
          "vllm/engine/arg_utils.py (parse_dataclass)", '{"kv_connector": "NixlConnector", "kv_role": "kv_both",}',
          _document),
    Entry("refused-input", "an input kvconf will not read",
          "fix the value at the line given (the bounds: docs/hostile-inputs.md)", "kvconf's bounds on config files",
          '{"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"x": '
          + "[" * 65 + "]" * 65 + "}}", _document),
    Entry("not-an-object", "JSON that is not an object", "write one JSON object of KVTransferConfig fields",
          "vllm/engine/arg_utils.py (parse_dataclass)", '["NixlConnector", "kv_both"]', _document),
    Entry("duplicate-key", "a key written twice in one object (JSON keeps the last, silently)",
          "keep one", "RFC 8259 section 4; Python's json module",
          '{"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_role": "kv_consumer"}', _document),
    Entry("removed-field", "a field vLLM removed from KVTransferConfig", "remove it",
          "vLLM issue #11490; vllm/config/kv_transfer.py (extra=\"forbid\")",
          _j(**_NIXL, kv_rank=0, kv_parallel_size=2, kv_ip="10.0.0.1"), _removed_field,
          hydra=("+connector.kv_rank=0",)),
    Entry("role-as-key", "a kv_role value used as a key", "write it as the value of kv_role",
          "vllm-project/vllm-ascend#16033 (review)", '{"kv_connector": "NixlConnector", "kv_producer": "kv_consumer"}',
          _role_as_key, hydra=("+connector.kv_producer=kv_consumer",)),
    Entry("unknown-key", "a key KVTransferConfig does not have (vLLM rejects the whole JSON)",
          "correct its spelling or remove it", "vLLM PR #15960 (review); vllm/config/kv_transfer.py",
          _j(**_MC, kv_extra_config={"mooncake_protocol": "tcp"}), _unknown_key,
          hydra=("+connector.kv_connector=NixlConnector",)),
    Entry("renamed-connector", "a connector name vLLM renamed (\"Unsupported connector type\")",
          "use the new name", "vLLM PR #30201, issue #49399",
          _j(kv_connector="SharedStorageConnector", kv_role="kv_both"), _renamed,
          hydra=("connector.name=SharedStorageConnector",)),
    Entry("removed-connector", "a connector vLLM removed (the P2P NCCL connectors)",
          "use a supported transfer connector", "vLLM v0.12; issue #11490",
          _j(kv_connector="P2pNcclConnector", kv_role="kv_producer"), _removed,
          hydra=("connector.name=P2pNcclConnector",)),
    Entry("unknown-connector", "a connector name vLLM does not register, without kv_connector_module_path",
          "use a registered name or give the module", "vllm/distributed/kv_transfer/kv_connector/factory.py",
          _j(kv_connector="MoonCakeConnector", kv_role="kv_producer"), _unknown_connector,
          hydra=("connector.name=mooncak",)),
    Entry("wrong-type", "a field of the wrong type", "write the type the field takes",
          "vllm/config/kv_transfer.py", _j(**_NIXL, kv_connector_extra_config="backends=UCX"), _wrong_type,
          hydra=("connector.enable_permute_local_kv=maybe",)),
    Entry("missing-kv-role", "a connector without kv_role (vLLM: \"Please specify kv_role when kv_connector is set\")",
          "add kv_role", "vllm/config/kv_transfer.py __post_init__",
          _j(kv_connector="NixlConnector"), _missing_role, hydra=("connector.kv_role=null",)),
    Entry("bad-kv-role", "a kv_role that is not kv_producer, kv_consumer or kv_both", "use one of them",
          "vllm/config/kv_transfer.py", _j(kv_connector="NixlConnector", kv_role="producer"), _bad_role,
          hydra=("connector.kv_role=producer",)),
    Entry("no-connector", "settings without kv_connector: KV transfer is silently off",
          "name the connector, or drop the settings", "vllm/config/kv_transfer.py (is_kv_transfer_instance); "
          "NIXL's handshake-mismatch advice",
          _j(kv_connector_extra_config={"enforce_handshake_compat": False}), _no_connector),
    Entry("empty-module-path", "an empty kv_connector_module_path",
          "remove it (registered connectors need none) or give an importable module",
          "vllm/distributed/kv_transfer/kv_connector/factory.py",
          _j(kv_connector="MyConnector", kv_role="kv_both", kv_connector_module_path=""), _empty_module_path,
          hydra=("connector.module_path=''",)),
    Entry("load-failure-policy", "kv_load_failure_policy outside fail | recompute", "use fail or recompute",
          "vllm/config/kv_transfer.py", _j(**_NIXL, kv_load_failure_policy="retry"), _policy,
          hydra=("connector.kv_load_failure_policy=retry",)),
    Entry("kv-port", "kv_port not an integer, or not a TCP port", "give an integer from 1 to 65535",
          "vllm/config/kv_transfer.py", _j(kv_connector="ExampleConnector", kv_role="kv_both", kv_port=70000), _port,
          hydra=("connector.kv_port=70000",)),
    Entry("buffer-device", "kv_buffer_device outside cuda | cpu | xpu", "use cuda, cpu or xpu",
          "vllm/config/kv_transfer.py", _j(**_NIXL, kv_buffer_device="gpu"), _device,
          hydra=("connector.kv_buffer_device=gpu",)),
    Entry("unknown-extra-key", "a kv_connector_extra_config key the connector does not read (vLLM ignores it)",
          "use the key the connector reads", "each connector's source (kvconf.config.vllm.EXTRA_KEYS); "
          "vLLM PR #15960; LMCache/LMCache#4267",
          _j(**_MC, kv_connector_extra_config={"protocol": "tcp"}), _unknown_extra,
          hydra=("connector=mooncake", "+connector.extra.mooncake_protocol=tcp")),
    Entry("retired-extra-key", "an extra key the connector no longer reads (num_cpu_blocks)",
          "use its replacement", "vLLM PR #24498", _j(**_OFF, kv_connector_extra_config={"num_cpu_blocks": 10000}),
          _retired_extra, hydra=("connector=offloading", "+connector.extra.num_cpu_blocks=10000")),
    Entry("offloading-without-cpu-bytes", "OffloadingConnector without cpu_bytes_to_use",
          "add cpu_bytes_to_use", "vLLM PR #24498; v1/kv_offload (CPU spec)",
          _j(**_OFF, kv_connector_extra_config={"block_size": 64}), _offload_bytes,
          hydra=("connector=offloading", "~connector.extra.cpu_bytes_to_use")),
    Entry("offloading-chunk-twice", "OffloadingConnector with both block_size and blocks_per_chunk",
          "keep one", "vllm/distributed/kv_transfer/kv_connector/v1/offloading/config.py",
          _j(**_OFF, kv_connector_extra_config={"cpu_bytes_to_use": 10**9, "block_size": 64, "blocks_per_chunk": 4}),
          _offload_chunk),
    Entry("extra-value", "an extra value of the wrong type or out of range (a count of 0, a byte count written as text)",
          "give a value in range", "kvconf's connector models (connector.extra)",
          _j(**_MC, kv_connector_extra_config={"num_workers": 0}), _extra_value,
          hydra=("connector=mooncake", "connector.extra.num_workers=0")),
    Entry("multi-without-children", "a MultiConnector without child connectors", "list the children",
          "vllm/distributed/kv_transfer/kv_connector/v1/multi_connector.py",
          _j(kv_connector="MultiConnector", kv_role="kv_both"), _multi_children,
          hydra=("connector=multi", "connector.extra.connectors=[]")),
    Entry("multi-child-not-object", "a MultiConnector child that is not an object", "write each child as a "
          "KVTransferConfig object", "vllm/distributed/kv_transfer/kv_connector/v1/multi_connector.py",
          _j(kv_connector="MultiConnector", kv_role="kv_both", kv_connector_extra_config={"connectors": ["NixlConnector"]}),
          _multi_child_object, hydra=("connector=multi", "connector.extra.connectors=[nixl]")),
    Entry("multi-child-engine-id", "a MultiConnector child that sets engine_id",
          "remove it; set engine_id on the MultiConnector", "multi_connector.py (KVTransferConfig(**ktc, engine_id=...))",
          _j(kv_connector="MultiConnector", kv_role="kv_both", kv_connector_extra_config={"connectors": [
              {"kv_connector": "NixlConnector", "kv_role": "kv_both", "engine_id": "e1"}]}), _multi_engine_id,
          hydra=("connector=multi", "connector.extra.connectors=[{name: nixl, kv_role: kv_both, engine_id: e1}]")),
    Entry("multi-duplicate-child", "the same connector twice in a MultiConnector (every block saved twice)",
          "remove the duplicate", "vllm/distributed/kv_transfer/kv_connector/v1/multi_connector.py",
          _j(kv_connector="MultiConnector", kv_role="kv_both", kv_connector_extra_config={"connectors": [
              _NIXL, _NIXL]}), _multi_duplicate,
          hydra=("connector=multi", "connector.extra.connectors=[{name: nixl, kv_role: kv_both}, "
                 "{name: nixl, kv_role: kv_both}]")),
    Entry("kvconf-tree", "kvconf's plug-in given a connector tree that kvconf refuses",
          "python -m kvconf connector=NAME action=export export.target=kvconf writes a valid one",
          "kvconf.vllm (kvconf's plug-in)",
          _j(kv_connector="KVConfConnector", kv_connector_module_path="kvconf.vllm", kv_role="kv_both",
             kv_connector_extra_config={"kvconf_connector": {"name": "offloading", "kv_role": "kv_both", "extra": {
                 "cpu_bytes_to_uze": "1GiB"}}}), _plugin_tree),
    Entry("external-contract", "an external connector (kv_connector_module_path) whose class breaks the "
          "constructor contract", "accept (vllm_config, role, kv_cache_config) and pass them on",
          "vLLM PR #39832; vllm/distributed/kv_transfer/kv_connector/factory.py",
          _j(kv_connector="Legacy", kv_role="kv_both", kv_connector_module_path="zoo.connectors"), _external,
          hydra=("connector.module_path=zoo.connectors", "connector.name=Legacy")),
)
"""Every misconfiguration ``kvconf lint`` knows: each is an error (exit 1), except that an external
connector's contract is checked only with ``--import-modules`` (a note says it was skipped). The
README lists them; each has a test."""

NOTICES: tuple[Entry, ...] = (
    Entry("not-a-literal", "a --kv-transfer-config whose value is not written out (a shell variable)",
          "lint the value itself: kvconf lint \"$VAR\" or the file it comes from", "kvconf lint",
          "vllm serve m --kv-transfer-config \"$KV_CONFIG\"", _document, severity="note"),
    Entry("nixl-kv-both", "NixlConnector with kv_role kv_both (deprecated by vLLM 0.32's NIXL)",
          "use kv_producer on the prefill instance and kv_consumer on the decode instance",
          "vllm/distributed/kv_transfer/kv_connector/v1/nixl/connector.py", _j(kv_connector="NixlConnector",
                                                                               kv_role="kv_both"),
          _nixl_both, severity="warning"),
)
"""What ``kvconf lint`` reports without counting it as a problem (exit code unaffected): warnings
and notes."""

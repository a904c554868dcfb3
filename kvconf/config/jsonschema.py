"""JSON Schemas (draft 2020-12) of the config, generated from the pydantic models: one for the
whole composed config and one per config group (connector, role, kv_cache). A connector's
``extra`` settings are checked by its own model's schema, chosen by ``name`` (``if``/``then``), as
kvconf validates them. Editors use them through the ``# yaml-language-server: $schema=...`` line of
every conf/ YAML; ``kvconf.ci.schemas`` writes them into ``schemas/`` and checks they are current.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, TypeAdapter

from .fielddocs import document
from .kvcache import KVCacheConfig
from .layout import KVCacheLayout
from .models import ConnectorConfig, KVConfConfig

__all__ = ["DIALECT", "changes", "generate"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _with_extras(connector: dict[str, Any], defs: dict[str, Any],
                 extras: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """The connector schema, its ``extra`` checked by the named built-in connector's model."""
    rules = []
    for name, model in extras.items():
        sub = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[model.__name__] = sub
        rules.append({
            "if": {"properties": {"name": {"const": name}, "module_path": {"type": "null"}}, "required": ["name"]},
            "then": {"properties": {"extra": {"$ref": f"#/$defs/{model.__name__}"}}},
        })
    return {**connector, "allOf": rules}


def generate(extras: dict[str, type[BaseModel]],
             documents: dict[str, tuple[type[BaseModel], str]]) -> dict[str, dict[str, Any]]:
    """``file name -> schema`` for the whole config and each config group, the ``extra`` settings
    of each connector in ``extras`` (registry name -> model) checked by its model, plus one schema
    per entry of ``documents`` (file name -> (model, title))."""
    document(KVConfConfig, KVCacheLayout, KVCacheConfig, *extras.values(), *(m for m, _ in documents.values()))

    def doc(schema: dict[str, Any], title: str) -> dict[str, Any]:
        return {"$schema": DIALECT, "title": title, **{k: v for k, v in schema.items() if k != "title"}}

    config = KVConfConfig.model_json_schema()
    config["$defs"]["ConnectorConfig"] = _with_extras(config["$defs"]["ConnectorConfig"], config["$defs"], extras)
    connector = ConnectorConfig.model_json_schema()
    connector_defs = connector.setdefault("$defs", {})
    connector = _with_extras(connector, connector_defs, extras)
    role = KVConfConfig.model_fields["role"]
    assert role.annotation is not None
    return {
        **{name: doc(model.model_json_schema(), title) for name, (model, title) in documents.items()},
        "config.schema.json": doc(config, "kvconf config"),
        "connector.schema.json": doc(connector, "kvconf connector"),
        "kv_cache.schema.json": doc(TypeAdapter(Union[KVCacheLayout, KVCacheConfig]).json_schema(),
                                    "kvconf kv_cache"),
        "role.schema.json": doc({"type": "object", "additionalProperties": False, "required": ["role"],
                                 "properties": {"role": {**TypeAdapter(role.annotation).json_schema(),
                                                         "description": role.description}}}, "kvconf role"),
    }


def changes(old: Any, new: Any, path: str = "") -> list[str]:
    """JSON-pointer-like paths where ``old`` and ``new`` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            p = f"{path}/{k}"
            if k not in old:
                out.append(f"added {p}")
            elif k not in new:
                out.append(f"removed {p}")
            else:
                out.extend(changes(old[k], new[k], p))
        return out
    return [] if old == new else [f"changed {path or '/'}"]

"""JSON Schemas (draft 2020-12) of the config, generated from the pydantic models into ``schemas/``.

``python -m kvconf.schemagen`` writes them; ``--check`` writes nothing and exits 1 naming each stale
file and what changed in it (the test suite runs it). One schema for the whole composed config and
one per config group (connector, role, kv_cache); a built-in connector's ``extra`` settings are
checked by its own model's schema, chosen by ``name`` (``if``/``then``), as kvconf validates them.
Editors use the schemas through the ``# yaml-language-server: $schema=...`` line of every conf/ YAML.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Union

from pydantic import TypeAdapter

__all__ = ["generate", "main"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _extras() -> dict[str, Any]:
    """``registry name -> extra-settings model`` of the built-in connectors."""
    from .factory import builtin_extra_model, builtin_names

    models = {name: builtin_extra_model(name) for name in builtin_names()}
    return {name: m for name, m in models.items() if m is not None}


def _with_extras(connector: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The connector schema, its ``extra`` checked by the named built-in connector's model."""
    rules = []
    for name, model in _extras().items():
        sub = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[model.__name__] = sub
        rules.append({
            "if": {"properties": {"name": {"const": name}, "module_path": {"type": "null"}}, "required": ["name"]},
            "then": {"properties": {"extra": {"$ref": f"#/$defs/{model.__name__}"}}},
        })
    return {**connector, "allOf": rules}


def generate() -> dict[str, dict[str, Any]]:
    """``file name -> schema`` for the whole config and each config group."""
    from .docs import document
    from .kvcache import KVCacheConfig, KVCacheLayout
    from .schema import ConnectorConfig, KVConfConfig

    document(KVConfConfig, KVCacheLayout, KVCacheConfig, *_extras().values())

    def doc(schema: dict[str, Any], title: str) -> dict[str, Any]:
        return {"$schema": DIALECT, "title": title, **{k: v for k, v in schema.items() if k != "title"}}

    config = KVConfConfig.model_json_schema()
    config["$defs"]["ConnectorConfig"] = _with_extras(config["$defs"]["ConnectorConfig"], config["$defs"])
    connector = ConnectorConfig.model_json_schema()
    connector_defs = connector.setdefault("$defs", {})
    connector = _with_extras(connector, connector_defs)
    role = KVConfConfig.model_fields["role"]
    from .results import BenchResults

    document(BenchResults)
    return {
        "results.schema.json": doc(BenchResults.model_json_schema(), "kvconf bench results.json"),
        "config.schema.json": doc(config, "kvconf config"),
        "connector.schema.json": doc(connector, "kvconf connector"),
        "kv_cache.schema.json": doc(TypeAdapter(Union[KVCacheLayout, KVCacheConfig]).json_schema(),
                                    "kvconf kv_cache"),
        "role.schema.json": doc({"type": "object", "additionalProperties": False, "required": ["role"],
                                 "properties": {"role": {**TypeAdapter(role.annotation).json_schema(),
                                                         "description": role.description}}}, "kvconf role"),
    }


def _changes(old: Any, new: Any, path: str = "") -> list[str]:
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
                out.extend(_changes(old[k], new[k], p))
        return out
    return [] if old == new else [f"changed {path or '/'}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvconf.schemagen", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "schemas"),
                   help="folder of the schema files (default: the repository's schemas/)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming what is stale")
    args = p.parse_args(argv)
    out = Path(args.out)
    schemas = generate()
    stale: list[str] = []
    for name, schema in schemas.items():
        text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
        path = out / name
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            old = json.loads(path.read_text()) if path.exists() else None
            what = _changes(old, schema) if old is not None else ["missing"]
            stale.append(f"{path}: " + ", ".join(what[:8]) + (f", ... ({len(what)} in all)" if len(what) > 8 else ""))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            stale.append(name)
    if args.check and stale:
        print("stale JSON Schemas (run: python -m kvconf.schemagen):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(schemas)} schemas in {out}"
          + (f" ({len(stale)} updated)" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

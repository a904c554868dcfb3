"""JSON Schemas of the config groups, generated from the pydantic models into ``schemas/``.

``python -m kvconf.schemagen`` writes them; ``--check`` exits 1 and names each stale file. Editors
use them through the ``# yaml-language-server: $schema=...`` line at the top of every conf/ YAML.
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


def generate() -> dict[str, dict[str, Any]]:
    """``file name -> schema`` for the whole config and each config group."""
    from .docs import document
    from .kvcache import KVCacheConfig, KVCacheLayout
    from .schema import ConnectorConfig, KVConfConfig

    document(KVConfConfig, KVCacheLayout, KVCacheConfig)

    def doc(schema: dict[str, Any], title: str) -> dict[str, Any]:
        return {"$schema": DIALECT, "title": title, **{k: v for k, v in schema.items() if k != "title"}}

    role = KVConfConfig.model_fields["role"]
    return {
        "config.schema.json": doc(KVConfConfig.model_json_schema(), "kvconf config"),
        "connector.schema.json": doc(ConnectorConfig.model_json_schema(), "kvconf connector"),
        "kv_cache.schema.json": doc(TypeAdapter(Union[KVCacheLayout, KVCacheConfig]).json_schema(),
                                    "kvconf kv_cache"),
        "role.schema.json": doc({"type": "object", "additionalProperties": False, "required": ["role"],
                                 "properties": {"role": {**TypeAdapter(role.annotation).json_schema(),
                                                         "description": role.description}}}, "kvconf role"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvconf.schemagen", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "schemas"),
                   help="folder of the schema files (default: the repository's schemas/)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is missing or stale")
    args = p.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, schema in generate().items():
        text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
        path = out / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"stale JSON Schemas in {out}: {', '.join(stale)}; run: python -m kvconf.schemagen", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(generate())} schemas in {out}"
          + (f" ({len(stale)} updated)" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

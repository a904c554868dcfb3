"""``python -m kvconf.ci.schemas``: writes the JSON Schemas of the config, of each config group and
of ``results.json`` into ``schemas/``; ``--check`` writes nothing and exits 1 naming each stale file
and what changed in it (the test suite runs it). The schemas themselves come from
:mod:`kvconf.config.jsonschema` and :class:`kvconf.bench.results.BenchResults`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvconf.bench.results import BenchResults
from kvconf.config.inputs import Refused, read_json
from kvconf.config.jsonschema import changes
from kvconf.config.jsonschema import generate as generate_schemas
from kvconf.contract.registry import builtin_extra_models

__all__ = ["generate", "main"]


def generate() -> dict[str, dict[str, Any]]:
    """``file name -> schema`` of every file in ``schemas/``."""
    return generate_schemas(builtin_extra_models(), {"results.schema.json": (BenchResults, "kvconf bench results.json")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvconf.ci.schemas", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "schemas"),
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
            try:
                old = read_json(path) if path.exists() else None
            except Refused as exc:  # a schema file over kvconf's bounds, or not JSON
                stale.append(f"{path}: {exc.message}")
                continue
            what = changes(old, schema) if old is not None else ["missing"]
            stale.append(f"{path}: " + ", ".join(what[:8]) + (f", ... ({len(what)} in all)" if len(what) > 8 else ""))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            stale.append(name)
    if args.check and stale:
        print("stale JSON Schemas (run: python -m kvconf.ci.schemas):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(schemas)} schemas in {out}"
          + (f" ({len(stale)} updated)" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kvconf import JSON|FILE|-``: a vLLM ``--kv-transfer-config`` as kvconf's ``connector/NAME.yaml``.

    kvconf import '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'      # YAML on stdout
    kvconf import launch.sh --out conf/ --name prefill    # writes conf/connector/prefill.yaml
    python -m kvconf --config-dir conf/ connector=prefill action=export           # the JSON again

vLLM's names become kvconf's (``NixlConnector`` -> ``nixl``; a connector given by
``kv_connector_module_path`` keeps its class and module), the extra keys that kvconf's connector
reads become its ``extra`` settings (``mooncake_protocol`` -> ``protocol``), and the keys only
vLLM's connector reads go to ``vllm_extra_config``, which ``action=export`` passes back unchanged:
the round trip gives the same keys and values, defaults aside. The JSON is linted first
(``kvconf lint``); an error there, or a vLLM connector kvconf has no counterpart of, exits 1.
Exit 2 for a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .translate import ImportFailure, translate

__all__ = ["main", "to_yaml"]


def to_yaml(node: dict[str, Any], origin: str) -> str:
    import yaml

    head = (f"# Imported by kvconf import from vLLM's --kv-transfer-config ({origin}).\n"
            "# Settings not written here take kvconf's defaults; vllm_extra_config is passed back to vLLM\n"
            "# unchanged by action=export.\n")
    return head + yaml.safe_dump(node, sort_keys=False, default_flow_style=False)


def _default_name(node: dict[str, Any]) -> str:
    role = str(node.get("kv_role") or "").removeprefix("kv_")
    base = str(node["name"]).lower() if not node.get("module_path") else "external"
    return f"{base}_{role}" if role else base


def main(argv: list[str] | None = None) -> int:
    from .lint import UsageError, lint_inputs, print_findings
    from .usage import UsageParser

    p = UsageParser(prog="kvconf import", description=__doc__.split("\n\n")[0])
    p.add_argument("input", metavar="JSON|FILE|-")
    p.add_argument("--out", type=Path, help="write DIR/connector/NAME.yaml (default: the YAML on stdout)")
    p.add_argument("--name", help="the option's name (default: kvconf's connector name and the kv_role)")
    p.add_argument("--index", type=int, default=None,
                   help="which value, when the file holds several (1 is the first)")
    p.add_argument("--import-modules", action="store_true", help="check an external connector's class (imports it)")
    args = p.parse_args(argv)
    try:
        results = lint_inputs([args.input], import_modules=args.import_modules)
    except UsageError as exc:
        print(f"kvconf import: {exc}", file=sys.stderr)
        return 2
    if len(results) > 1 and args.index is None:
        print(f"kvconf import: {args.input} holds {len(results)} --kv-transfer-config values (lines "
              + ", ".join(str(r.source.line) for r in results) + "); pick one with --index N", file=sys.stderr)
        return 2
    if args.index is not None and not 1 <= args.index <= len(results):
        print(f"kvconf import: --index {args.index}: there are {len(results)} values", file=sys.stderr)
        return 2
    result = results[(args.index or 1) - 1]
    errors = [f for f in result.findings if f.severity == "error"]
    if errors or result.value is None:
        print_findings([result], "text", sys.stderr)
        print("kvconf import: fix the errors above first (kvconf lint reports the same)", file=sys.stderr)
        return 1
    try:
        node = translate(result.value)
    except ImportFailure as exc:
        print(f"kvconf import: {exc}", file=sys.stderr)
        return 1
    origin = f"{result.source.label}, line {result.source.line}"
    text = to_yaml(node, origin)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    name = args.name or _default_name(node)
    target = args.out / "connector" / f"{name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"kvconf import: wrote {target}; run it with: python -m kvconf --config-dir {args.out} connector={name}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["extra_problems", "main", "to_yaml", "translate"]


class ImportFailure(Exception):
    """The JSON has no kvconf counterpart: why."""


def _builtin(vllm_name: str) -> tuple[str, type] | None:
    from kvconf.contract import registry

    ours = registry.builtin_for_vllm(vllm_name)
    if ours is None:
        return None
    return ours, registry.resolve(ours, None).target


def _number(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def extra_problems(vllm_name: str, extra: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(vLLM key, message, kvconf-only)`` for each extra value kvconf's connector of this kind
    rejects; ``kvconf-only`` marks a value outside a choice kvconf's connector has and vLLM's may not
    (a Mooncake protocol kvconf cannot run). Keys kvconf does not read, and missing keys, are other
    entries' business."""
    found = _builtin(vllm_name)
    if found is None:
        return []
    _, cls = found
    model = getattr(cls, "extra_config", None)
    mapped = {v: k for k, v in getattr(cls, "vllm_extra_keys", {}).items()}
    if model is None or not mapped:
        return []
    from pydantic import ValidationError

    data = {mapped[k]: _number(v) for k, v in extra.items() if k in mapped}
    try:
        model.model_validate(data)
    except ValidationError as exc:
        back = {k: v for v, k in mapped.items()}
        out = []
        for err in exc.errors():
            key = err["loc"][0] if err["loc"] else None
            if err["type"] == "missing" or key not in back:
                continue
            out.append((back[key], err["msg"], err["type"] == "literal_error"))
        return out
    return []


def translate(ktc: dict[str, Any]) -> dict[str, Any]:
    """kvconf's connector node for vLLM's KVTransferConfig ``ktc`` (a linted one)."""
    name = ktc.get("kv_connector")
    module_path = ktc.get("kv_connector_module_path")
    extra_in = dict(ktc.get("kv_connector_extra_config") or {})
    node: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    if module_path:
        node.update(name=name, module_path=module_path)
        extra = extra_in  # an external connector takes its extra settings as they are
    else:
        found = _builtin(str(name))
        if found is None:
            from kvconf.contract.registry import vllm_names

            raise ImportFailure(f"kvconf has no counterpart of vLLM's {name}; it runs "
                                + ", ".join(f"{v} (as {k})" for k, v in sorted(vllm_names().items())))
        ours, cls = found
        node["name"] = ours
        mapped = {v: k for k, v in getattr(cls, "vllm_extra_keys", {}).items()}
        for key, value in extra_in.items():
            if ours == "multi" and key == "connectors":
                extra["connectors"] = [translate(child) for child in value]
            elif key in mapped:
                extra[mapped[key]] = _number(value)
            else:
                passthrough[key] = value
        if name in ("NixlPullConnector", "NixlPushConnector"):
            extra["mode"] = "push" if name == "NixlPushConnector" else "pull"
    node["kv_role"] = ktc.get("kv_role")
    for key in ("engine_id", "kv_buffer_device", "kv_port", "kv_load_failure_policy", "enable_permute_local_kv"):
        if key in ktc:
            node[key] = _number(ktc[key]) if key == "kv_port" and not isinstance(ktc[key], str) else ktc[key]
    if isinstance(node.get("kv_port"), str):
        node["kv_port"] = int(node["kv_port"])  # vLLM's lax validation takes "30000"
    if extra:
        node["extra"] = extra
    if passthrough:
        node["vllm_extra_config"] = passthrough
    return node


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
    from kvconf.ci.lint import UsageError, lint_inputs, print_findings

    p = argparse.ArgumentParser(prog="kvconf import", description=__doc__.split("\n\n")[0])
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

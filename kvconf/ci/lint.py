"""``kvconf lint JSON|FILE|- ...``: vLLM ``--kv-transfer-config`` values checked before a server boots.

    kvconf lint '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
    kvconf lint launch.sh k8s/decode.yaml         # every --kv-transfer-config in them, at its line
    kvconf lint --format github configs/*.json    # one ::error per problem, for CI annotations
    --import-modules                              # also check external classes (imports them)

Each value is read as vLLM reads it (JSON, with bare ``80m``/``4G`` numbers expanded) and checked
against vLLM's own rules and the catalogue of misconfigurations vLLM users hit
(:mod:`kvconf.ci.catalogue`; the README lists it): unknown and removed keys, renamed connectors,
extra keys vLLM's connector ignores, a MultiConnector's children, and more. Never imports torch or
vLLM. Exit 0 when vLLM would take every value and it means what it says (warnings and notes
allowed), 1 with one message per problem otherwise, 2 for a usage error (no input, a missing file,
a file with no value in it).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

from kvconf.config.inputs import MAX_FILE_BYTES, Refused, check_json, check_size, decode, read_text
from kvconf.errors import shown

from .annotations import annotation
from .catalogue import CATALOGUE, NOTICES, Entry, Target, render_path
from .sources import JSONSyntaxError, Source, extract
from .usage import UsageParser

__all__ = ["Finding", "Result", "UsageError", "lint_inputs", "lint_source", "main", "print_findings"]

ENTRIES: dict[str, Entry] = {e.id: e for e in (*CATALOGUE, *NOTICES)}


class UsageError(Exception):
    """Nothing to lint where the user pointed (exit 2)."""


@dataclass
class Finding:
    """One problem, where it is."""

    id: str
    severity: str
    file: str
    line: int
    path: str
    message: str
    value: Any = None
    fix: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "severity": self.severity, "file": self.file, "line": self.line, "path": self.path,
               "message": self.message, "fix": self.fix}
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass
class Result:
    """One value and what is wrong with it."""

    source: Source
    value: Any = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def _finding(entry_id: str, source: Source, line: int, path: str, detail: Optional[str] = None, value: Any = None,
             fix: Optional[str] = None, severity: Optional[str] = None) -> Finding:
    e = ENTRIES[entry_id]
    message = e.message + (f": {detail}" if detail else "")
    return Finding(e.id, severity or e.severity, source.label, line, path, message, value, fix or e.fix)


def lint_source(source: Source, import_modules: bool = False) -> Result:
    """Every catalogue entry's detector on ``source``'s value (and on each MultiConnector child)."""
    result = Result(source)
    try:
        check_json(source.text, source.label, lambda i: source.raw.count("\n", 0, source.raw_offset(i)) + 1)
    except Refused as exc:
        result.findings.append(_finding("refused-input", source, exc.line, "<config>", exc.message))
        return result
    try:
        doc = source.parse()
    except JSONSyntaxError as exc:
        line = source.raw.count("\n", 0, exc.offset) + 1
        result.findings.append(_finding("json-syntax", source, line, "<config>", exc.message))
        return result
    result.value = doc.value
    if not isinstance(doc.value, dict):
        result.findings.append(_finding("not-an-object", source, source.line, "<config>",
                                        f"found a JSON {type(doc.value).__name__}", doc.value))
        result.value = None
        return result
    for path in doc.duplicates:
        result.findings.append(_finding("duplicate-key", source, doc.line_of(path), render_path(path),
                                        f"{path[-1]!r} is written more than once"))
    for t in _targets(Target(doc.value, (), import_modules=import_modules)):
        for entry in ENTRIES.values():
            for hit in entry.detect(t):
                result.findings.append(_finding(entry.id, source, doc.line_of(hit.path), render_path(hit.path),
                                                hit.detail, hit.value, hit.fix, hit.severity))
    return result


def _targets(t: Target) -> list[Target]:
    """``t`` and, for a MultiConnector, each child (and each child's children)."""
    out = [t]
    kids = t.extra.get("connectors") if t.connector == "MultiConnector" else None
    for i, kid in enumerate(kids if isinstance(kids, list) else []):
        if isinstance(kid, dict):
            out += _targets(Target(kid, t.at("kv_connector_extra_config", "connectors", i), child=True,
                                   import_modules=t.import_modules))
    return out


def _read(arg: str, n: int) -> tuple[str, str]:
    """(label, text) of one input, read under kvconf's bounds (:class:`Refused` past them)."""
    if arg == "-":
        return "-", decode(sys.stdin.buffer.read(MAX_FILE_BYTES + 1), "-")
    if arg.lstrip().startswith(("{", "[")):
        return f"<arg {n}>", arg
    path = Path(arg)
    if not path.is_file():
        raise UsageError(f"{arg}: no such file (give a JSON string, a file, or - for standard input)")
    return arg, read_text(path, arg)  # a byte-order mark is not part of the JSON


def lint_inputs(inputs: list[str], import_modules: bool = False) -> list[Result]:
    """Each input's values, linted; a :class:`UsageError` when an input holds nothing to lint."""
    results = []
    for n, arg in enumerate(inputs, 1):
        try:
            label, text = _read(arg, n)
            check_size(text, label)  # stdin and JSON arguments too
        except Refused as exc:  # the input is invalid, as a value with an error is
            src = Source(exc.label, exc.line, "", "")
            results.append(Result(src, None, [_finding("refused-input", src, exc.line, "<config>", exc.message)]))
            continue
        sources, skipped = extract(text, label)
        if not sources and not skipped:
            raise UsageError(f"{label}: found neither a JSON object nor --kv-transfer-config in it")
        mine = [lint_source(s, import_modules) for s in sources]
        for line, why in skipped:
            src = Source(label, line, "", text)
            mine.append(Result(src, None, [_finding("not-a-literal", src, line, "<config>", why)]))
        results.extend(sorted(mine, key=lambda r: r.source.line))
    return results


def print_findings(results: list[Result], fmt: str, out: IO[str], seconds: float | None = None) -> None:
    findings = [f for r in results for f in r.findings]
    if fmt == "json":
        out.write(json.dumps({"ok": all(r.ok for r in results), "checked": len(results),
                              "seconds": None if seconds is None else round(seconds, 3),
                              "findings": [f.as_dict() for f in findings]}) + "\n")
        return
    if fmt == "github":
        kinds = {"error": "error", "warning": "warning", "note": "notice"}
        for f in findings:
            msg = f"[{f.id}] {shown(f.path)}: {f.message}" + (f" - fix: {f.fix}" if f.fix else "")
            out.write(annotation(kinds[f.severity], f.file, f.line, msg) + "\n")
        return
    for f in findings:
        value = json.dumps(f.value) if _jsonable(f.value) else repr(f.value)
        value = value if len(value) <= 200 else value[:180] + f"... ({len(value):,} characters)"
        with_value = "" if f.value is None else f" (value: {value})"
        out.write(f"{f.file}:{f.line}: {f.severity}: {shown(f.path)}: {f.message}{with_value}"
                  + (f"; fix: {f.fix}" if f.fix else "") + f" [{f.id}]\n")
    if seconds is not None:
        errors = sum(f.severity == "error" for f in findings)
        warnings = sum(f.severity == "warning" for f in findings)
        bad = sum(not r.ok for r in results)
        out.write(f"kvconf lint: {len(results)} value(s) checked, "
                  + (f"{bad} invalid ({errors} errors)" if bad else "all valid")
                  + (f", {warnings} warnings" if warnings else "") + f" ({seconds:.2f} s)\n")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="kvconf lint", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="JSON|FILE|-")
    p.add_argument("--format", choices=("text", "json", "github"), default="text")
    p.add_argument("--import-modules", action="store_true",
                   help="import external connectors (kv_connector_module_path) to check their contract; "
                        "this runs their code")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        results = lint_inputs(args.inputs, args.import_modules)
    except UsageError as exc:
        print(f"kvconf lint: {exc}", file=sys.stderr)
        return 2
    print_findings(results, args.format, sys.stdout, time.perf_counter() - t0)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

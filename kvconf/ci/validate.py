"""``kvconf validate``: config files and config-group combinations checked for CI, with no torch,
no GPU and no allocation.

    kvconf validate FILE...                 group files (group from the folder, or --group) or whole configs
    kvconf validate --matrix [--config-dir DIR]   every combination of the groups' options, through
                                            validation, the contract check and the memory plan
    --import-modules                        import the modules configs name (connector.module_path);
                                            without it they are read from source, never run
    --format text|json|github               github: one ``::error file=F,line=L,col=C::message`` per error

Every error names the file, the line and column of the offending key (from the YAML's own
positions), the key path, the bad value and the fix. Exit codes: 0 all valid, 1 something
invalid, 2 usage error (unknown flag, missing file). Also ``python -m kvconf.ci.validate``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvconf.conf import CONF_DIR, GROUPS, compose_data
from kvconf.config.diagnostics import problems_from_validation_error
from kvconf.config.inputs import Refused, config_dir_problems, load_yaml, read_text
from kvconf.config.models import ConnectorConfig, KVCacheGroupFile, validate_extra
from kvconf.contract import registry
from kvconf.contract import signature as contract
from kvconf.contract.registry import builtin_extra_model, no_imports
from kvconf.errors import MISSING, ConfigError, KVConfError, Problem, short, shown
from kvconf.runtime.pipeline import Job, load, run_job

from .annotations import annotation
from .usage import UsageParser

__all__ = ["Finding", "main", "positions", "validate_file", "validate_matrix"]


@dataclass
class Finding:
    """One error, where it is."""

    file: str
    line: int
    column: int
    path: str
    message: str
    value: Any = None
    fix: str | None = None
    combination: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"file": self.file, "line": self.line, "column": self.column, "path": self.path,
               "message": self.message}
        if self.value is not None:
            value = self.value if isinstance(self.value, (str, int, float, bool)) else repr(self.value)
            out["value"] = short(value, 200) if isinstance(value, str) and len(value) > 200 else value
        if self.fix:
            out["fix"] = self.fix
        if self.combination:
            out["combination"] = self.combination
        return out


@dataclass
class Report:
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    failed_combinations: dict[str, list[Finding]] = field(default_factory=dict)
    notes: list[Finding] = field(default_factory=list)
    """What could not be checked (a class read from source, not run): said, never reported valid."""


# ---- positions -------------------------------------------------------------------------------------


def positions(text: str) -> dict[tuple, tuple[int, int]]:
    """``key path -> (line, column)`` (1-based) of every mapping key and sequence item in a YAML text."""
    out: dict[tuple, tuple[int, int]] = {}
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return out

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                out[p] = (k.start_mark.line + 1, k.start_mark.column + 1)
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                p = path + (i,)
                out[p] = (item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, p)

    if root is not None:
        out[()] = (root.start_mark.line + 1, root.start_mark.column + 1)
        walk(root, ())
    return out


def _locate(pos: dict[tuple, tuple[int, int]], path: str) -> tuple[int, int]:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".") if p] if path else []
    while parts and tuple(parts) not in pos:
        parts.pop()
    return pos.get(tuple(parts), (1, 1))


def _findings(file: str, text: str, problems: Iterable[Problem], strip: str = "",
              combination: str | None = None) -> list[Finding]:
    pos = positions(text)
    out = []
    for p in problems:
        rel = p.path
        if strip and (rel == strip or rel.startswith(strip + ".")):
            rel = rel[len(strip) + 1:]
        line, col = _locate(pos, rel)
        hint = p.suggestion()
        msg = p.message + (f" (did you mean {hint}?)" if hint else "")
        if p.allowed is not None and p.value is not MISSING:
            msg += f"; allowed: {', '.join(str(a) for a in p.allowed)}"
        out.append(Finding(file, line, col, p.path, msg, None if p.value is MISSING else p.value, p.fix, combination))
    return out


# ---- one file --------------------------------------------------------------------------------------


def _group_problems(group: str, data: Any, notes: list[Problem] | None = None) -> list[Problem]:
    """Problems of one config group's content (as the group file holds it); what could not be
    checked goes into ``notes``."""
    from pydantic import ValidationError

    if group == "connector":
        if not isinstance(data, dict):
            return [Problem("connector", "a connector file holds a mapping", value=data)]
        problems = []
        try:
            ConnectorConfig.model_validate(data)
        except ValidationError as exc:
            problems += problems_from_validation_error(exc, ConnectorConfig, data, prefix="connector")
        problems += _extra_problems(data)
        if not problems:
            problems += _class_problems(data, [] if notes is None else notes)
        return problems
    if group == "kv_cache":
        try:
            KVCacheGroupFile.model_validate({"kv_cache": data})
        except ValidationError as exc:
            return problems_from_validation_error(exc, KVCacheGroupFile, {"kv_cache": data})
        return []
    if group == "role":
        role = data.get("role") if isinstance(data, dict) else None
        extra = [Problem(k, f"unknown key {k!r} in a role file", value=data[k], allowed=["role"],
                         fix="a role file holds only role: scheduler | worker")
                 for k in (data or {}) if k != "role"]
        if role not in ("scheduler", "worker"):
            extra.append(Problem("role", "value is not one of the allowed values" if role is not None
                                 else "required key is missing", value=role if role is not None else MISSING,
                                 allowed=["scheduler", "worker"], fix="set role: scheduler or role: worker"))
        return extra
    raise ValueError(group)


def _extra_problems(connector: dict[str, Any]) -> list[Problem]:
    """A built-in connector's ``extra`` settings against its model (no module_path: no import of user code)."""
    name = connector.get("name")
    model = builtin_extra_model(name) if connector.get("module_path") is None and isinstance(name, str) else None
    if model is None:
        return []
    try:
        validate_extra(model, connector.get("extra"))
    except ConfigError as exc:
        return exc.problems
    return []


def _class_problems(connector: dict[str, Any], notes: list[Problem]) -> list[Problem]:
    """A ``module_path`` connector's class, as ``--matrix`` and ``python -m kvconf action=check``
    check it: resolved (read from its source unless ``--import-modules``), its constructor's
    contract, and ``extra`` against its ``extra_config``. A class read from source whose own
    ``extra_config`` cannot be evaluated without running the module: a note says so."""
    name, module_path = connector.get("name"), connector.get("module_path")
    if not isinstance(name, str) or not isinstance(module_path, str):
        return []
    try:
        resolved = registry.resolve(name, module_path)
        cls = contract.require(resolved.target, module=resolved.module, attribute=resolved.attribute)
    except KVConfError as exc:
        return exc.problems
    where = getattr(cls, "__kvconf_static__", None)
    if where is not None and "extra_config" in vars(cls):
        notes.append(Problem("connector.extra", f"not checked: {name} defines its own extra_config ({where}), and "
                             "the module was read, not run, so its settings model is unknown here",
                             fix="kvconf validate --import-modules checks them (it imports the module, running "
                                 "its code)"))
        return []
    try:
        validate_extra(getattr(cls, "extra_config", None), connector.get("extra"))
    except ConfigError as exc:
        return exc.problems
    return []


def validate_file(path: Path, group: str | None = None, notes: list[Finding] | None = None) -> list[Finding]:
    """Findings of one file: a group file, or a whole config (top-level connector/role/kv_cache).
    What could not be checked is appended to ``notes``."""
    try:
        text = read_text(path)
        data = load_yaml(text, str(path))
    except Refused as exc:  # over a bound, not UTF-8, not YAML: the file and line, nothing built
        return [Finding(str(path), exc.line, exc.column, "", exc.message,
                        fix="fix the file at that line (kvconf's bounds on config files: docs/hostile-inputs.md)")]
    group = group or (path.parent.name if path.parent.name in GROUPS else None)
    if group is None and isinstance(data, dict) and any(k in data for k in GROUPS):
        return _findings(str(path), text, _whole_problems(data))
    if group is None:
        return [Finding(str(path), 1, 1, "", "cannot tell which config group this file belongs to",
                        fix="put it in a connector/, role/ or kv_cache/ folder, or pass --group")]
    unchecked: list[Problem] = []
    if group == "role" and isinstance(data, dict):
        return _findings(str(path), text, _group_problems("role", data, unchecked))
    found = _findings(str(path), text, _group_problems(group, data, unchecked), strip=group)
    if notes is not None:
        notes += _findings(str(path), text, unchecked, strip=group)
    return found


def _whole_problems(data: dict[str, Any]) -> list[Problem]:
    data = {k: v for k, v in data.items() if k != "hydra"}
    try:
        load(Job(data), environment=False)  # a file is checked, not this machine
    except KVConfError as exc:
        return exc.problems
    return []


# ---- the matrix ------------------------------------------------------------------------------------


def _options(dirs: list[Path]) -> dict[str, dict[str, Path]]:
    """``group -> option -> file``; a later folder's file wins over an earlier one's."""
    out: dict[str, dict[str, Path]] = {g: {} for g in GROUPS}
    for d in dirs:
        for g in GROUPS:
            folder = d / g
            if folder.is_dir():
                for f in sorted(folder.glob("*.y*ml")):
                    out[g][f.stem] = f
    return out


def _header(text: str) -> dict[str, str]:
    head = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body.startswith("@"):
            k, _, v = body[1:].partition(" ")
            head[k] = v.strip()
    return head


@dataclass
class Combination:
    label: str
    chosen: dict[str, str]
    data: dict[str, Any]
    files: dict[str, Path]
    """``group -> file`` that supplied it; ``""`` -> the primary config."""
    global_groups: set[str]
    """Groups whose file is ``# @package _global_`` (its keys are top-level paths)."""


def combinations(config_dirs: list[Path]) -> Iterable[Combination]:
    """Every combination of the groups' options, composed as Hydra composes them: the primary
    config's own keys, then each group file under its group's key (or at the top for
    ``# @package _global_``). A combination whose files use other Hydra features (a ``defaults``
    list, another package) is composed by Hydra itself."""
    from omegaconf import OmegaConf

    dirs = [Path(CONF_DIR), *config_dirs]
    options = _options(dirs)
    primary_path = next(d / "config.yaml" for d in reversed(dirs) if (d / "config.yaml").exists())
    base = OmegaConf.to_container(OmegaConf.load(primary_path), resolve=False)
    assert isinstance(base, dict)
    base.pop("defaults", None)
    base.pop("hydra", None)
    loaded: dict[Path, tuple[Any, dict[str, str]]] = {}
    for g in GROUPS:
        for f in options[g].values():
            text = read_text(f)
            loaded[f] = (load_yaml(text, str(f)), _header(text))
    for combo in itertools.product(*(sorted(options[g]) for g in GROUPS)):
        chosen = dict(zip(GROUPS, combo))
        data: dict[str, Any] = json.loads(json.dumps(base))
        fallback = False
        global_groups = set()
        for g, o in chosen.items():
            content, head = loaded[options[g][o]]
            package = head.get("package")
            if isinstance(content, dict) and "defaults" in content:
                fallback = True
            if package == "_global_":
                data.update(content or {})
                global_groups.add(g)
            elif package in (None, g):
                data[g] = content
            else:
                fallback = True
        if fallback:
            data = _hydra_compose(config_dirs, chosen)
        else:
            data = _resolved(data)
        files = {"": primary_path, **{g: options[g][o] for g, o in chosen.items()}}
        yield Combination(" ".join(f"{g}={o}" for g, o in chosen.items()), chosen, data, files, global_groups)


def _resolved(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its interpolations (``${oc.env:TMPDIR,/tmp}``) resolved, as Hydra resolves
    them; as written where one does not resolve (validation then names the value)."""
    from omegaconf import OmegaConf

    try:
        out = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except Exception:  # an interpolation that does not resolve
        return data
    return {str(k): v for k, v in out.items()} if isinstance(out, dict) else data


def validate_matrix(config_dirs: list[Path]) -> Report:
    """Every combination through validation, the contract check and the memory plan
    (``action=check``: nothing is allocated), in this process."""
    report = Report()
    for d in config_dirs:  # every file within kvconf's bounds before any is composed
        for p in config_dir_problems(d):
            file, _, line = (p.location or "").rpartition(":")
            report.findings.append(Finding(file, int(line or 1), 1, "", p.message, fix=p.fix))
    if report.findings:
        return report
    for combo in combinations(config_dirs):
        report.checked += 1
        try:
            run_job({**combo.data, "action": "check"})
        except KVConfError as exc:
            findings = []
            for p in exc.problems:
                g = next((g for g in GROUPS if p.path == g or p.path.startswith(g + ".")), "")
                f = combo.files[g]
                strip = "" if (not g or g in combo.global_groups) else g
                findings += _findings(str(f), f.read_text(), [p], strip=strip, combination=combo.label)
            report.failed_combinations[combo.label] = findings
            for fd in findings:
                key = (fd.file, fd.line, fd.column, fd.message)
                if not any((x.file, x.line, x.column, x.message) == key for x in report.findings):
                    report.findings.append(fd)
    return report


def _hydra_compose(config_dirs: list[Path], chosen: dict[str, str]) -> dict[str, Any]:
    """A combination whose files need Hydra's own composition (defaults lists, other packages)."""
    return compose_data([f"{g}={o}" for g, o in chosen.items()], config_dirs=config_dirs)


# ---- output ----------------------------------------------------------------------------------------


def _emit(report: Report, fmt: str, what: str, seconds: float) -> None:
    if fmt == "json":
        print(json.dumps({"ok": not report.findings, "checked": report.checked, "what": what,
                          "seconds": round(seconds, 3), "errors": [f.as_dict() for f in report.findings],
                          "not_checked": [f.as_dict() for f in report.notes],
                          "failed_combinations": sorted(report.failed_combinations)}))
        return
    if fmt == "github":
        for kind, items in (("error", report.findings), ("notice", report.notes)):
            for f in items:
                msg = f"{shown(f.path)}: {f.message}" + (f" (value: {short(f.value, 200)})" if f.value is not None else "") + (
                    f" - fix: {f.fix}" if f.fix else "")
                print(annotation(kind, f.file, f.line, msg, column=f.column))
        return
    for f in report.notes:
        print(f"{f.file}:{f.line}:{f.column}: note: {shown(f.path)}: {f.message}" + (f"; fix: {f.fix}" if f.fix else ""))
    if report.failed_combinations:
        for label, findings in report.failed_combinations.items():
            print(f"FAIL {label}")
            for f in findings:
                print(f"  {f.file}:{f.line}:{f.column}: {shown(f.path)}: {f.message}"
                      + (f" (value: {short(f.value, 200)})" if f.value is not None else "")
                      + (f"; fix: {f.fix}" if f.fix else ""))
    else:
        for f in report.findings:
            print(f"{f.file}:{f.line}:{f.column}: {shown(f.path) or '<file>'}: {f.message}"
                  + (f" (value: {short(f.value, 200)})" if f.value is not None else "") + (f"; fix: {f.fix}" if f.fix else ""))
    bad = len(report.failed_combinations) if what == "combinations" else len(report.findings)
    verdict = f"{bad} invalid" if report.findings else "all valid"
    if report.notes:
        verdict = (f"{bad} invalid" if report.findings else "none invalid") + (
            f", {len(report.notes)} not fully checked (see the notes)")
    print(f"kvconf validate: {report.checked} {what} checked, {verdict} ({seconds:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="kvconf validate", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="config files: group files or whole configs")
    p.add_argument("--group", choices=GROUPS, help="the config group of every FILE (default: its folder's name)")
    p.add_argument("--matrix", action="store_true", help="check every combination of the config groups' options")
    p.add_argument("--config-dir", action="append", type=Path, default=[],
                   help="a folder of your own group options (connector/, role/, kv_cache/), for --matrix")
    p.add_argument("--format", choices=("text", "json", "github"), default="text")
    p.add_argument("--import-modules", action="store_true",
                   help="import the modules that configs name (connector.module_path) to check their classes; "
                        "this runs their code (without it they are read from source)")
    args = p.parse_args(argv)
    with contextlib.nullcontext() if args.import_modules else no_imports():
        return _run(p, args)


def _run(p: UsageParser, args: Any) -> int:
    t0 = time.perf_counter()
    if args.matrix == bool(args.files):
        p.error("give FILE... or --matrix (not both)")
    for d in args.config_dir:
        if not d.is_dir():
            p.error(f"--config-dir {d}: no such folder")
    if args.matrix:
        report = validate_matrix(args.config_dir)
        _emit(report, args.format, "combinations", time.perf_counter() - t0)
        return 1 if report.findings else 0
    report = Report()
    for f in args.files:
        if not f.is_file():
            p.error(f"{f}: no such file")
    for f in args.files:
        report.checked += 1
        report.findings += validate_file(f, args.group, report.notes)
    _emit(report, args.format, "files", time.perf_counter() - t0)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())

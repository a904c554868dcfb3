"""YAML files a user gives kvconf (``--config-dir`` folders), checked before Hydra reads them: text
that is not UTF-8, YAML that does not parse, a key written twice in one mapping (YAML keeps the
last, silently), and aliases that expand without bound (a "billion laughs" file) are each one
:class:`~kvconf.errors.Problem` with the file and line, instead of a traceback or a hang.

>>> yaml_problems("a: 1\\na: 2\\n", "x.yaml")[0].message
"the key 'a' is written twice in one mapping (YAML keeps the last)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvconf.errors import Problem

__all__ = ["MAX_ALIASES", "MAX_DEPTH", "config_dir_problems", "yaml_problems"]

MAX_ALIASES = 100
"""More alias uses than a config needs; more is refused (aliases can expand exponentially)."""
MAX_DEPTH = 64
"""More nesting than a config needs; deeper is refused (it would exhaust the parser's stack)."""


class _Refused(yaml.YAMLError):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, runaway aliases and deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} alias uses (*name): refused, as they can expand "
                               "without bound", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = key_node.value
            if key in seen and key != "<<":
                raise _Refused(f"the key {key!r} is written twice in one mapping (YAML keeps the last)",
                               key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problems(text: str, label: str) -> list[Problem]:
    """The problem with one YAML text (none, or one: parsing stops at the first)."""
    try:
        loader = _Loader(text)
        try:
            loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as exc:
        return [Problem("", exc.message, location=f"{label}:{exc.mark.line + 1}",
                        fix="fix the file at that line")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        return [Problem("", f"not valid YAML: {getattr(exc, 'problem', None) or exc}", location=where,
                        fix="fix the file at that line")]
    return []


def config_dir_problems(folder: Path) -> list[Problem]:
    """Problems of every YAML file under a ``--config-dir`` folder."""
    out: list[Problem] = []
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            out.append(Problem("", f"cannot be read: {exc.strerror or exc}", location=str(path)))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            out.append(Problem("", f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})",
                               location=f"{path}:{line}", fix="save the file as UTF-8"))
            continue
        out.extend(yaml_problems(text, str(path)))
    return out

"""One safe reader for every YAML and JSON file kvconf is given: a ``--config-dir`` or
``--config-path`` folder's files, ``kvconf validate``'s, ``lint``'s and ``import``'s inputs, the
schemas ``--check`` reads, a model's config.json, results that ``bench-compare`` reads. Such files
come from pull requests and other teams, so
each is read under bounds that real configs never come near and that keep any input to well
under a second and a few megabytes:

==========================  ======================================================================
bound                       why
==========================  ======================================================================
``MAX_FILE_BYTES`` (1 MiB)  the largest config kvconf ships is 2 KiB; read no further
``MAX_STRING_CHARS`` (64Ki) one key or value: a path, a module name, a key file's text
``MAX_DEPTH`` (64)          nesting of lists and mappings (kvconf's deepest config nests 6)
``MAX_NODES`` (20,000)      values after every YAML alias is expanded ("billion laughs": ten
                            aliases of ten aliases of ... expand to 10^n values while the file
                            stays a few hundred bytes); a real config holds a few hundred
==========================  ======================================================================

A file over a bound is :class:`Refused` with the file, the line and the bound; so is text that is
not UTF-8, a control character YAML does not allow, a key written twice in one mapping (YAML keeps
the last, silently) and an alias inside the node it names (a cycle). The bounds are checked on
YAML's event stream (libyaml, in C, where PyYAML has it), before any value is built, so a refusal
costs the bytes read up to the bound, not the expansion.

>>> load_yaml("a: &x [1, 2]\\nb: *x\\n", "f.yaml")
{'a': [1, 2], 'b': [1, 2]}
>>> try:
...     load_yaml("a: 1\\nb: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[" + "]" * 70 + "\\n", "f.yaml")
... except Refused as exc:
...     print(exc)
f.yaml:2: nested more than 64 levels deep (kvconf reads at most 64)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from kvconf.errors import Problem, short

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "MAX_STRING_CHARS", "Refused", "check_json", "check_yaml",
           "check_size", "config_dir_problems", "decode", "load_json", "load_yaml", "read_json", "read_text"]

MAX_FILE_BYTES = 1 << 20
"""Bytes of one file (a config kvconf ships holds at most 2 KiB)."""
MAX_STRING_CHARS = 64 << 10
"""Characters of one key or value."""
MAX_DEPTH = 64
"""Levels of lists and mappings inside each other."""
MAX_NODES = 20_000
"""Values (keys, items, lists and mappings each count one) once every alias is expanded."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML was built with it


class Refused(Exception):
    """An input kvconf will not read: where, what and the bound."""

    def __init__(self, label: str, line: int, message: str, column: int = 1) -> None:
        super().__init__(f"{label}:{line}: {message}")
        self.label, self.line, self.column, self.message = label, line, column, message

    def problem(self, path: str = "") -> Problem:
        """The refusal as one :class:`Problem` (``path``: the config key the file was given for)."""
        return Problem(path, self.message, location=f"{self.label}:{self.line}",
                       fix="fix the file at that line (kvconf's bounds on config files: docs/hostile-inputs.md)")


# ---- reading a file ------------------------------------------------------------------------------


def read_text(path: Path, label: str | None = None) -> str:
    """A file's text: at most :data:`MAX_FILE_BYTES` read, UTF-8 (a byte-order mark dropped), or
    :class:`Refused` with the line of the first byte that is not."""
    label = label or str(path)
    if not Path(path).is_file():  # a FIFO would block the read, a device never end
        raise Refused(label, 1, "is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise Refused(label, 1, f"cannot be read: {exc.strerror or exc}") from None
    check_size(raw, label)
    return decode(raw, label)


def check_size(text: str | bytes, label: str, line: int = 1) -> None:
    """:class:`Refused` where ``text`` (a file's bytes, or text however it came) is over
    :data:`MAX_FILE_BYTES`."""
    if len(text) > MAX_FILE_BYTES:
        raise Refused(label, line, f"is larger than {MAX_FILE_BYTES >> 20} MiB, the most kvconf reads of a config "
                                   "file (the largest it ships is 2 KiB)")


def decode(raw: bytes, label: str) -> str:
    """``raw`` as UTF-8 text, or :class:`Refused` at the line of the first byte that is not."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise Refused(label, line, f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                   "save the file as UTF-8") from None


def read_json(path: Path, label: str | None = None) -> Any:
    """A JSON file's value, read under the bounds."""
    label = label or str(path)
    return load_json(read_text(path, label), label)


# ---- YAML ----------------------------------------------------------------------------------------


def load_yaml(text: str, label: str) -> Any:
    """``text``'s value (one document) once :func:`check_yaml` passes; YAML's own errors are
    :class:`Refused` too, at their line."""
    check_yaml(text, label)
    try:
        return yaml.load(text, Loader=_Loader)  # a safe loader: CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_refusal(exc, text, label) from None
    except (ValueError, OverflowError) as exc:  # a value YAML reads but Python cannot hold
        raise Refused(label, 1, f"holds a value Python cannot read: {str(exc)[:120]}") from None


def check_yaml(text: str, label: str) -> None:
    """:class:`Refused` where ``text`` is over a bound, repeats a key in a mapping, holds a cycle
    of aliases or does not parse; reads YAML's events, never builds a value."""
    check_size(text, label)
    loader = _Loader(text)
    try:
        _walk(loader, label)
    except yaml.YAMLError as exc:
        raise _yaml_refusal(exc, text, label) from None
    finally:
        loader.dispose()


_DIGITS = re.compile(r"[-+]?(?:[0-9_]+(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|0x[0-9a-fA-F_]+|0o?[0-7_]+|0b[01_]+)")
"""A plain scalar YAML may read as a number (the digits alone bound it: Python reads at most 4,300)."""


class _Frame:
    __slots__ = ("anchor", "keys", "key_next", "mapping", "start")

    def __init__(self, mapping: bool, anchor: str | None, start: int) -> None:
        self.mapping, self.anchor, self.start = mapping, anchor, start
        self.key_next = True
        self.keys: set[str] = set()


def _walk(loader: Any, label: str) -> None:
    expanded = 0  # values so far, every alias counted as the values it stands for
    sizes: dict[str, int] = {}  # anchor -> values of the node it names
    open_anchors: set[str] = set()
    stack: list[_Frame] = []
    aliases = 0

    def where(event: Any) -> tuple[int, int]:
        mark = event.start_mark
        return mark.line + 1, mark.column + 1

    def refuse(event: Any, message: str) -> Refused:
        line, col = where(event)
        return Refused(label, line, message, col)

    def value_done(event: Any, key: str | None) -> None:
        """A complete value in the innermost collection: a key's duplicate is refused."""
        if not stack or not stack[-1].mapping:
            return
        frame = stack[-1]
        if frame.key_next and key is not None:
            if key in frame.keys and key != "<<":
                raise refuse(event, f"the key {short(key, 60)} is written twice in one mapping (YAML keeps the last)")
            frame.keys.add(key)
        frame.key_next = not frame.key_next

    while loader.check_event():
        event = loader.get_event()
        if isinstance(event, yaml.ScalarEvent):
            if len(event.value) > MAX_STRING_CHARS:
                raise refuse(event, f"a value of {len(event.value):,} characters: more than the {MAX_STRING_CHARS:,} "
                                    "kvconf reads of one key or value")
            if not event.style and len(event.value) > 100 and _DIGITS.fullmatch(event.value):
                raise refuse(event, f"a number of {len(event.value):,} digits: no config value is that long")
            expanded += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
            value_done(event, event.value)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise refuse(event, f"the alias *{event.anchor} is inside the node it names (a cycle)")
            aliases += 1
            expanded += sizes.get(event.anchor or "", 1)  # an undefined one: YAML's own error, when it is read
            value_done(event, None)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise refuse(event, f"nested more than {MAX_DEPTH} levels deep (kvconf reads at most {MAX_DEPTH})")
            stack.append(_Frame(isinstance(event, yaml.MappingStartEvent), event.anchor, expanded))
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            expanded += 1
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            frame = stack.pop()
            if frame.anchor is not None:
                open_anchors.discard(frame.anchor)
                sizes[frame.anchor] = expanded - frame.start
            value_done(event, None)
        if expanded > MAX_NODES:
            if aliases:
                raise refuse(event, f"holds more than {MAX_NODES:,} values once its aliases (*name) are expanded "
                                    "(the most kvconf reads of a config): refused, as aliases of aliases grow "
                                    "without bound")
            raise refuse(event, f"holds more than {MAX_NODES:,} values, the most kvconf reads of a config (a real one "
                                "holds a few hundred)")


def _yaml_refusal(exc: yaml.YAMLError, text: str, label: str) -> Refused:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        line, col = mark.line + 1, mark.column + 1
    elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        at = min(max(int(exc.position), 0), len(text))
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return Refused(label, line, f"holds a control character ({what}) that YAML does not allow; write it "
                                    "escaped in a double-quoted string (\"\\x01\") or remove it", col)
    else:
        line, col = 1, 1
    problem = str(getattr(exc, "problem", None) or str(exc).splitlines()[0])
    if "nesting depth" in problem:  # libyaml's own bound (1,000), met before a value is read
        return Refused(label, line, f"nested more than {MAX_DEPTH} levels deep (kvconf reads at most {MAX_DEPTH})", col)
    return Refused(label, line, f"not valid YAML: {problem}", col)


# ---- JSON ----------------------------------------------------------------------------------------

_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{},]|[0-9]{101,}', re.DOTALL)  # possessive: no backtracking


def load_json(text: str, label: str) -> Any:
    """``text``'s value once :func:`check_json` passes; JSON's own errors are :class:`Refused`
    too, at their line."""
    check_json(text, label)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Refused(label, exc.lineno, f"not valid JSON: {exc.msg}", exc.colno) from None
    except (ValueError, RecursionError) as exc:  # what the bounds above already keep out
        raise Refused(label, 1, f"holds a value Python cannot read: {str(exc)[:120]}") from None
    count, todo = 0, [value]
    while todo:
        v = todo.pop()
        count += 1
        if isinstance(v, dict):
            todo.extend(v.values())
            count += len(v)
        elif isinstance(v, list):
            todo.extend(v)
        if count > MAX_NODES:
            raise Refused(label, 1, f"holds more than {MAX_NODES:,} values, the most kvconf reads of a config")
    return value


def check_json(text: str, label: str, line_of: Any = None) -> None:
    """:class:`Refused` where ``text`` is larger, nests deeper or holds a longer string than the
    bounds; ``line_of(offset)`` maps an offset to the line of the file ``text`` was cut from."""
    line_at = line_of or (lambda i: text.count("\n", 0, i) + 1)
    check_size(text, label, line_at(0))
    depth, values = 0, 1
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{,":
            values += 1
            if values > MAX_NODES:
                raise Refused(label, line_at(m.start()), f"holds more than {MAX_NODES:,} values, the most kvconf reads "
                                                         "of a config")
            if c != ",":
                depth += 1
                if depth > MAX_DEPTH:
                    raise Refused(label, line_at(m.start()), f"nested more than {MAX_DEPTH} levels deep "
                                                             f"(kvconf reads at most {MAX_DEPTH})")
        elif c in "]}":
            depth -= 1
        elif c[0] != '"':
            raise Refused(label, line_at(m.start()), f"a number of {len(c):,} digits: no config value is that long")
        elif len(c) - 2 > MAX_STRING_CHARS:
            raise Refused(label, line_at(m.start()), f"a string of {len(c) - 2:,} characters: more than the "
                                                     f"{MAX_STRING_CHARS:,} kvconf reads of one key or value")


# ---- a --config-dir folder -----------------------------------------------------------------------


def config_dir_problems(folder: Path) -> list[Problem]:
    """One :class:`Problem` for each YAML file under a ``--config-dir`` folder that kvconf will
    not read (checked before Hydra reads any of them)."""
    out: list[Problem] = []
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            load_yaml(read_text(path), str(path))  # checked, then built: a tag YAML cannot build is refused too
        except Refused as exc:
            out.append(exc.problem())
    return out

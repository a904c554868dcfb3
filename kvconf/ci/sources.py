"""Where ``--kv-transfer-config`` values are, and what they say, with the file line of every key.

A value comes as a JSON string on the command line, a file holding one, standard input, or a file
in which ``--kv-transfer-config`` appears among other text: a launch script (``'{...}'``,
``="{\\"kv_connector\\": ...}"``) or a Kubernetes manifest's ``args``/``command`` (the value on the
same line or the next list item, escaped or not). :func:`parse` reads JSON as vLLM does (bare
``80m``/``4G`` numbers expanded, as ``--kv-transfer-config`` allows) and records where each key is,
so that a problem is reported at its own line.

>>> doc = parse('{"kv_connector": "NixlConnector",\\n "kv_role": "kv_both"}')
>>> doc.value["kv_role"], doc.line_of(("kv_role",))
('kv_both', 2)
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FLAG", "Document", "JSONSyntaxError", "Source", "extract", "parse"]

FLAG = "--kv-transfer-config"

Path = tuple[Any, ...]

_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT])(?![A-Za-z0-9_])")
_WS = " \t\r\n"


class JSONSyntaxError(ValueError):
    """Not JSON: where and why."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass
class Document:
    """A parsed JSON value, with the position of each key."""

    value: Any
    positions: dict[Path, int]
    """Key path -> offset (into the raw text) of the key, or of a list item."""
    duplicates: list[Path] = field(default_factory=list)
    """Key paths written more than once in one object (JSON keeps the last)."""
    line_of_offset: Callable[[int], int] = lambda offset: 1

    def line_of(self, path: Path) -> int:
        """The line of ``path``'s key, or of its nearest enclosing key."""
        p = tuple(path)
        while p and p not in self.positions:
            p = p[:-1]
        return self.line_of_offset(self.positions.get(p, 0))


class _Parser:
    def __init__(self, text: str, raw_offset: Callable[[int], int]) -> None:
        self.s = text
        self.i = 0
        self.raw = raw_offset
        self.positions: dict[Path, int] = {}
        self.duplicates: list[Path] = []

    def error(self, message: str) -> JSONSyntaxError:
        return JSONSyntaxError(message, self.raw(min(self.i, max(len(self.s) - 1, 0))))

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _WS:
            self.i += 1

    def value(self, path: Path) -> Any:
        self.ws()
        if self.i >= len(self.s):
            raise self.error("unexpected end of the JSON text")
        c = self.s[self.i]
        if c == "{":
            return self.obj(path)
        if c == "[":
            return self.arr(path)
        if c == '"':
            return self.string()
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        m = _SIZE.match(self.s, self.i)  # vLLM expands bare 80m / 4G outside strings
        if m:
            self.i = m.end()
            return int(float(m.group(1)) * _UNITS[m.group(2)])
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            text = m.group(0)
            return float(text) if any(ch in text for ch in ".eE") else int(text)
        raise self.error(f"unexpected character {c!r}")

    def obj(self, path: Path) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            if not self.s.startswith('"', self.i):
                raise self.error("expected a key in double quotes")
            at = self.raw(self.i)
            key = self.string()
            self.ws()
            if not self.s.startswith(":", self.i):
                raise self.error(f"expected ':' after the key {key!r}")
            self.i += 1
            if key in out:
                self.duplicates.append(path + (key,))
            self.positions[path + (key,)] = at
            out[key] = self.value(path + (key,))
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith("}", self.i):
                self.i += 1
                return out
            raise self.error("expected ',' or '}'")

    def arr(self, path: Path) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        self.ws()
        if self.s.startswith("]", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            self.positions[path + (len(out),)] = self.raw(self.i)
            out.append(self.value(path + (len(out),)))
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith("]", self.i):
                self.i += 1
                return out
            raise self.error("expected ',' or ']'")

    def string(self) -> str:
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise self.error("unterminated string")
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c == "\\":
                nxt = self.s[self.i + 1:self.i + 2]
                simple = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
                if nxt in simple:
                    out.append(simple[nxt])
                    self.i += 2
                    continue
                if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", self.s[self.i + 2:self.i + 6]):
                    out.append(chr(int(self.s[self.i + 2:self.i + 6], 16)))
                    self.i += 6
                    continue
                raise self.error("invalid escape in a string")
            if ord(c) < 0x20:
                raise self.error("control character in a string")
            out.append(c)
            self.i += 1


def _line_function(raw: str) -> Callable[[int], int]:
    starts = [0] + [m.end() for m in re.finditer("\n", raw)]
    return lambda offset: bisect_right(starts, offset)


def parse(text: str, raw: str | None = None, raw_offset: Callable[[int], int] | None = None) -> Document:
    """``text`` parsed as one JSON value; ``raw``/``raw_offset`` map positions back to the file
    ``text`` was cut from. A :class:`JSONSyntaxError` (with the raw offset) when it is not JSON."""
    to_raw = raw_offset or (lambda i: i)
    p = _Parser(text, to_raw)
    value = p.value(())
    p.ws()
    if p.i != len(text):
        raise p.error("extra text after the JSON value")
    return Document(value, p.positions, p.duplicates, _line_function(raw if raw is not None else text))


@dataclass
class Source:
    """One ``--kv-transfer-config`` value found in an input."""

    label: str
    """The file (``-`` for standard input, ``<arg N>`` for a JSON argument)."""
    line: int
    """The line where the value starts."""
    text: str
    """The JSON text (unescaped)."""
    raw: str
    """The whole input, for line numbers."""
    offsets: list[int] | None = None
    """Raw offset of each character of ``text``, where it was unescaped; else ``text`` starts at
    ``start`` and runs as written."""
    start: int = 0

    def raw_offset(self, i: int) -> int:
        if self.offsets is not None:
            return self.offsets[min(i, len(self.offsets) - 1)] if self.offsets else self.start
        return self.start + i

    def parse(self) -> Document:
        return parse(self.text, self.raw, self.raw_offset)


_PLAIN = re.compile(r'"(?:[^"\\]++|\\.)*+"|[{}]', re.DOTALL)
"""A JSON string (skipped whole) or a brace."""
_ESCAPED = re.compile(r'\\"(?:[^\\]++|\\\\\\"|\\[^"])*+\\"|[{}]', re.DOTALL)
"""The same where the JSON sits in a double-quoted shell or YAML string: its quotes are ``\\"``, a
quote inside one of its strings ``\\\\\\"``."""


def _balanced(raw: str, start: int, escaped: bool, stop: int | None = None) -> int | None:
    """The offset just past the object that starts at ``raw[start] == "{"`` and ends before
    ``stop``, or None."""
    depth = 0
    for m in (_ESCAPED if escaped else _PLAIN).finditer(raw, start, len(raw) if stop is None else stop):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def _unescape(raw: str, start: int, end: int) -> tuple[str, list[int]]:
    """A double-quoted shell or YAML string's backslash escapes undone, keeping each character's
    raw offset."""
    out: list[str] = []
    offsets: list[int] = []
    i = start
    while i < end:
        if raw[i] == "\\" and i + 1 < end and raw[i + 1] in '"\\':
            out.append(raw[i + 1])
            offsets.append(i)
            i += 2
            continue
        out.append(raw[i])
        offsets.append(i)
        i += 1
    return "".join(out), offsets


MAX_VALUES = 64
"""``--kv-transfer-config`` values read from one input (a launch script holds a few)."""


def extract(raw: str, label: str) -> tuple[list[Source], list[tuple[int, str]]]:
    """The values in ``raw``: the whole text when it is one JSON object, else each one that follows
    ``--kv-transfer-config``; and ``(line, why)`` for each occurrence whose value is not a JSON
    literal (a shell variable, say), which cannot be checked."""
    line_of = _line_function(raw)
    stripped = raw.lstrip()
    if stripped.startswith(("{", "[")):
        start = len(raw) - len(stripped)
        return [Source(label, line_of(start), raw[start:].rstrip(), raw, start=start)], []
    sources: list[Source] = []
    skipped: list[tuple[int, str]] = []
    flags = list(re.finditer(re.escape(FLAG) + r"(?![\w.-])", raw))
    for n, m in enumerate(flags):
        stop = flags[n + 1].start() if n + 1 < len(flags) else len(raw)  # a value ends before the next flag
        if len(sources) + len(skipped) >= MAX_VALUES:
            skipped.append((line_of(m.start()), f"more than {MAX_VALUES} {FLAG} values in one input: kvconf reads "
                                                "no further (split the file)"))
            break
        i = m.end()
        # past '=', spaces, a line break, quotes, a YAML list item's "- ", a flow list's ", " and a
        # block scalar's "|" or ">"
        while i < len(raw) and raw[i] in " \t=\r\n'\",-\\[|>":
            i += 1
        if i >= len(raw) or raw[i] != "{":
            rest = raw[i:].split("\n", 1)[0].strip()[:40]
            skipped.append((line_of(m.start()), f"the value after {FLAG} is not a JSON literal ({rest or 'nothing'})"))
            continue
        after = raw[i + 1:].lstrip(" \t\r\n")
        escaped = after.startswith('\\"')
        end = _balanced(raw, i, escaped, stop)
        if end is None:
            sources.append(Source(label, line_of(i), raw[i:stop], raw, start=i))  # the parser says what is wrong
            continue
        if escaped:
            text, offsets = _unescape(raw, i, end)
            sources.append(Source(label, line_of(i), text, raw, offsets=offsets, start=i))
        else:
            sources.append(Source(label, line_of(i), raw[i:end], raw, start=i))
    return sources, skipped

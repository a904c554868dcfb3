"""kvconf's exceptions: one root, leaves that also subclass the builtin they replace.

Every error carries one or more :class:`Problem` records (config path, value, what is allowed, the
fix) and renders them the same way, the path on its own line::

    >>> err = ConfigError([Problem("connector.kv_role", "unsupported kv_role", value="kv_prod",
    ...                            allowed=("kv_producer", "kv_consumer", "kv_both"))])
    >>> print(err.render())
    kvconf: config error
      connector.kv_role
        unsupported kv_role
        value: 'kv_prod'
        allowed: kv_producer, kv_consumer, kv_both
        did you mean: kv_producer?
    >>> isinstance(err, ValueError), err.exit_code
    (True, 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "ConnectorRuntimeError",
    "ContractError",
    "KVConfError",
    "Problem",
    "did_you_mean",
    "short",
    "shown",
]


class _Missing:
    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "<missing>"


MISSING: Any = _Missing()


def short(value: Any, limit: int = 120) -> str:
    r"""``value`` as a message shows it: its ``repr`` (a string holding control characters or
    bytes that were not UTF-8 shown in ASCII escapes, never sent to the terminal as they are), cut
    to ``limit`` characters with its length said.

    >>> short("a" * 500, 20)
    "'aaaaaaaaaaaaaaaaa... (500 characters)"
    >>> print(short("x\x1b[2J"))
    'x\x1b[2J'
    """
    text = ascii(value) if isinstance(value, str) and not value.isprintable() else repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return text[: limit - 2] + "..." + size


def shown(text: str, limit: int = 200) -> str:
    r"""``text`` (a config path, a key) as a message shows it: as it is where printable, else in
    ASCII escapes (without quotes); cut to ``limit`` characters.

    >>> shown("connector.kv\x1brole")
    'connector.kv\\x1brole'
    """
    out = text if text.isprintable() else ascii(text)[1:-1]
    return out if len(out) <= limit else out[: limit - 3] + "..."


def did_you_mean(value: object, allowed: Iterable[object]) -> str | None:
    """The closest allowed spelling of ``value``, if one is close enough.

    >>> did_you_mean("kv_prodcuer", ["kv_producer", "kv_consumer", "kv_both"])
    'kv_producer'
    >>> did_you_mean("zzz", ["a", "b"]) is None
    True
    """
    if not isinstance(value, str) or len(value) > 200:  # no spelling of a name is that long
        return None
    import difflib  # only where a value is wrong

    choices = [str(a) for a in allowed]
    matches = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        return lowered.get(value.lower())
    return matches[0]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config or a connector class."""

    path: str
    """Dotted config path (``connector.kv_role``); empty for the config as a whole."""
    message: str
    """What is wrong, in one sentence."""
    value: Any = MISSING
    """The offending value, where there is one."""
    allowed: Sequence[Any] | None = None
    """The values or keys that would be accepted."""
    fix: str | None = None
    """How to fix it."""
    location: str | None = None
    """``file:line`` where the value was written, where known."""
    details: tuple[str, ...] = field(default_factory=tuple)
    """Extra lines shown under the message (a signature found, the numbers of a plan)."""
    typo: Any = MISSING
    """What to match against ``allowed`` for a did-you-mean: the value, or a misspelt key."""

    def suggestion(self) -> str | None:
        probe = self.value if self.typo is MISSING else self.typo
        if self.allowed is None or probe is MISSING:
            return None
        hint = did_you_mean(probe, self.allowed)
        return hint if hint is not None and hint != probe else None

    def render(self) -> str:
        lines = [f"  {shown(self.path) or '<config>'}"]
        if self.location:
            lines.append(f"    at {self.location}")
        lines.append(f"    {self.message}")
        lines.extend(f"    {d}" for d in self.details)
        if self.value is not MISSING:
            lines.append(f"    value: {short(self.value, 200)}")
        if self.allowed is not None:
            lines.append(f"    allowed: {', '.join(str(a) for a in self.allowed)}")
        hint = self.suggestion()
        if hint is not None:
            lines.append(f"    did you mean: {hint}?")
        if self.fix:
            lines.append(f"    fix: {self.fix}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "message": self.message}
        if self.value is not MISSING:
            value = self.value if _jsonable(self.value) else repr(self.value)
            out["value"] = short(value, 200) if isinstance(value, str) and len(value) > 200 else value
        if self.allowed is not None:
            out["allowed"] = [str(a) for a in self.allowed]
        hint = self.suggestion()
        if hint is not None:
            out["did_you_mean"] = hint
        if self.fix:
            out["fix"] = self.fix
        if self.location:
            out["location"] = self.location
        if self.details:
            out["details"] = list(self.details)
        return out


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


class KVConfError(Exception):
    """Root of kvconf's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    kind = "error"

    def __init__(self, problems: Problem | Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"kvconf: {self.kind}" + (f" ({n} problems)" if n > 1 else "")
        return "\n".join([head, *(p.render() for p in self.problems)])

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "exit_code": self.exit_code,
            "problems": [p.as_dict() for p in self.problems],
        }


class ConfigError(KVConfError, ValueError):
    """The composed config does not validate (exit 2)."""

    exit_code = 2
    kind = "config error"


class ContractError(KVConfError, ValueError):
    """The connector class cannot be constructed as ``cls(config, role, kv_cache_config)`` (exit 2)."""

    exit_code = 2
    kind = "contract error"


class ConnectorRuntimeError(KVConfError, RuntimeError):
    """Something failed after the contract held: allocation, construction, the action (exit 1)."""

    exit_code = 1
    kind = "runtime error"

"""Byte sizes written with units (``2GiB``, ``512MiB``, ``1.5GB``, ``4096``).

Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal units (kB, MB, GB, TB) powers of
1000, as in IEC 80000-13; a bare ``K``/``M``/``G``/``T`` is binary, as vLLM's ``4G`` is.

>>> parse_bytes("2GiB")
2147483648
>>> parse_bytes("1.5 MB")
1500000
>>> parse_bytes(4096)
4096
>>> format_bytes(2 * 1024**2)
'2 MiB'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Union

from pydantic import AfterValidator, Field, PositiveInt

from kvconf.errors import short

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "p": 1024**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "pi": 1024**5,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
UNITS_HELP = "an integer number of bytes, or a number with a unit: B, KiB, MiB, GiB, TiB, PiB, kB, MB, GB, TB, PB"
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtTpP][iI]?[bB]?|[bB])?\s*$"
"""What a size written as a string looks like (the same in pydantic and the JSON Schema)."""

ByteSize = Union[PositiveInt, Annotated[str, Field(pattern=SIZE_PATTERN)]]
"""A positive number of bytes, or a string such as ``2GiB``."""


def _positive_size(value: int | str) -> int | str:
    if parse_bytes(value) <= 0:
        raise ValueError(f"must be a positive size: {UNITS_HELP}")
    return value


PositiveByteSize = Annotated[ByteSize, AfterValidator(_positive_size)]
"""A :data:`ByteSize` that is above zero once parsed (``0GiB`` is not)."""

MAX_MEMORY_BYTES = 64 * 1024**4
"""More memory than one machine holds (the largest sold hold a few tens of TiB): a KV cache, a
host tier or a transfer above it is a typo or a unit slip (``1024TiB``), refused as a config
error. A size this machine lacks but a larger one has is reported where it matters, not refused."""
MAX_DISK_BYTES = 64 * 1024**5
"""More storage than a KV-cache tier is ever given (64 PiB: the largest parallel filesystems hold
a few hundred PB for thousands of jobs)."""


def _at_most(limit: int, what: str) -> Callable[[int | str], int | str]:
    def check(value: int | str) -> int | str:
        size = parse_bytes(value)
        if size <= 0:
            raise ValueError(f"must be a positive size: {UNITS_HELP}")
        if size > limit:
            raise ValueError(f"{format_bytes(size)} is more than {what} (kvconf's bound: {format_bytes(limit)}); "
                             "give the size for the machine it runs on")
        return value

    return check


MemoryBytes = Annotated[ByteSize, AfterValidator(_at_most(MAX_MEMORY_BYTES, "any one machine's memory"))]
"""A positive size of memory, at most :data:`MAX_MEMORY_BYTES`."""
DiskBytes = Annotated[ByteSize, AfterValidator(_at_most(MAX_DISK_BYTES, "a KV-cache tier's storage is ever given"))]
"""A positive size of storage, at most :data:`MAX_DISK_BYTES`."""


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string with a unit; ``ValueError`` names what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"expected {UNITS_HELP}, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {UNITS_HELP}, got {type(value).__name__}")
    m = _SIZE.match(value) if len(value) <= 64 else None
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected {UNITS_HELP}, got {short(value, 60)}")
    if len(m.group(1)) > 24:  # more digits than any size in bytes (10**24 B is a million EB)
        raise ValueError(f"{short(value, 60)}: a number of {len(m.group(1))} digits is no size")
    number, unit = float(m.group(1)), _UNITS[m.group(2).lower()]
    result = number * unit
    if not result.is_integer():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(result)


def format_bytes(n: int) -> str:
    """The largest binary unit that keeps ``n`` exact to two decimals."""
    for unit, size in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            q = n / size
            return f"{q:.0f} {unit}" if q.is_integer() else f"{q:.2f} {unit}"
    return f"{n} B"

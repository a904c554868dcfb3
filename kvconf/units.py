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
from typing import Annotated, Union

from pydantic import AfterValidator, Field, PositiveInt

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
UNITS_HELP = "an integer number of bytes, or a number with a unit: B, KiB, MiB, GiB, TiB, kB, MB, GB, TB"
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT][iI]?[bB]?|[bB])?\s*$"
"""What a size written as a string looks like (the same in pydantic and the JSON Schema)."""

ByteSize = Union[PositiveInt, Annotated[str, Field(pattern=SIZE_PATTERN)]]
"""A positive number of bytes, or a string such as ``2GiB``."""


def _positive_size(value: int | str) -> int | str:
    if parse_bytes(value) <= 0:
        raise ValueError(f"must be a positive size: {UNITS_HELP}")
    return value


PositiveByteSize = Annotated[ByteSize, AfterValidator(_positive_size)]
"""A :data:`ByteSize` that is above zero once parsed (``0GiB`` is not)."""


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
    m = _SIZE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected {UNITS_HELP}, got {value!r}")
    number, unit = float(m.group(1)), _UNITS[m.group(2).lower()]
    result = number * unit
    if not result.is_integer():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(result)


def format_bytes(n: int) -> str:
    """The largest binary unit that keeps ``n`` exact to two decimals."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            q = n / size
            return f"{q:.0f} {unit}" if q.is_integer() else f"{q:.2f} {unit}"
    return f"{n} B"

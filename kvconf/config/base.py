"""The base of every kvconf config model: strict, frozen, unknown keys rejected.

Strict so that what pydantic accepts is what the JSON Schemas accept (``kv_port: "14579"`` is an
error in both); frozen so that a validated config cannot drift; ``extra="forbid"`` so that a
misspelt key is an error rather than silently ignored.

>>> class Port(StrictModel):
...     port: int
>>> Port(port=1).port
1
>>> Port(port="1")
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for Port
...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A strict, frozen pydantic model that forbids unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

"""pydantic's validation errors told as kvconf's :class:`~kvconf.errors.Problem` records: clean
dotted config paths (never a union tag), the value, what is allowed, did-you-mean and the fix.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Tag, ValidationError

from kvconf.errors import MISSING, Problem, short
from kvconf.units import SIZE_PATTERN, UNITS_HELP

from .kvcache import KVCacheInvariantError

__all__ = ["BOUNDS", "problems_from_validation_error"]

BOUNDS = {
    "head_size": "no model's heads come near it (the largest is 576, DeepSeek's MLA latent)",
    "head_size_v": "no model's heads come near it (the largest is 576, DeepSeek's MLA latent)",
    "num_kv_heads": "no model has that many KV heads (the largest have 128)",
    "num_layers": "no model has that many layers (the largest have a few hundred)",
    "num_blocks": "vLLM's block ids are 32-bit",
    "block_size": "more tokens per block than any engine uses",
    "max_model_len": "vLLM's positions are 32-bit",
    "size": "more memory than one machine holds",
}
"""Why each of kvconf's bounds on a size is where it is, by the key's name."""


def problems_from_validation_error(exc: ValidationError, model: type[BaseModel], data: Any,
                                   prefix: str = "") -> list[Problem]:
    """One :class:`Problem` per pydantic error, with clean dotted paths and allowed values."""
    problems: list[Problem] = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, KVCacheInvariantError):
            problems.extend(inner.problems)
            continue
        loc = tuple(err["loc"])
        path_parts = _clean_loc(loc, data, err["type"])
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + path_parts)
        etype, msg = err["type"], err["msg"]
        value: Any = err.get("input", MISSING)
        allowed = None
        fix = None
        typo: Any = MISSING
        if etype == "extra_forbidden":
            typo = path_parts[-1]
            allowed = sorted(_fields_at(model, loc[:-1]) or [])
            msg = f"unknown key {short(path_parts[-1], 80)}"
            fix = "remove it or correct its spelling"
        elif etype == "missing":
            msg = "required key is missing"
            value = MISSING
            fix = f"set {path}=..."
        elif etype in ("literal_error", "enum"):
            allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
            msg = "value is not one of the allowed values"
            fix = f"set {path} to one of the allowed values"
        elif etype == "union_tag_invalid":
            allowed = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
            value = ctx.get("tag", value)
            path = f"{path}.type" if path else "type"
            msg = "unknown type"
            fix = f"set {path} to one of the allowed types"
        elif etype == "value_error":
            msg = msg.removeprefix("Value error, ")
            if "; fix: " in msg:  # a validator's message that says how to fix it
                msg, fix = msg.split("; fix: ", 1)
            m = re.search(r"allowed: (.*)$", msg)
            if m:
                allowed = [a.strip() for a in m.group(1).split(",")]
                msg = msg[: m.start()].rstrip("; ")
        elif etype in ("less_than_equal", "less_than") and path_parts and str(path_parts[-1]) in BOUNDS:
            bound = ctx.get("le", ctx.get("lt"))
            msg = f"{short(value, 40)} is above kvconf's bound of {bound:,}: {BOUNDS[str(path_parts[-1])]}"
            fix = f"give {path} at most {bound:,} (a value for a real model and machine)"
        else:
            expected = _expected_type(etype)
            if expected:
                fix = f"give {path} {expected}"
        size_msg, size_fix = f"not a size: expected {UNITS_HELP}", f"give {path} a size such as 2GiB"
        if etype == "string_pattern_mismatch" and ctx.get("pattern") == SIZE_PATTERN:
            msg, fix = size_msg, size_fix
        if problems and problems[-1].path == path and problems[-1].value == value:
            prev = problems[-1]  # another branch of the same union: one problem
            if size_msg in (msg, prev.message):
                problems[-1] = Problem(path, size_msg, value=value, fix=size_fix)
            elif msg not in prev.message:
                problems[-1] = Problem(path, f"{prev.message}; or {msg}", value=value, allowed=prev.allowed, fix=prev.fix)
            continue
        problems.append(Problem(path, msg, value=value, allowed=allowed, fix=fix, typo=typo))
    return problems


def _expected_type(etype: str) -> str | None:
    for key, text in (("int", "an integer"), ("float", "a number"), ("bool", "true or false"),
                      ("string", "a string"), ("list", "a list"), ("dict", "a mapping"),
                      ("greater_than", "a larger value"), ("less_than", "a smaller value"),
                      ("too_short", "more items")):
        if key in etype:
            return text
    return None


def _clean_loc(loc: tuple, data: Any, etype: str) -> tuple:
    """Drop union tags from a pydantic location by walking the input data alongside it."""
    out = []
    cur = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif last and etype in ("missing", "extra_forbidden"):
            out.append(part)
        # else: a union tag such as 'compact', 'full_attention' or 'constrained-str': not part of the path
    return tuple(out)


def _fields_at(model: Any, loc: tuple) -> list[str] | None:
    """Field names of the model found by following ``loc`` (with its union tags) from ``model``."""
    ann: Any = model
    for part in loc:
        ann = _unwrap(ann)
        members = _union_members(ann)
        if members is not None:  # this part is the union tag
            ann = members.get(part)
            if ann is None:
                return None
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            ann = field.annotation
        elif typing.get_origin(ann) is list and isinstance(part, int):
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) is dict:
            ann = typing.get_args(ann)[1]
        else:
            return None
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return list(ann.model_fields)
    return None


def _unwrap(ann: Any) -> Any:
    """Strip Annotated and Optional."""
    while True:
        if typing.get_origin(ann) is Annotated and not any(
                isinstance(m, Discriminator) for m in typing.get_args(ann)[1:]):
            ann = typing.get_args(ann)[0]
            continue
        if typing.get_origin(ann) in (Union, types.UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(members) == 1:
                ann = members[0]
                continue
        return ann


def _union_members(ann: Any) -> dict[Any, Any] | None:
    """``tag -> member`` for a tagged union (pydantic puts the tag in error locations), else None."""
    if typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) not in (Union, types.UnionType):
        return None
    out = {}
    for m in typing.get_args(ann):
        meta = typing.get_args(m)[1:] if typing.get_origin(m) is Annotated else ()
        base = typing.get_args(m)[0] if meta else m
        for x in meta:
            if isinstance(x, Tag):
                out[x.tag] = base
        if isinstance(base, type) and issubclass(base, BaseModel) and "type" in base.model_fields:
            out[base.model_fields["type"].default] = base
    return out

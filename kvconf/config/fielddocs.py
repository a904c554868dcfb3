"""Field docstrings (the string literal under each field) as field descriptions, on demand.

The config models keep their documentation as docstrings under each field, the way vLLM's config
classes do. Reading them costs a parse of the source, so the models do not do it at import time
(it would slow every command down); ``--help`` and the JSON Schema generator call :func:`document`
first, which copies each docstring into the field's description and rebuilds the models.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from typing import Any

from pydantic import BaseModel

__all__ = ["document", "field_docs"]


def field_docs(cls: type) -> dict[str, str]:
    """``field -> docstring`` for a class and its bases (a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is BaseModel or not isinstance(klass, type):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


def _models_in(ann: Any, out: list[type[BaseModel]], seen: set[type]) -> None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if ann not in seen:
            seen.add(ann)
            for f in ann.model_fields.values():
                _models_in(f.annotation, out, seen)
            out.append(ann)  # after its children
        return
    for arg in typing.get_args(ann):
        _models_in(arg, out, seen)


def document(*roots: Any) -> None:
    """Copies field docstrings into descriptions for ``roots`` and every model they contain."""
    models: list[type[BaseModel]] = []
    seen: set[type] = set()
    for r in roots:
        _models_in(r, models, seen)
    for m in models:
        if getattr(m, "__kvconf_documented__", False):
            continue
        docs = field_docs(m)
        changed = False
        for name, f in m.model_fields.items():
            if f.description is None and name in docs:
                f.description = docs[name]
                changed = True
        setattr(m, "__kvconf_documented__", True)  # noqa: B010  (a mark of kvconf's, not a model field)
        if changed:
            m.model_rebuild(force=True)

"""``--help`` text, generated from the config models' field docstrings (never written twice)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["describe", "help_template"]

_SHOWN_ELSEWHERE = ("connector", "kv_cache", "self_test", "bench", "export")
"""Top-level keys whose fields get a section of their own."""


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(ann) if a is not type(None)) + (
            " | null" if type(None) in typing.get_args(ann) else "")
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(ann, "__name__", str(ann))


def describe(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """One entry per field: ``prefix.name  type = default`` and its docstring, indented."""
    lines = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        default = "" if f.default is PydanticUndefined else f" = {f.default!r}"
        if f.default_factory is not None:
            default = ""
        required = " (required)" if f.is_required() else ""
        lines.append(f"  {prefix}{name}: {_type_name(f.annotation)}{default}{required}")
        for doc_line in f.description.split("\n") if f.description else ():
            lines.append(f"      {doc_line.strip()}")
    return lines


def _own_connector(module_path: str, name: str | None) -> tuple[str, Any, list[str]]:
    """(title, extra model or None, lines instead of the model's) of a ``connector.module_path``
    class: its module is imported, as ``python -m kvconf`` with that override imports it."""
    from kvconf.contract.registry import resolve
    from kvconf.errors import KVConfError

    title = f"== connector.extra.* of connector.module_path={module_path} connector.name={name} =="
    if not name:
        return title, None, ["  (give connector.name=CLASS too: the class in that module whose settings to list)"]
    try:
        cls = resolve(name, module_path).target
    except KVConfError as exc:
        return title, None, [f"  unknown: {p.path}: {p.message}" for p in exc.problems]
    model = getattr(cls, "extra_config", None)
    if model is None:
        return title, None, [f"  {name} has no extra_config: connector.extra is free-form, passed as a dict"]
    return title, model, []


def help_template(subcommands: dict[str, tuple[str, str]], own: tuple[str, str | None] | None = None) -> str:
    """Hydra's help template for kvconf ($APP_CONFIG_GROUPS and $CONFIG are Hydra's):
    every key, each built-in connector's ``connector.extra.*`` and the ``subcommands``
    (name -> (module, what it does)). ``own``: (module_path, class name) of a connector of one's
    own, whose settings are listed instead of the built-in connectors'."""
    from kvconf.config.fielddocs import document
    from kvconf.config.layout import FullAttentionGroup, KVCacheLayout, MambaGroup, MLAGroup, SlidingWindowGroup
    from kvconf.config.models import BenchConfig, ConnectorConfig, ExportConfig, KVConfConfig, SelfTestConfig
    from kvconf.contract.registry import builtin_extra_models

    own_part: list[str] = []
    if own is not None:
        title, model, lines = _own_connector(*own)
        extras = {}
        if model is not None:
            document(model)
            lines = describe(model, "connector.extra.")
        own_part = [title, *lines, ""]
    else:
        extras = builtin_extra_models()
    document(KVConfConfig, FullAttentionGroup, SlidingWindowGroup, MLAGroup, MambaGroup, *extras.values())

    parts = [
        "${hydra.help.header}",
        "",
        "Usage: python -m kvconf [group=option ...] [key=value ...] [-m] [--cfg job] [--info] [--config-dir DIR]",
        "       kvconf SUBCOMMAND ...      (kvconf SUBCOMMAND --help for its own flags)",
        "       kvconf --version",
        "Examples:",
        "  python -m kvconf connector=example role=worker",
        "  python -m kvconf kv_cache=llama3_8b action=check output=json",
        "  python -m kvconf connector=mooncake action=export",
        "  python -m kvconf -m kv_cache=tiny,llama3_8b action=check",
        "",
        "== Subcommands ==",
        *(f"  {name:<16} {what}" for name, (_, what) in subcommands.items()),
        "",
        "== Config groups ==",
        "$APP_CONFIG_GROUPS",
        "",
        "== Top-level keys ==",
        *describe(KVConfConfig, "", skip=_SHOWN_ELSEWHERE),
        "",
        "== self_test.* ==",
        *describe(SelfTestConfig, "self_test."),
        "",
        "== bench.* (action=bench) ==",
        *describe(BenchConfig, "bench."),
        "",
        "== export.* (action=export) ==",
        *describe(ExportConfig, "export."),
        "",
        "== connector.* ==",
        *describe(ConnectorConfig, "connector."),
        "",
    ]
    for name, model in extras.items():
        parts += [f"== connector.extra.* of connector={name} ==", *describe(model, "connector.extra."), ""]
    parts += own_part
    parts += [
        "== kv_cache.* (compact form) ==",
        *describe(KVCacheLayout, "kv_cache."),
        "",
        "== kv_cache.groups[*] by type ==",
    ]
    for g in (FullAttentionGroup, SlidingWindowGroup, MLAGroup, MambaGroup):
        parts.append(f" {g.model_fields['type'].default}:")
        parts.extend(describe(g, "", skip=("type",)))
    parts += ["", "== The composed config ==", "$CONFIG", "${hydra.help.footer}"]
    placeholders = {"${hydra.help.header}", "$APP_CONFIG_GROUPS", "$CONFIG", "${hydra.help.footer}"}
    # Hydra fills the template with string.Template: a $ of a docstring ($XDG_CACHE_HOME) is text
    parts = [p if p in placeholders else p.replace("$", "$$") for p in parts]
    return "\n".join(parts).replace("${i}", "{i}")

"""Command-line overrides checked before Hydra composes, so that the two commonest typos get
kvconf's message (path, value, allowed, did-you-mean, fix) instead of Hydra's advice to append
the misspelt key with ``+``:

- a config group option that does not exist (``connector=mooncak``);
- a key the schema does not have (``connector.kv_rol=kv_producer``).

Anything this cannot judge (``+key``, ``hydra.*``, a user's own connector YAML) is left to Hydra
and to validation, which catch it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

from kvconf.conf import GROUPS
from kvconf.errors import ConfigError, Problem

__all__ = ["check_overrides", "group_options", "split_args"]


def group_options(group: str, config_dirs: Iterable[str]) -> list[str]:
    """Options of ``group``: YAML files in the built-in conf/ and each ``--config-dir``."""
    found: set[str] = set()
    for d in config_dirs:
        folder = Path(d) / group
        if folder.is_dir():
            found.update(p.stem for p in folder.glob("*.yaml"))
            found.update(p.stem for p in folder.glob("*.yml"))
    return sorted(found)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, user config dirs) from ``python -m kvconf`` arguments."""
    takes_value = {"--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun", "--package", "-p",
                   "--shell-completion", "-sc"}
    optional_value = {"--info", "-i"}  # --info [all|config|defaults|...]: a word, never an override
    overrides, dirs = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
            i += 1
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
        elif a in takes_value or (a in optional_value and i + 1 < len(argv) and "=" not in argv[i + 1]):
            i += 1
        elif not a.startswith("-"):
            overrides.append(a)
        i += 1
    return overrides, dirs


def _fields(model: Any) -> list[str]:
    return list(model.model_fields)


def check_overrides(argv: list[str], conf_dir: str,
                    extra_model: Optional[Callable[[str], Any]] = None) -> None:
    """A :class:`ConfigError` listing every override that names a missing option or key;
    ``extra_model(name)`` gives a built-in connector's ``extra`` model, to check its keys too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .kvcache import KVCacheConfig
    from .layout import KVCacheLayout
    from .models import BenchConfig, ConnectorConfig, KVConfConfig, SelfTestConfig

    overrides_text, user_dirs = split_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides_text)
    except Exception:  # Hydra reports syntax errors itself
        return
    dirs = [conf_dir, *user_dirs]
    problems: list[Problem] = []
    chosen = {"connector": "example"}
    for o in parsed:
        if o.key_or_group in GROUPS and not o.is_delete() and o.package is None:
            options = group_options(o.key_or_group, dirs)
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for v in values:
                if v not in options:
                    problems.append(Problem(o.key_or_group, f"no option {v!r} in config group {o.key_or_group!r}",
                                            value=v, allowed=options,
                                            fix=f"use {o.key_or_group}=<one of the allowed>, or add "
                                                f"{o.key_or_group}/{v}.yaml to a --config-dir"))
            if o.key_or_group == "connector" and len(values) == 1:
                chosen["connector"] = values[0]
    user_connectors = set(group_options("connector", user_dirs))
    sections: dict[str, list[str]] = {
        "": [f for f in _fields(KVConfConfig)],
        "connector": _fields(ConnectorConfig),
        "kv_cache": sorted(set(_fields(KVCacheLayout)) | set(_fields(KVCacheConfig))),
        "self_test": _fields(SelfTestConfig),
        "bench": _fields(BenchConfig),
    }
    name = chosen["connector"]
    model = extra_model(name) if extra_model is not None and name not in user_connectors else None
    if model is not None:
        sections["connector.extra"] = _fields(model)
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key in GROUPS or key.startswith("hydra"):
            continue
        parts = key.split(".")
        for depth in range(min(len(parts), 3)):
            section = ".".join(parts[:depth])
            if section not in sections:
                break
            if parts[depth] not in sections[section]:
                path = ".".join(parts[: depth + 1])
                problems.append(Problem(path, f"unknown key {parts[depth]!r}", value=(o.input_line or "").split("=", 1)[-1],
                                        allowed=sections[section], typo=parts[depth],
                                        fix="correct the key's spelling (see python -m kvconf --help)"))
                break
    if problems:
        raise ConfigError(problems)

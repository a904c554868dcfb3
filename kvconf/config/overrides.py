"""Command-line overrides, before Hydra composes.

Checked (:func:`check_overrides`), so that the two commonest typos get kvconf's message (path,
value, allowed, did-you-mean, fix) instead of Hydra's advice to append the misspelt key with ``+``:

- a config group option that does not exist (``connector=mooncak``);
- a key the schema does not have (``connector.kv_rol=kv_producer``).

Anything this cannot judge (``+key``, ``hydra.*``, a user's own connector's ``extra`` keys) is left
to Hydra and to validation, which catch it too.

Made composable (:func:`as_composable`): the keys of the ``kv_cache`` and ``connector`` groups come
from kvconf's schema, not from whichever file was chosen, so a file of one's own that leaves a key
out takes the override a built-in file takes. Hydra only overrides keys the composed config has;
``kv_cache.max_model_len=4096`` for a ``kv_cache/mine.yaml`` without ``max_model_len`` is handed to
Hydra as ``++kv_cache.max_model_len=4096`` (set or add), and only where a chosen file lacks the key,
so built-in files compose exactly as written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

from kvconf.conf import GROUPS
from kvconf.errors import ConfigError, Problem, short

__all__ = ["MAX_OVERRIDE_VALUES", "MAX_SWEEP_JOBS", "as_composable", "as_typed", "check_overrides", "external_connector",
           "group_options", "layout_from_model", "override_problems", "schema_keys", "split_args"]

MAX_SWEEP_JOBS = 4096
"""Jobs one command's sweep makes (the product of its sweeps' lengths)."""
MAX_OVERRIDE_VALUES = 512
"""Values in one override (``a,b,c`` or ``[a,b,c]``): Hydra's parser takes about a second per
thousand here, and a sweep of 512 jobs is more than one command line is for."""

_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic"


def _shape(value: str) -> tuple[int, int]:
    """(deepest nesting of brackets, number of values) of an override's value, outside quotes.

    >>> _shape("[1,[2,3],{a: 4}]"), _shape("'[,,,]'")
    ((2, 4), (0, 1))
    """
    depth = deepest = 0
    values = 1
    quote = ""
    escaped = False
    for c in value:
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]})":
            depth -= 1
        elif c == ",":
            values += 1
    return deepest, values


def override_problems(overrides: list[str]) -> list[Problem]:
    """What is wrong with each override's text, before Hydra parses it: one :class:`Problem`
    naming the override's key, with its value as typed (shortened) and what kvconf expects, for
    bytes that are not UTF-8, control characters, more than the config-file bounds (length,
    nesting), more than :data:`MAX_OVERRIDE_VALUES` values, and text Hydra's grammar does not
    read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .inputs import MAX_DEPTH, MAX_STRING_CHARS

    problems: list[Problem] = []
    parser = None
    sweeps: dict[str, int] = {}
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.lstrip("+~") or "<override>"
        typed = value if eq else o
        if any("\udc80" <= c <= "\udcff" for c in o):  # bytes that were not UTF-8, as Python keeps them
            problems.append(Problem(key, "the override holds bytes that are not UTF-8 text", value=typed,
                                    fix="type the value as UTF-8 text"))
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in o):
            problems.append(Problem(key, "the override holds a control character (a newline, an escape, ...)",
                                    value=typed, fix="remove it; write such a value in a config file instead"))
            continue
        if len(o) > MAX_STRING_CHARS:
            problems.append(Problem(key, f"an override of {len(o):,} characters: more than the {MAX_STRING_CHARS:,} "
                                         "kvconf reads of one key or value", value=typed,
                                    fix="put long values in a config file (--config-dir)"))
            continue
        depth, values = _shape(value)
        if depth > MAX_DEPTH:
            problems.append(Problem(key, f"the value is nested more than {MAX_DEPTH} levels deep (kvconf reads at "
                                         f"most {MAX_DEPTH})", value=typed, fix="write it with fewer brackets"))
            continue
        if values > MAX_OVERRIDE_VALUES:
            problems.append(Problem(key, f"the value holds {values:,} values: more than the {MAX_OVERRIDE_VALUES} "
                                         "kvconf reads in one override", value=typed,
                                    fix="sweep fewer values per command, or put the list in a config file"))
            continue
        parser = parser or OverridesParser.create()
        try:
            (parsed,) = parser.parse_overrides([o])
            count = _sweep_values(parsed)
            if count > MAX_OVERRIDE_VALUES:
                problems.append(Problem(key, f"the sweep holds {count:,} values: more than the {MAX_OVERRIDE_VALUES} "
                                             "kvconf reads in one override", value=typed,
                                        fix="sweep fewer values per command"))
                continue
            if count > 1:
                sweeps[key] = count
        except Exception as exc:  # Hydra's OverrideParseException (and ANTLR's own, in its message)
            reason = str(exc).split("\n")[0].strip()
            problems.append(Problem(
                key, f"the override is not one kvconf can read ({reason[:160]})", value=typed,
                fix=(f"write {key}=VALUE: a number, a word, a quoted string ('a b'), a list [a,b] or a mapping "
                     f"{{k: v}}, with brackets and quotes closed; quote a value holding brackets, commas, "
                     f"quotes or spaces (grammar: {_GRAMMAR})")))
    jobs = math.prod(sweeps.values())
    if not problems and jobs > MAX_SWEEP_JOBS:
        problems.append(Problem(", ".join(sweeps), f"the sweep makes {jobs:,} jobs ("
                                + " x ".join(f"{n:,}" for n in sweeps.values())
                                + f"): more than the {MAX_SWEEP_JOBS:,} kvconf runs from one command",
                                fix="split it into several commands, each sweeping fewer values"))
    return problems


def _sweep_values(parsed: Any) -> int:
    """How many values an override sweeps (1 where it is no sweep; a range's length counted, not
    listed).

    >>> from hydra.core.override_parser.overrides_parser import OverridesParser
    >>> [_sweep_values(o) for o in OverridesParser.create().parse_overrides(["a=1", "b=1,2,3", "c=range(0,10000,2)"])]
    [1, 3, 5000]
    """
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    if not parsed.is_sweep_override():
        return 1
    sweep = parsed.value()
    if isinstance(sweep, ChoiceSweep):
        return len(sweep.list)
    if isinstance(sweep, RangeSweep) and sweep.start is not None and sweep.stop is not None and sweep.step:
        return max(0, math.ceil((sweep.stop - sweep.start) / sweep.step))
    return 1


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
    takes_value = {"--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun", "--package", "-p", "--cfg", "-c",
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


def schema_keys() -> dict[str, list[str]]:
    """The keys of each section of kvconf's config, from its models: ``""`` (the top level),
    ``connector``, ``kv_cache`` (both forms), ``self_test``, ``bench``."""
    from .kvcache import KVCacheConfig
    from .layout import KVCacheLayout
    from .models import BenchConfig, ConnectorConfig, KVConfConfig, SelfTestConfig

    return {
        "": _fields(KVConfConfig),
        "connector": _fields(ConnectorConfig),
        "kv_cache": sorted(set(_fields(KVCacheLayout)) | set(_fields(KVCacheConfig))),
        "self_test": _fields(SelfTestConfig),
        "bench": _fields(BenchConfig),
    }


def _option_file(group: str, option: str, dirs: list[str]) -> Optional[Path]:
    """The file Hydra composes for ``group=option``: the first of the search path (kvconf's own
    conf/ comes before a ``--config-dir``)."""
    for d in dirs:
        for suffix in (".yaml", ".yml"):
            path = Path(d) / group / f"{option}{suffix}"
            if path.is_file():
                return path
    return None


def _file_keys(path: Path) -> tuple[set[str], set[str]]:
    """(top-level keys, ``extra`` keys) of a group file, from YAML's node graph: aliases are not
    expanded, so a hostile file costs its size, not its expansion. A file that does not parse
    gives none (Hydra and the ``--config-dir`` check report it)."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8", errors="replace"), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return set(), set()
    top: set[str] = set()
    extra: set[str] = set()
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            top.add(str(k.value))
            if k.value == "extra" and isinstance(v, yaml.MappingNode):
                extra.update(str(kk.value) for kk, _ in v.value)
    return top, extra


def _chosen(parsed: list[Any], dirs: list[str]) -> dict[str, list[Path]]:
    """The files each of the ``connector`` and ``kv_cache`` groups composes (several in a sweep):
    the options given on the command line, else the primary config's defaults."""
    chosen = {"connector": ["example"], "kv_cache": ["tiny"]}  # config.yaml's defaults list
    for o in parsed:
        if o.key_or_group in chosen and o.package is None and not o.is_delete():
            chosen[o.key_or_group] = (list(o.sweep_string_iterator()) if o.is_sweep_override()
                                      else [o.get_value_element_as_str()])
    out: dict[str, list[Path]] = {}
    for group, options in chosen.items():
        out[group] = [f for f in (_option_file(group, v, dirs) for v in options) if f is not None]
    return out


def layout_from_model(argv: list[str]) -> list[str]:
    """``kv_cache.model=PATH`` without a ``kv_cache=`` preset: the layout comes from the model
    alone, so the default preset (and its num_blocks) is dropped (``~kv_cache``) and the
    ``kv_cache.*`` overrides build the node anew (``+kv_cache.KEY=VALUE``)."""
    if not any(a.startswith("kv_cache.model=") for a in argv) or any(
            a.lstrip("+~").startswith("kv_cache=") or a == "~kv_cache" for a in argv):
        return argv
    return _before_overrides(["~kv_cache"], ["+" + a if a.startswith("kv_cache.") else a for a in argv])


def external_connector(argv: list[str]) -> list[str]:
    """``connector.module_path=...`` without a ``connector=`` option: the user's own class, which
    must not be handed the default connector's settings, so ``connector.extra`` starts empty
    (``connector.extra={}``) and ``connector.extra.KEY=VALUE`` adds the class's own keys."""
    if not any(a.startswith("connector.module_path=") for a in argv) or any(
            a.lstrip("+~").startswith(("connector=", "connector.extra=")) for a in argv):
        return argv
    return _before_overrides(["~connector.extra", "+connector.extra={}"],
                             ["+" + a if a.startswith("connector.extra.") else a for a in argv])


def _before_overrides(new: list[str], argv: list[str]) -> list[str]:
    """``argv`` with the overrides ``new`` put before its first override, after its flags (Hydra's
    command line takes flags, then overrides).

    >>> _before_overrides(["~a"], ["-m", "--config-dir", "D", "b=1"])
    ['-m', '--config-dir', 'D', '~a', 'b=1']
    """
    overrides, _ = split_args(argv)
    at = next((i for i, a in enumerate(argv) if overrides and a == overrides[0]), len(argv))
    return [*argv[:at], *new, *argv[at:]]


def as_composable(argv: list[str], conf_dir: str) -> list[str]:
    """``argv`` as Hydra must be given it for the groups' keys to come from kvconf's schema: an
    override of a ``kv_cache.KEY`` or ``connector.KEY`` the schema has, or of any
    ``connector.extra.KEY`` (the connector's own model judges those), becomes ``++KEY=VALUE``
    where a file the group composes lacks the key. Overrides written with ``+``, ``++`` or ``~``,
    flags and everything else pass unchanged; an unknown key is left to :func:`check_overrides`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, user_dirs = split_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports syntax errors itself
        return argv
    files = _chosen(parsed, [conf_dir, *user_dirs])
    keys = schema_keys()
    written = {f: _file_keys(f) for group in files.values() for f in group}  # each file read once
    missing: set[str] = set()
    for o in parsed:
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            continue
        parts = o.key_or_group.split(".")
        if len(parts) == 2 and parts[0] in files and parts[1] in keys[parts[0]]:
            if any(parts[1] not in written[f][0] for f in files[parts[0]]):
                missing.add(o.key_or_group)
        elif len(parts) == 3 and parts[:2] == ["connector", "extra"]:
            if any(parts[2] not in written[f][1] for f in files["connector"]):
                missing.add(o.key_or_group)
    if not missing:
        return argv
    return ["++" + a if a in overrides and a.split("=", 1)[0] in missing else a for a in argv]


def check_overrides(argv: list[str], conf_dir: str,
                    extra_model: Optional[Callable[[str], Any]] = None) -> None:
    """A :class:`ConfigError` listing every override that names a missing option or key;
    ``extra_model(name)`` gives a built-in connector's ``extra`` model, to check its keys too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides_text, user_dirs = split_args(argv)
    wrong = override_problems(overrides_text)
    if wrong:
        raise ConfigError(wrong)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides_text)
    except Exception:  # not met after override_problems; Hydra would report it
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
    sections = schema_keys()
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
                typed = (o.input_line or "").split("=", 1)[-1]
                problems.append(Problem(path, f"unknown key {short(parts[depth], 80)}", value=typed,
                                        allowed=sections[section], typo=parts[depth],
                                        fix="correct the key's spelling (see python -m kvconf --help)"))
                break
    if problems:
        raise ConfigError(problems)


def as_typed(override: str) -> str:
    """An override as a report shows it: without the ``++`` that :func:`as_composable` puts before
    a group key (``++kv_cache.max_model_len=4096`` reads ``kv_cache.max_model_len=4096``; the two
    mean the same for a key of kvconf's schema).

    >>> as_typed("++kv_cache.max_model_len=4096"), as_typed("++hydra.job.chdir=true")
    ('kv_cache.max_model_len=4096', '++hydra.job.chdir=true')
    """
    if override.startswith("++") and override[2:].startswith(("kv_cache.", "connector.")):
        return override[2:]
    return override

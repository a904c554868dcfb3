"""The kvconf connector tree that vLLM's ``kv_connector_extra_config`` carries for the plug-in,
and kvconf's checks of it. Imports no vLLM module: ``kvconf lint`` and ``kvconf import`` read the
same trees without vLLM installed.
"""

from __future__ import annotations

from typing import Any, Optional

from kvconf.errors import ConfigError, ContractError, KVConfError, Problem
from kvconf.runtime.export import PLUGIN_CONFIG_DIR_KEY as CONFIG_DIR_KEY
from kvconf.runtime.export import PLUGIN_EXTRA_KEYS as EXTRA_KEYS
from kvconf.runtime.export import PLUGIN_OVERRIDES_KEY as OVERRIDES_KEY
from kvconf.runtime.export import PLUGIN_TREE_KEY as TREE_KEY
from kvconf.runtime.export import plugin_refuses
from kvconf.runtime.pipeline import Job, load

__all__ = ["check_tree", "connector_tree"]


def connector_tree(extra: Any) -> dict[str, Any]:
    """The kvconf connector tree that ``kv_connector_extra_config`` carries inline
    (``kvconf_connector``) or names as overrides to compose (``kvconf_overrides``, with an
    optional ``kvconf_config_dir``); a :class:`ConfigError` naming the key otherwise."""
    where = "kv_connector_extra_config"
    if not isinstance(extra, dict):
        raise ConfigError(Problem(where, "must be a mapping", value=extra, fix=f"give {{{TREE_KEY!r}: {{...}}}}"))
    problems = [Problem(f"{where}.{k}", "not a key the kvconf plug-in reads", value=extra[k], allowed=EXTRA_KEYS,
                        typo=k, fix="give the connector tree as kvconf_connector (python -m kvconf connector=NAME "
                        "action=export export.target=kvconf writes it), or kvconf_overrides")
                for k in extra if k not in EXTRA_KEYS]
    has_tree, has_overrides = TREE_KEY in extra, OVERRIDES_KEY in extra
    if has_tree == has_overrides:
        problems.append(Problem(where, f"give the connector as exactly one of {TREE_KEY} (the tree) or "
                                f"{OVERRIDES_KEY} (overrides to compose it from)", value=sorted(extra),
                                fix="python -m kvconf connector=NAME action=export export.target=kvconf prints "
                                    "the whole --kv-transfer-config"))
    if problems:
        raise ConfigError(problems)
    if has_tree:
        tree = extra[TREE_KEY]
        if not isinstance(tree, dict):
            raise ConfigError(Problem(f"{where}.{TREE_KEY}", "must be a mapping: kvconf's connector tree",
                                      value=tree, fix="python -m kvconf connector=NAME action=export "
                                      "export.target=kvconf writes it"))
        return tree
    return _composed(extra)


def _composed(extra: dict[str, Any]) -> dict[str, Any]:
    from kvconf.conf import CONF_DIR, compose_data
    from kvconf.config.overrides import as_composable, check_overrides, external_connector, split_args
    from kvconf.contract.registry import builtin_extra_model

    overrides, config_dir = extra[OVERRIDES_KEY], extra.get(CONFIG_DIR_KEY)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(Problem(f"kv_connector_extra_config.{OVERRIDES_KEY}", "must be a list of overrides",
                                  value=overrides, fix='e.g. ["connector=shared_storage", '
                                  '"connector.extra.capacity=8GiB"]'))
    if config_dir is not None and not isinstance(config_dir, str):
        raise ConfigError(Problem(f"kv_connector_extra_config.{CONFIG_DIR_KEY}", "must be a directory path",
                                  value=config_dir, fix="give the folder you pass as --config-dir"))
    flags = ["--config-dir", config_dir] if config_dir else []
    argv = external_connector([*flags, *overrides])
    check_overrides(argv, CONF_DIR, extra_model=builtin_extra_model)
    plain, _ = split_args(as_composable(argv, CONF_DIR))
    data = compose_data(plain, config_dirs=[config_dir] if config_dir else [])
    return data["connector"]


def check_tree(tree: dict[str, Any], role: str, transfer: Any, kv_cache: Optional[dict[str, Any]]) -> Job:
    """kvconf's pipeline up to construction on ``tree``: validated, resolved, the class's contract
    checked, and with ``kv_cache`` (vLLM's plan, kvconf's explicit form) the connector's own checks
    against it. ``transfer`` is vLLM's ``KVTransferConfig``: its ``kv_role`` and
    ``kv_load_failure_policy`` must be the tree's, which vLLM acts on while the connector reads
    the tree's. A :class:`ConfigError` or :class:`ContractError` with every problem."""
    data: dict[str, Any] = {"connector": tree, "role": role, "action": "check", "device": "cpu"}
    if kv_cache is not None:
        data["kv_cache"] = kv_cache
    job = Job(data)
    problems: list[Problem] = []
    error: type[KVConfError] = ConfigError
    try:
        load(job, environment=False)
    except KVConfError as exc:
        problems = [p for p in exc.problems if kv_cache is not None or not p.path.startswith("kv_cache")]
        if problems and all(p.path.startswith(("connector.name", "connector.module_path")) for p in problems):
            error = ContractError  # as python -m kvconf tells a class that cannot be resolved or constructed
    for key in ("kv_role", "kv_load_failure_policy"):
        theirs, ours = getattr(transfer, key, None), tree.get(key)
        if ours is not None and theirs is not None and theirs != ours:
            problems.append(Problem(f"connector.{key}", f"the kvconf tree says {ours} and vLLM's --kv-transfer-config "
                                    f"says {theirs}; vLLM acts on its own and the connector on the tree's",
                                    value=ours, allowed=[theirs],
                                    fix=f"set {key} to the same value in both (python -m kvconf ... action=export "
                                        "export.target=kvconf writes both)"))
            error = ConfigError
    refused = plugin_refuses(job.cls, tree.get("name"), tree)
    if refused is not None:
        problems.append(refused)
        error = ConfigError
    if problems:
        raise error(problems)
    return job

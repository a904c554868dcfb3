"""kvconf's Hydra config tree (``config.yaml`` and the groups ``connector/``, ``role/``,
``kv_cache/``), shipped inside the package, and the one place that says how it is composed.

>>> GROUPS
('connector', 'role', 'kv_cache')
>>> Path(CONF_DIR, "config.yaml").is_file()
True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

__all__ = ["CONF_DIR", "CONFIG_NAME", "GROUPS", "HYDRA_VERSION_BASE", "compose", "compose_data", "store_help"]

CONF_DIR = str(Path(__file__).resolve().parent)
"""The folder of the built-in config tree (what Hydra's ``config_path`` points at)."""
CONFIG_NAME = "config"
"""The primary config, ``config.yaml``."""
GROUPS = ("connector", "role", "kv_cache")
"""The config groups, in the order of the primary config's defaults list."""
HYDRA_VERSION_BASE = "1.3"
"""The Hydra behaviour kvconf is written for (``version_base``)."""


def store_help(template: str = "", header: str = "", footer: str = "") -> None:
    """Registers ``hydra/help: kvconf``, the help node ``config.yaml`` selects, in Hydra's config
    store (the CLI registers the full ``--help`` text; composing needs the node to exist)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/help", name="kvconf", package="hydra.help", node={
        "app_name": "kvconf", "header": header, "footer": footer, "template": template})


def _help_stored() -> bool:
    from hydra.core.config_store import ConfigStore

    return "kvconf.yaml" in ConfigStore.instance().repo.get("hydra", {}).get("help", {})


def compose(overrides: Sequence[str] = (), *, config_dirs: Sequence[str | Path] = (),
            return_hydra_config: bool = False, job_name: str | None = None) -> DictConfig:
    """The composed config, through Hydra's compose API, with ``config_dirs`` searched too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not _help_stored():
        store_help()
    extra = list(overrides)
    if config_dirs:
        extra.append(f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in config_dirs)}]")
    kwargs: dict[str, Any] = {"job_name": job_name} if job_name else {}
    with initialize_config_dir(config_dir=CONF_DIR, version_base=HYDRA_VERSION_BASE, **kwargs):
        return hydra_compose(config_name=CONFIG_NAME, overrides=extra, return_hydra_config=return_hydra_config)


def compose_data(overrides: Sequence[str] = (), *, config_dirs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The composed config as plain data: interpolations resolved, no ``hydra`` node."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(compose(overrides, config_dirs=config_dirs), resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return {str(k): v for k, v in data.items()}

"""kvconf's Hydra sweeper, ``hydra/sweeper=kvconf`` (kvconf's default): Hydra's basic sweeper
that keeps what each job returned, in the launching process, and asks the launcher for the CPUs a
job uses (:mod:`kvconf.cli.sweep`). Hydra loads sweepers from the ``hydra_plugins`` package only,
hence this module; it imports nothing of kvconf until a sweep starts. (No ``from __future__ import
annotations``: Hydra's scanner runs the module before it is in ``sys.modules``, where a dataclass
cannot resolve string annotations.)"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

__all__ = ["KVConfSweeper", "KVConfSweeperConf"]


@dataclass
class KVConfSweeperConf:
    _target_: str = "hydra_plugins.kvconf_sweeper.KVConfSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="kvconf", node=KVConfSweeperConf, provider="kvconf")


class _PlacedLauncher:
    """The configured launcher, launching a batch in runs of jobs that need the same CPUs."""

    def __init__(self, launcher: Launcher, hydra_context: HydraContext, config: DictConfig) -> None:
        self.launcher, self.hydra_context, self.config = launcher, hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kvconf.cli.sweep import launch

        return launch(self.launcher, job_overrides, initial_job_idx, self.hydra_context, self.config)


class KVConfSweeper(BasicSweeper):
    """Hydra's basic sweeper (same overrides, same batches, same job numbers) whose jobs' returns
    end in :data:`kvconf.cli.state.state` ``.returns``."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict[str, str]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        assert self.launcher is not None
        self.launcher = _PlacedLauncher(self.launcher, hydra_context, config)  # type: ignore[assignment]

    def sweep(self, arguments: list[str]) -> Any:
        from kvconf.cli.state import state
        from kvconf.cli.sweep import job_records, stop_local_ray

        try:
            returns = super().sweep(arguments)
        finally:
            stop_local_ray(self.launcher)
        state.returns = job_records(returns or [])
        return returns

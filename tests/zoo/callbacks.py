"""Hydra callbacks for the sweep tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback


class ForgetJobFolder(Callback):
    """Removes each job's folder once the job has ended, where the job ran: what the launching
    process sees when its jobs ran on machines that share no folder with it."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        shutil.rmtree(Path(HydraConfig.get().runtime.output_dir), ignore_errors=True)


class RecordRayCPUs(Callback):
    """Each job, as it starts on a Ray worker, appends ``connector CPUS`` (the CPUs Ray assigned
    to it) to ``ray_cpus.txt`` in the launching directory."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        with open(Path(HydraConfig.get().runtime.cwd) / "ray_cpus.txt", "a") as f:
            f.write(f"{config.connector.name} {cpus:g}\n")

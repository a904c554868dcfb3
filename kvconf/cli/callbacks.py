"""Hydra callbacks of kvconf's app (``hydra.callbacks`` in ``conf/config.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from kvconf.bench.summary import summarize

from .state import state

__all__ = ["SweepSummary"]


class SweepSummary(Callback):
    """At the end of a multirun sweep: the jobs that failed in other processes (a launcher's) are
    counted for the exit code, and a sweep of ``action=bench`` jobs gets its summary."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        for err in sorted(sweep_dir.glob("*/error.json")):  # jobs a launcher ran elsewhere report here
            state.swept_failures.append((str(err.parent), int(json.loads(err.read_text()).get("exit_code", 1))))
        if any(sweep_dir.glob("*/results.json")):
            summarize(sweep_dir)

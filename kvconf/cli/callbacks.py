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
    """At the end of a multirun sweep, in the launching process: a sweep of ``action=bench`` jobs
    gets its summary, built from what the jobs returned (kvconf's sweeper keeps it, wherever the
    jobs ran), or, under another sweeper, from the files the jobs left in the sweep folder (whose
    ``error.json`` files then count for the exit code)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if state.returns is not None:
            summarize(sweep_dir, records=state.returns)
            return
        if not sweep_dir.is_dir():
            return
        for err in sorted(sweep_dir.glob("*/error.json")):  # jobs a launcher ran elsewhere report here
            state.swept_failures.append((str(err.parent), int(json.loads(err.read_text()).get("exit_code", 1))))
        if any(sweep_dir.glob("*/results.json")):
            summarize(sweep_dir)

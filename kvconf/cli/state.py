"""What one ``python -m kvconf`` process remembers across the jobs it runs: each job's exit code,
and the failures that a launcher ran in other processes (the sweep callback reads them from the
jobs' ``error.json``). The CLI's exit code comes from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["SweepState", "state"]


@dataclass
class SweepState:
    t0: float = field(default_factory=time.perf_counter)
    """When composition of the next job began."""
    task_started: bool = False
    """Whether a job has run (so a Hydra failure was not a composition error)."""
    jobs: list[tuple[str, int]] = field(default_factory=list)
    """(overrides, exit code) of each job run in this process."""
    swept_failures: list[tuple[str, int]] = field(default_factory=list)
    """(job folder, exit code) of failed jobs that a launcher ran in other processes (joblib)."""
    returns: Optional[list[dict[str, Any]]] = None
    """The record each job of a sweep returned (:func:`kvconf.cli.app.execute`), in job order, as the
    launcher handed them back to this process (kvconf's sweeper keeps them); None: no sweep here, or
    another sweeper."""
    callbacks: list[str] = field(default_factory=list)
    """The ``_target_`` of each Hydra callback the config names (Hydra runs them around the jobs)."""


state = SweepState()
"""This process's state."""

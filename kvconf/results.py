"""Deprecated: moved to :mod:`kvconf.bench.results` (``results.json``), :mod:`kvconf.bench.summary`
and :mod:`kvconf.cli.callbacks` (the Hydra callback, ``_target_: kvconf.cli.callbacks.SweepSummary``).
This module re-exports them for one release, so that a config naming
``_target_: kvconf.results.SweepSummary`` keeps working (see CHANGELOG.md).
"""

from kvconf.bench.results import BenchResults, write_results
from kvconf.bench.summary import summarize
from kvconf.cli.callbacks import SweepSummary

__all__ = ["BenchResults", "SweepSummary", "summarize", "write_results"]

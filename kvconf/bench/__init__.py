"""The bench layer: ``action=bench`` and what it writes.

=======  ======================================================================================
module   what it holds
=======  ======================================================================================
run      warm-up, repetitions and figures of one job; the raw path a connector is compared with
raw      the raw paths (plain host copy, raw file I/O) and the machine's ceilings
results  ``results.json`` and its schema model, with the environment a result was measured in
summary  the end of a sweep: ``summary.csv``, a terminal table, ``summary.png``
compare  ``kvconf bench-compare A B``
=======  ======================================================================================

It keeps the names of the old ``kvconf.bench`` module for one release.
"""

from .raw import ceilings, raw_file_io, raw_torch_copy
from .results import RESULTS_SCHEMA, environment
from .run import Progress, percentiles, run_bench

__all__ = ["RESULTS_SCHEMA", "Progress", "ceilings", "environment", "percentiles", "raw_file_io", "raw_torch_copy",
           "run_bench"]

"""``kvconf bench-compare A B`` (also ``python -m kvconf.bench_compare``): see :mod:`kvconf.results`."""

import sys

from .results import compare_main as main

if __name__ == "__main__":
    sys.exit(main())

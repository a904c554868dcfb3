"""Deprecated: moved to :mod:`kvconf.bench.compare`. This module re-exports it for one release (see CHANGELOG.md)."""

from kvconf.bench.compare import *  # noqa: F403
from kvconf.bench.compare import __all__  # noqa: F401

if __name__ == "__main__":
    import sys

    from kvconf.bench.compare import main

    sys.exit(main())

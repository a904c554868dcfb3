"""Deprecated: moved to :mod:`kvconf.ci.schemas`. This module re-exports it for one release (see CHANGELOG.md)."""

from kvconf.ci.schemas import *  # noqa: F403
from kvconf.ci.schemas import __all__  # noqa: F401

if __name__ == "__main__":
    import sys

    from kvconf.ci.schemas import main

    sys.exit(main())

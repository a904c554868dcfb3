"""Deprecated: moved to :mod:`kvconf.ci.validate`. This module re-exports it for one release (see CHANGELOG.md)."""

from kvconf.ci.validate import *  # noqa: F403
from kvconf.ci.validate import __all__  # noqa: F401

if __name__ == "__main__":
    import sys

    from kvconf.ci.validate import main

    sys.exit(main())

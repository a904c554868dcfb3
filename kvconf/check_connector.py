"""Deprecated: moved to :mod:`kvconf.ci.check_connector`. This module re-exports it for one release (see CHANGELOG.md)."""

from kvconf.ci.check_connector import *  # noqa: F403
from kvconf.ci.check_connector import __all__  # noqa: F401

if __name__ == "__main__":
    import sys

    from kvconf.ci.check_connector import main

    sys.exit(main())

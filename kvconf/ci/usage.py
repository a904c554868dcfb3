"""The argument parser of kvconf's CI commands: a usage error prints the usage line and
``PROG: what is wrong`` on stderr, and exits 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["UsageParser"]


class UsageParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)

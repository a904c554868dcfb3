"""The command line: ``python -m kvconf`` (the Hydra app) and the ``kvconf`` command.

- ``app``: the Hydra app, the subcommands, exit codes and error reports;
- ``state``: what one process remembers across the jobs of a sweep;
- ``callbacks``: Hydra callbacks (the sweep summary);
- ``help``: ``--help``, generated from the config models' field docstrings;
- ``report``: the text report of a job;
- ``peer``: ``python -m kvconf.cli.peer``, one job from a JSON config (the other side of a
  peer-to-peer connector's self-test).
"""

from .app import CONF_DIR, SUBCOMMANDS, main

__all__ = ["CONF_DIR", "SUBCOMMANDS", "main"]

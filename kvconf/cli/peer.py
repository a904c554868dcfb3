"""``python -m kvconf.cli.peer CONFIG.json``: runs one job from a composed config written as JSON.

The peer-to-peer connectors start their other side with it (``action=run`` of a mooncake
consumer starts a producer with ``action=serve``), so the peer runs the very config of its
parent, including a user's ``--config-dir`` files, with only the data direction and action changed.
"""

from __future__ import annotations

import json
import os
import sys

from omegaconf import OmegaConf

from kvconf.runtime.process import die_with_parent, hard_exit, stacks_on_signal

from .app import execute

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvconf.cli.peer CONFIG.json", file=sys.stderr)
        raise SystemExit(2)
    die_with_parent()  # a parent killed by SIGKILL leaves no peer serving behind it
    stacks_on_signal()
    with open(args[0]) as f:
        data = json.load(f)
    try:
        os.unlink(args[0])  # the config was written for this peer alone: read, it is gone
    except OSError:
        pass
    code: object = 0
    try:
        execute(OmegaConf.create(data), multirun=False, label="peer")
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        hard_exit(code)


if __name__ == "__main__":
    main()

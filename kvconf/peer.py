"""``python -m kvconf.peer CONFIG.json``: runs one job from a composed config written as JSON.

The peer-to-peer connectors start their other side with it (``action=run`` of a mooncake
consumer starts a producer with ``action=serve``), so the peer runs the very config of its
parent, including a user's ``--config-dir`` files, with only the data direction and action changed.
"""

from __future__ import annotations

import json
import sys

from omegaconf import OmegaConf


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m kvconf.peer CONFIG.json", file=sys.stderr)
        raise SystemExit(2)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    from .cli import _execute, _hard_exit_if_asked

    code: object = 0
    try:
        _execute(OmegaConf.create(data), multirun=False, label="peer")
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        _hard_exit_if_asked(code)


if __name__ == "__main__":
    main()

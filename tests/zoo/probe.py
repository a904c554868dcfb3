"""Runs ``python -m kvconf`` in this process, then writes what it imported to $KVCONF_PROBE."""

import json
import os
import sys

from kvconf.cli.app import main

code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
with open(os.environ["KVCONF_PROBE"], "w") as f:
    json.dump({"exit": code, "torch": "torch" in sys.modules,
               "allocate": "kvconf.runtime.allocate" in sys.modules,
               "connector_modules": sorted(m for m in sys.modules if m.startswith("kvconf_connectors.")),
               "cuda_initialized": bool("torch" in sys.modules and sys.modules["torch"].cuda.is_initialized())}, f)
sys.exit(code)

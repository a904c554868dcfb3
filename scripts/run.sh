#!/usr/bin/env bash
# Sets everything up, then runs kvconf's main job (extra arguments are Hydra overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${KVCONF_VENV:-.venv}/bin/python" -m kvconf connector=mooncake role=worker "$@"

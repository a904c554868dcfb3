#!/usr/bin/env bash
# Sets everything up, then checks the code (ruff: lint and import order; mypy: types) and runs
# the whole test suite (extra arguments go to pytest), on two workers (pytest-xdist; most tests
# wait on processes they start, so two at a time halve the wall time on 2 cores:
# KVCONF_TEST_WORKERS=N to change it, 0 for one process). Tests marked ``serial`` (a hundred
# processes at once) run alone afterwards: beside them, other tests' timeouts are not met.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN="${KVCONF_VENV:-.venv}/bin"
echo "test: ruff check" >&2
"$BIN/ruff" check .
echo "test: mypy" >&2
bash scripts/typecheck.sh
echo "test: pytest" >&2
status=0
"$BIN/python" -m pytest -q -n "${KVCONF_TEST_WORKERS:-2}" -m "not serial" "$@" || status=$?
echo "test: pytest, the serial tests alone" >&2
"$BIN/python" -m pytest -q -m serial "$@" || { rc=$?; [ "$rc" -eq 5 ] || status=$rc; }  # 5: none selected
exit "$status"

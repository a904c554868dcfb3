#!/usr/bin/env bash
# Sets everything up, then checks the code (ruff: lint and import order; mypy: types, beside the
# tests) and runs the whole test suite (extra arguments go to pytest), on two workers
# (pytest-xdist; most tests wait on processes they start, so two at a time halve the wall time on 2 cores:
# KVCONF_TEST_WORKERS=N to change it, 0 for one process). Tests marked ``serial`` (a hundred
# processes at once) run alone afterwards: beside them, other tests' timeouts are not met.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN="${KVCONF_VENV:-.venv}/bin"
echo "test: ruff check" >&2
"$BIN/ruff" check .
# mypy (about a minute from a clean clone) runs beside the suite's first tests, most of which wait
# on processes; its verdict is printed once the tests are done.
echo "test: mypy (beside pytest)" >&2
MYPY_OUT="$(mktemp)"
trap 'rm -f "$MYPY_OUT"' EXIT
bash scripts/typecheck.sh >"$MYPY_OUT" 2>&1 &
MYPY_PID=$!
echo "test: pytest" >&2
status=0
"$BIN/python" -m pytest -q -n "${KVCONF_TEST_WORKERS:-2}" -m "not serial" "$@" || status=$?
echo "test: mypy's verdict" >&2
mypy_status=0
wait "$MYPY_PID" || mypy_status=$?
cat "$MYPY_OUT"
echo "test: pytest, the serial tests alone" >&2
"$BIN/python" -m pytest -q -m serial "$@" || { rc=$?; [ "$rc" -eq 5 ] || status=$rc; }  # 5: none selected
[ "$status" -ne 0 ] || status=$mypy_status
exit "$status"

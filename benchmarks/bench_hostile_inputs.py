"""The hostile-input corpus (tests/hostile_corpus.py) timed alone, one command at a time, as the
test suite runs it: each input through the app, and through validate, lint or import.

    .venv/bin/python benchmarks/bench_hostile_inputs.py [--top 10]

Prints the slowest commands with their wall time and peak memory (``wait4``'s ``ru_maxrss`` of
that process alone), then the corpus' total, the slowest and the largest against the goals: under
2 s and 500 MB each, the whole corpus under a minute on 2 cores (run one at a time here, so that
each time is its own: the total is halved for two at a time). Asserts nothing: a goal missed says so.
Each time includes the Python interpreter's start and kvconf's imports (about 0.5 s here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from hostile_corpus import CORPUS  # noqa: E402
from test_hostile_inputs import measured, write  # noqa: E402


def commands(case, tmp: Path) -> list[list]:
    """The commands the suite runs for ``case``, files written into ``tmp``."""
    if case.kind == "file":
        file = write(tmp / "conf" / case.group / f"{case.option}.yaml", case.content)
        return [["--config-dir", str(tmp / "conf"), f"{case.group}={case.option}", *case.extra_args, "action=check"],
                ["validate", str(file)]]
    if case.kind == "override":
        return [[*case.args, "action=check"]]
    if case.kind == "json":
        file = write(tmp / ("launch.sh" if "script" in case.id else "transfer.json"), case.content)
        return [["lint", str(file)], ["import", str(file)]]
    file = write(tmp / "model" / "config.json", case.content)
    return [[f"kv_cache.model={file}", "action=check"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=10, help="how many of the slowest commands to list")
    args = p.parse_args()
    rows = []
    t0 = time.perf_counter()
    for case in CORPUS:
        with tempfile.TemporaryDirectory() as d:
            for cmd in commands(case, Path(d)):
                rc, _, seconds, mb = measured(cmd, Path(d))
                what = cmd[0] if cmd[0] in ("validate", "lint", "import") else "app"
                rows.append((seconds, mb, rc, f"{case.id} ({what})"))
    total = time.perf_counter() - t0
    rows.sort(reverse=True)
    print(f"{'seconds':>8} {'MB':>6} {'exit':>4}  input")
    for seconds, mb, rc, label in rows[: args.top]:
        print(f"{seconds:8.2f} {mb:6.0f} {rc:4d}  {label}")
    slowest, largest = rows[0][0], max(r[1] for r in rows)
    print(f"\n{len(CORPUS)} inputs, {len(rows)} commands in {total:.1f} s one at a time on one core "
          f"(goal: under 60 s on 2 cores, i.e. {total / 2:.1f} s two at a time: "
          f"{'met' if total / 2 < 60 else 'MISSED'}; the suite runs them two at a time)")
    print(f"slowest {slowest:.2f} s (goal: under 2 s: {'met' if slowest < 2 else 'MISSED'}); "
          f"largest {largest:.0f} MB (goal: under 500 MB: {'met' if largest < 500 else 'MISSED'})")


if __name__ == "__main__":
    main()

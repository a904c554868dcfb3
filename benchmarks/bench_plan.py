"""How long kvconf takes to plan the largest shipped layout (DeepSeek-V3 style, 61 MLA layers, with
the max_model_len check), plan only (``action=check``), against a bare Hydra app composing the same
config: bench_legacy_reject.py's method.

    .venv/bin/python benchmarks/bench_plan.py [--runs 15]

Goal (issue #11): within 1.3x of the bare app. Prints the medians and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_legacy_reject import compare

OVERRIDES = ["kv_cache=deepseek_v3_mla", "kv_cache.memory=16GiB", "kv_cache.max_model_len=32768", "action=check",
             "role=scheduler"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=15)
    compare(f"planning {' '.join(OVERRIDES)}", OVERRIDES, p.parse_args().runs)


if __name__ == "__main__":
    main()

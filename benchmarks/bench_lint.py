"""How long ``kvconf lint`` takes for 1,000 ``--kv-transfer-config`` files in one call: the whole
command, interpreter start-up and imports included (vLLM needs about 5 s of imports before it can
judge one).

    .venv/bin/python benchmarks/bench_lint.py [--files 1000] [--runs 5]

Goal (issue #12): under 5 s here. The files are a mix of valid configs (each built-in connector's
export, MultiConnector, vLLM-only keys) and every catalogue entry's misconfiguration, so that every
detector runs. Prints each run's wall time, the median and how many values were invalid; asserts
nothing.
"""

from __future__ import annotations

import argparse
import compileall
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

VALID = [
    {"kv_connector": "MooncakeConnector", "kv_role": "kv_producer",
     "kv_connector_extra_config": {"mooncake_protocol": "rdma", "num_workers": 10}},
    {"kv_connector": "NixlConnector", "kv_role": "kv_consumer",
     "kv_connector_extra_config": {"backends": ["UCX"], "enforce_handshake_compat": False}},
    {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"cpu_bytes_to_use": 4 << 30, "block_size": 64}},
    {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"shared_storage_path": "/data/kv"}},
    {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "NixlConnector", "kv_role": "kv_producer"},
        {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"cpu_bytes_to_use": 10**9}}]}},
]


def write_files(folder: Path, n: int) -> list[str]:
    sys.path.insert(0, str(REPO))
    from kvconf.ci.catalogue import CATALOGUE

    texts = [json.dumps(v, indent=2) for v in VALID]
    texts += [e.example for e in CATALOGUE if e.example.lstrip().startswith(("{", "["))]
    paths = []
    for i in range(n):
        p = folder / f"ktc_{i:04d}.json"
        p.write_text(texts[i % len(texts)] + "\n")
        paths.append(str(p))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    compileall.compile_dir(str(REPO / "kvconf"), quiet=1)  # an installed copy has its bytecode
    with tempfile.TemporaryDirectory() as d:
        paths = write_files(Path(d), args.files)
        cmd = [sys.executable, "-c", "import sys; from kvconf.cli.app import main; sys.exit(main())",
               "lint", "--format", "json", *paths]
        times = []
        out: dict = {}
        for _ in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
            times.append(time.perf_counter() - t0)
            out = json.loads(proc.stdout)
        invalid = len({f["file"] for f in out["findings"] if f["severity"] == "error"})
        print(f"kvconf lint, {args.files} files in one call: runs " + ", ".join(f"{t:.2f}" for t in times)
              + f" s; median {statistics.median(times):.2f} s (goal: under 5 s); {out['checked']} values checked, "
              f"{invalid} files invalid; lint's own timer {out['seconds']} s")


if __name__ == "__main__":
    main()

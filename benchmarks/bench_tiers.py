"""The tier connectors against the raw limits of this machine, in one run.

    .venv/bin/python benchmarks/bench_tiers.py [--reps 5] [--dir /var/tmp]

For 16 KiB, 256 KiB and 2 MiB blocks (one KV layer whose page is the block), the same scattered
block ids are saved and loaded back:
- offloading: the connector's save (``save_kv_layer`` + ``wait_for_save``, one batched gather into
  host memory) and load (``start_load_kv``, a scatter into the cache), against the
  fastest plain torch gather (``index_select``, a loop of ``copy_``) plus the fastest scatter
  (``index_copy_``, ``index_put_``, a loop of ``copy_``) of the same block ids;
- shared_storage: the connector's save (gather, one segment file, fsync, rename) and load (read,
  checksum, scatter), against writing the same bytes as one raw file (write + fsync) and reading
  them back (reads are hot: the page cache holds the file in both cases).
Every loaded byte is verified. Prints median GB/s (save+load bytes over save+load time) and the
ratio connector/raw; asserts nothing. Goal (issue #4): at least 0.7x at 256 KiB and 2 MiB.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

import torch

from kvconf.config.layout import KVCacheLayout
from kvconf.config.models import ConnectorConfig
from kvconf.contract.api import KVCacheBlocks, KVConnectorRole, Request, SchedulerOutput
from kvconf.runtime.allocate import allocate, layer_views
from kvconf.runtime.views import byte_views
from kvconf_connectors.offloading import OffloadingConnector
from kvconf_connectors.shared_storage import SharedStorageConnector

SIZES = [(16 << 10, 8192), (256 << 10, 1024), (2 << 20, 128)]


def setup(cls, block: int, n: int, extra: dict):
    cfg = KVCacheLayout(num_layers=1, block_size=1, dtype="uint8", num_blocks=2 * n,
                        groups=[{"type": "full_attention", "num_kv_heads": 1, "head_size": block // 2}]).to_config()
    cc = ConnectorConfig(name="bench", kv_role="kv_both", extra=extra)
    sched = cls(cc, KVConnectorRole.SCHEDULER, cfg)
    worker = cls(cc, KVConnectorRole.WORKER, cfg)
    buffers = allocate(cfg, "cpu")
    caches = layer_views(cfg, buffers)
    worker.register_kv_caches(caches)
    view = next(iter(byte_views(caches).values()))
    return sched, worker, caches, view


def connector_round(sched, worker, caches, view, n: int, rep: int, rng: random.Random) -> tuple[float, float]:
    """Seconds of the connector's save and of its load of n scattered blocks."""
    ids = list(range(2 * n))
    rng.shuffle(ids)
    save_ids, load_ids = ids[:n], ids[n:]
    tokens = [rep * 1_000_003 + i for i in range(n + 1)]
    view[save_ids] = torch.randint(0, 256, (n, view.shape[1]), dtype=torch.uint8)
    expected = view[save_ids].clone()

    def step(rid, block_ids, save):
        req = Request(rid, tokens)
        m, _ = sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, KVCacheBlocks((block_ids,)), m)
        worker.bind_connector_metadata(sched.build_connector_meta(SchedulerOutput([rid])))
        t0 = time.perf_counter()
        worker.start_load_kv(None)
        if save:
            for name, t in caches.items():
                worker.save_kv_layer(name, t, None)
            worker.wait_for_save()
        dt = time.perf_counter() - t0
        assert not worker.get_load_error_reasons() and not worker.get_save_errors()
        sending, _ = worker.get_finished({rid})
        sched.update_connector_output(sending or set(), set())
        worker.clear_connector_metadata()
        return m, dt

    m, t_save = step(f"s{rep}", save_ids, True)
    assert m == 0
    m, t_load = step(f"l{rep}", load_ids, False)
    assert m == n, f"loaded {m} of {n} tokens"
    assert torch.equal(view[load_ids], expected), "a loaded block differs"
    return t_save, t_load


def raw_copy(view, n: int, rng: random.Random) -> tuple[float, float, str, str]:
    """Fastest plain torch gather and scatter of n scattered blocks."""
    ids = list(range(2 * n))
    rng.shuffle(ids)
    src, dst = torch.tensor(ids[:n]), torch.tensor(ids[n:])
    stage = torch.empty((n, view.shape[1]), dtype=torch.uint8)
    gathers = {
        "index_select": lambda: torch.index_select(view, 0, src, out=stage),
        "copy_ loop": lambda: [stage[j].copy_(view[i]) for j, i in enumerate(ids[:n])],
    }
    scatters = {
        "index_copy_": lambda: view.index_copy_(0, dst, stage),
        "index_put_": lambda: view.index_put_((dst,), stage),
        "copy_ loop": lambda: [view[i].copy_(stage[j]) for j, i in enumerate(ids[n:])],
    }

    def best(fns):
        times = {}
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
        name = min(times, key=times.get)
        return times[name], name

    tg, g = best(gathers)
    ts, s = best(scatters)
    return tg, ts, g, s


def raw_file(view, n: int, folder: str) -> tuple[float, float]:
    """Write n blocks' bytes as one file (write + fsync) and read them back: kvconf's own raw path."""
    from kvconf.bench.raw import raw_file_io

    r = raw_file_io({"layer": view}, 2 * n * view.shape[1], folder, cold=False, reps=1)
    size = r["bytes"] / 2
    return size / (r["write_gbps"] * 1e9), size / (r["read_warm_gbps"] * 1e9)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None, help="folder for shared_storage (default: a temporary one)")
    args = p.parse_args()
    print(f"{'tier':>14} {'block':>7} {'connector GB/s':>15} {'raw GB/s':>9} {'ratio':>6}   raw path (median of {args.reps})")
    for block, n in SIZES:
        label = f"{block >> 10} KiB" if block < 1 << 20 else f"{block >> 20} MiB"
        nbytes = 2 * n * block  # saved + loaded
        rng = random.Random(block)
        # offloading
        sched, worker, caches, view = setup(OffloadingConnector, block, n, {"cpu_bytes_to_use": 4 * n * block})
        conn, raw, how = [], [], ""
        for rep in range(args.reps + 1):
            ts, tl = connector_round(sched, worker, caches, view, n, rep, rng)
            tg, tsc, g, s = raw_copy(view, n, rng)
            if rep:
                conn.append(nbytes / (ts + tl) / 1e9)
                raw.append(nbytes / (tg + tsc) / 1e9)
                how = f"gather {g}, scatter {s}"
        worker.shutdown()
        c, r = statistics.median(conn), statistics.median(raw)
        print(f"{'offloading':>14} {label:>7} {c:>15.2f} {r:>9.2f} {c / r:>6.2f}   {how}", flush=True)
        # shared_storage
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            sched, worker, caches, view = setup(SharedStorageConnector, block, n, {"shared_storage_path": folder})
            conn, raw, parts = [], [], []
            for rep in range(args.reps + 1):
                ts, tl = connector_round(sched, worker, caches, view, n, rep, rng)
                tw, tr = raw_file(view, n, folder)
                if rep:
                    conn.append(nbytes / (ts + tl) / 1e9)
                    raw.append(nbytes / (tw + tr) / 1e9)
                    parts.append((ts, tl, tw, tr))
            worker.shutdown()
        c, r = statistics.median(conn), statistics.median(raw)
        half = nbytes / 2 / 1e9
        ts, tl, tw, tr = (statistics.median(x) for x in zip(*parts))
        print(f"{'shared_storage':>14} {label:>7} {c:>15.2f} {r:>9.2f} {c / r:>6.2f}   one file: write+fsync, read "
              f"(save {half / ts:.2f} vs write {half / tw:.2f}; load {half / tl:.2f} vs read {half / tr:.2f} GB/s)",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())

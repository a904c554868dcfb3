"""The peer-to-peer connectors against their bare engines, same blocks, same two processes.

    .venv/bin/python benchmarks/bench_p2p.py [--reps 5] [--connectors nixl,nixl-push,mooncake]

For each connector and block size (16 KiB, 256 KiB, 2 MiB) a producer process is started with one
KV layer of that page size. The consumer (this process) then, alternately:
- connector: fetches the blocks through the connector's real path (scheduler metadata,
  ``start_load_kv``, side-channel request, producer push or consumer read, per-request result),
  timed from ``start_load_kv`` to the last result; every byte is verified after each repetition;
- bare: the engine alone moves the same source blocks into the same destination blocks: Mooncake's
  ``batch_transfer_sync_write`` in the producer (batches of at most 1024 entries), a NIXL WRITE in
  the producer (push) or a NIXL READ in the consumer (pull), timed around the engine calls alone.
Destination blocks are a random permutation of the consumer's pool, as paged KV is scattered, so
no transfer can be coalesced. Prints a table of median GB/s and the ratio; asserts nothing.
Goals: mooncake (issue #3) and nixl (issue #6) connectors >= 0.8x their bare engines at each size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")

SIZES = [(16 << 10, 8192), (256 << 10, 1024), (2 << 20, 128)]  # (block bytes, blocks per repetition)
REQUESTS = 4


def build(kind: str, block: int, num_blocks: int, kv_role: str):
    from kvconf.config.layout import KVCacheLayout
    from kvconf.config.models import ConnectorConfig
    from kvconf.contract.api import KVConnectorRole
    from kvconf.runtime.allocate import allocate, layer_views

    cfg = KVCacheLayout(num_layers=1, block_size=1, dtype="uint8", num_blocks=num_blocks,
                        groups=[{"type": "full_attention", "num_kv_heads": 1, "head_size": block // 2}]).to_config()
    if kind == "mooncake":
        from kvconf_connectors.mooncake import MooncakeConnector as cls

        extra = {"protocol": "tcp", "num_workers": int(os.environ.get("BENCH_WORKERS", "10"))}
    else:
        from kvconf_connectors.nixl import NixlConnector as cls

        extra = {"mode": "push" if kind == "nixl-push" else "pull"}
    conn = cls(ConnectorConfig(name=kind.split("-")[0], kv_role=kv_role, extra=extra), KVConnectorRole.WORKER, cfg)
    buffers = allocate(cfg, "cpu")
    views = layer_views(cfg, buffers)
    conn.register_kv_caches(views)
    return conn, cfg, buffers


def producer(kind: str, block: int, num_blocks: int) -> None:
    """Child: serves the connector's side channel and a control socket for bare-engine writes."""
    import types

    import zmq

    from kvconf_connectors.mooncake import MAX_BATCH
    from kvconf_connectors.p2p.producer import Producer

    conn, cfg, buffers = build(kind, block, num_blocks, "kv_producer")
    server = Producer(conn)
    address = server.bind()
    stop = threading.Event()
    serving = threading.Thread(target=server.run, args=(stop,), daemon=True)
    serving.start()
    ctl = zmq.Context.instance().socket(zmq.REP)
    ctl_port = ctl.bind_to_random_port("tcp://127.0.0.1")
    base, stride, page = conn._regions[next(iter(conn._regions))]
    print(json.dumps({"address": address, "control": ctl_port, "base": base, "stride": stride}), flush=True)
    while True:
        cmd = json.loads(ctl.recv())
        if cmd["op"] == "quit":
            ctl.send(b"{}")
            break
        src = [base + s * stride for s in cmd["src"]]
        dst = [cmd["dst_base"] + d * cmd["dst_stride"] for d in cmd["dst"]]
        lens = [page] * len(src)
        t0 = time.perf_counter()
        rc = 0
        if kind == "mooncake":
            for i in range(0, len(src), MAX_BATCH):
                rc |= conn._engine.batch_transfer_sync_write(cmd["session"], src[i:i + MAX_BATCH],
                                                             dst[i:i + MAX_BATCH], lens[i:i + MAX_BATCH])
        else:  # one NIXL WRITE of the same descriptors
            msg = types.SimpleNamespace(meta=bytes.fromhex(cmd["meta"]), session=cmd["session"])
            rc = 1 if conn._engine_push(msg, src, dst, lens) else 0
        ctl.send(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0}).encode())
    stop.set()
    serving.join()
    server.close()
    conn.shutdown()
    ctl.close(linger=0)
    sys.stdout.flush()
    os._exit(0)  # a NIXL UCX agent would crash the normal exit


def consumer(kind: str, block: int, num_blocks: int, reps: int) -> dict:
    import torch
    import zmq

    from kvconf.contract.api import KVCacheBlocks, KVConnectorRole, Request, SchedulerOutput
    from kvconf.runtime.pattern import block_pattern
    from kvconf_connectors.p2p import protocol as sc
    child = subprocess.Popen([sys.executable, __file__, "--producer", kind, str(block), str(num_blocks)],
                             stdout=subprocess.PIPE, text=True)
    info = json.loads(child.stdout.readline())
    conn, cfg, buffers = build(kind, block, num_blocks, "kv_consumer")
    view = next(iter(conn._views.values()))
    base, stride, page = conn._regions[next(iter(conn._regions))]
    scheduler = type(conn)(conn.config, KVConnectorRole.SCHEDULER, cfg)
    zctx = zmq.Context.instance()
    control = zctx.socket(zmq.DEALER)
    control.connect(f"tcp://{info['address']}")
    bare = zctx.socket(zmq.REQ)
    bare.connect(f"tcp://127.0.0.1:{info['control']}")

    def ask(msg):
        control.send(sc.encode(msg))
        return sc.decode(control.recv())

    hello = ask(sc.Hello(engine_id=conn.config.engine_id))
    rng = random.Random(7)
    per = num_blocks // REQUESTS
    results = {"connector": [], "bare": []}
    for rep in range(reps + 1):  # the first is a warm-up
        dst = list(range(num_blocks))
        rng.shuffle(dst)
        # connector: prefill (untimed), then the engine's load path
        reqs = []
        for r in range(REQUESTS):
            rid = f"bench-{rep}-{r}"
            ack = ask(sc.Prefill(request_id=rid, seed=rep * REQUESTS + r, num_blocks=per))
            assert ack.ok, ack.reason
            ids = dst[r * per:(r + 1) * per]
            req = Request(rid, [0] * per, {"do_remote_prefill": True, "remote_address": info["address"]})
            n, _ = scheduler.get_num_new_matched_tokens(req, 0)
            scheduler.update_state_after_alloc(req, KVCacheBlocks((ids,)), n)
            reqs.append((rid, ids, rep * REQUESTS + r))
        meta = scheduler.build_connector_meta(SchedulerOutput())
        waiting = {rid for rid, _, _ in reqs}
        t0 = time.perf_counter()
        conn.bind_connector_metadata(meta)
        conn.start_load_kv(None)
        while waiting:
            _, done = conn.get_finished(set())
            waiting -= done or set()
            if waiting:
                conn.wait_for_results(0.05)
        dt = time.perf_counter() - t0
        failures = conn.take_failures()
        assert not failures, failures
        for rid, ids, seed in reqs:
            for j, b in enumerate(ids):
                assert torch.equal(view[b], block_pattern(seed, 0, j, page)), f"block {b} of {rid} differs"
        # bare engine: the same source blocks into the same destination blocks
        src = list(range(num_blocks))
        if kind == "nixl":  # pull: this side READs
            s_addrs = [info["base"] + i * info["stride"] for i in src]
            d_addrs = [base + d * stride for d in dst]
            t1 = time.perf_counter()
            handle = conn._engine_read(hello.meta, s_addrs, d_addrs, [page] * len(src))
            while (state := conn._engine_poll(handle)) == "PROC":
                pass
            reply = {"rc": 0 if state == "DONE" else 1, "seconds": time.perf_counter() - t1}
        else:
            bare.send(json.dumps({"op": "write", "session": conn._session, "src": src, "dst": dst,
                                  "dst_base": base, "dst_stride": stride, "meta": conn._engine_meta.hex()}).encode())
            reply = json.loads(bare.recv())
        assert reply["rc"] == 0
        if rep:
            results["connector"].append(num_blocks * page / dt / 1e9)
            results["bare"].append(num_blocks * page / reply["seconds"] / 1e9)
    bare.send(b'{"op": "quit"}')
    bare.recv()
    child.wait(timeout=30)
    control.close(linger=0)
    bare.close(linger=0)
    scheduler.shutdown()
    conn.shutdown()
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--connectors", default="nixl,nixl-push,mooncake")
    p.add_argument("--producer", nargs=3)
    args = p.parse_args()
    if args.producer:
        producer(args.producer[0], int(args.producer[1]), int(args.producer[2]))
        return
    print(f"{'connector':>10} {'block':>8} {'blocks':>6} {'connector GB/s':>15} {'bare GB/s':>10} {'ratio':>6}"
          f"   (median of {args.reps})")
    for kind in args.connectors.split(","):
        for block, n in SIZES:
            r = consumer(kind, block, n, args.reps)
            c, b = statistics.median(r["connector"]), statistics.median(r["bare"])
            label = f"{block >> 10} KiB" if block < 1 << 20 else f"{block >> 20} MiB"
            print(f"{kind:>10} {label:>8} {n:>6} {c:>15.2f} {b:>10.2f} {c / b:>6.2f}   connector "
                  f"{min(r['connector']):.2f}-{max(r['connector']):.2f}, bare {min(r['bare']):.2f}-{max(r['bare']):.2f}",
                  flush=True)
    sys.stdout.flush()
    os._exit(0)  # this process created NIXL UCX agents


if __name__ == "__main__":
    main()

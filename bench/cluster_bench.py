"""Scale-out benchmark: aggregate throughput over 1, 2 and 4 nodes, and hit rate after losing a node.

    python bench/cluster_bench.py [--seconds 3] [--clients 4] [--json out.json]

Throughput: `--clients` client processes each put then get 1 MiB values (batches of 4) through a
MembrainCluster for `--seconds`; the aggregate GB/s is reported as a ratio to one node, measured in the
same run. Node loss: 2000 keys written to 4 nodes with R=1 and with R=2, one node killed, then the share
of keys still readable. On one machine all nodes and clients share the same cores, so the throughput
ratio shows the routing overhead rather than the gain of separate hosts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import anyio
import orjson

from membrain_async.client.cluster import MembrainCluster
from membrain_async.server.embed import start_subprocess_server


def _client(urls: list[str], seconds: float, seed: int, out) -> None:
    async def run() -> float:
        value = os.urandom(1 << 20)
        moved = 0
        async with MembrainCluster(urls, timeout=30) as c:
            end = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < end:
                keys = [f"c{seed}-{i + j}" for j in range(4)]
                await c.put_many(keys, [value] * 4)
                got = await c.get_many(keys)
                moved += 8 << 20 if all(v is not None for v in got) else 4 << 20
                i += 4
        return moved

    t0 = time.perf_counter()
    moved = anyio.run(run)
    out.put(moved / (time.perf_counter() - t0) / 1e9)


def throughput(n_nodes: int, clients: int, seconds: float) -> float:
    servers = [start_subprocess_server({"port": 0, "capacity": "512MiB"}) for _ in range(n_nodes)]
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_client, args=([s.url for s in servers], seconds, i, q)) for i in range(clients)]
        for p in procs:
            p.start()
        total = sum(q.get(timeout=seconds + 120) for _ in procs)
        for p in procs:
            p.join()
        return total
    finally:
        for s in servers:
            s.stop()


def node_loss(replicas: int, n_keys: int = 2000) -> dict[str, float]:
    servers = [start_subprocess_server({"port": 0, "capacity": "256MiB"}) for _ in range(4)]
    try:
        async def run() -> dict[str, float]:
            keys = [f"k{i}" for i in range(n_keys)]
            async with MembrainCluster([s.url for s in servers], replicas=replicas, timeout=1.0, breaker_threshold=1) as c:
                await c.put_many(keys, [b"v" * 4096] * n_keys)
                before = sum(v is not None for v in await c.get_many(keys)) / n_keys
                servers[0].kill()
                t = time.perf_counter()
                after = sum(v is not None for v in await c.get_many(keys)) / n_keys
                return {"hit_rate_before": before, "hit_rate_after": after, "read_after_loss_s": time.perf_counter() - t}

        return anyio.run(run)
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict = {"throughput_gbps": {}, "node_loss": {}}
    for n in (1, 2, 4):
        results["throughput_gbps"][n] = throughput(n, args.clients, args.seconds)
        ratio = results["throughput_gbps"][n] / results["throughput_gbps"][1]
        print(f"{n} node(s), {args.clients} clients: {results['throughput_gbps'][n]:.2f} GB/s aggregate ({ratio:.2f}x one node)", flush=True)
    for r in (1, 2):
        res = node_loss(r)
        results["node_loss"][f"R={r}"] = res
        print(f"R={r}: hit rate {res['hit_rate_before']:.2%} before, {res['hit_rate_after']:.2%} after losing 1 of 4 nodes "
              f"(reads after the loss took {res['read_after_loss_s'] * 1e3:.0f} ms)", flush=True)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

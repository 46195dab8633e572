"""Past one host: Membrain nodes vs Redis Cluster (vs Mooncake) at 1, 2 and 4 nodes, and losing a node.

    python bench/cluster_bench.py [--seconds 2] [--clients 2] [--nodes 1 2 4] [--json bench/results/cluster.json]

Every arm goes through the client the connector builds for its endpoint (`client/backends.py`: the
endpoint's scheme picks Membrain nodes, Redis Cluster or Mooncake), on the same payloads: `--clients`
processes each put 1 MiB values in batches of 4 for `--seconds`, then get their most recent 64 of them
for `--seconds`; aggregate put and get GB/s. Then one process times 300 prefix lookups of 16 keys (p50,
p99). Node loss: 2000 blocks of 16 KiB written to 4 nodes, one node SIGKILLed, then the share still
readable at once and (Redis Cluster) once its replica has taken over: Membrain with R=1 and R=2, Redis
Cluster with 4 masters and 1 replica each (WAIT before the kill, so every write is on its replica).

Redis Cluster nodes run as a cache should (no persistence, maxmemory + allkeys-lru); 1 and 2 nodes are
clusters too (slots assigned by hand), so the routing is the same at every size. The Mooncake arm uses
a `mooncake://` endpoint through the same dispatch and `bench/peers.py`'s MooncakeService, and is
reported as skipped, with the reason, when the backend or the service cannot start.

On one machine all nodes and clients share the same cores (2 here): the figures show what routing over
N nodes costs, not what N hosts gain.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import anyio
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from membrain_async.client.backends import open_client  # noqa: E402
from membrain_async.config import ConnectorConfig  # noqa: E402
from membrain_async.server.embed import start_subprocess_server  # noqa: E402
from arg_types import json_output  # noqa: E402

VALUE = 1 << 20
BATCH = 4
RECENT = 64


def _config(endpoints: list[str], **kw) -> ConnectorConfig:
    # A store's own settings (the Mooncake arm's metadata server) reach the spawned clients by environment.
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_MEMBRAIN_MOONCAKE_")}
    return ConnectorConfig.from_sources(env=env, overrides={"endpoint": ",".join(endpoints), "timeout": 30, **kw})


def _client(endpoints: list[str], seconds: float, seed: int, out) -> None:
    async def run() -> dict:
        c = open_client(_config(endpoints))
        value = os.urandom(VALUE)
        keys: list[str] = []
        try:
            put = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                ks = [f"c{seed}-{len(keys) + j}" for j in range(BATCH)]
                put += await c.put_many(ks, [value] * BATCH) * VALUE
                keys += ks
            put_s = time.perf_counter() - t0
            recent = keys[-RECENT:]
            got = i = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                ks = [recent[(i + j) % len(recent)] for j in range(BATCH)]
                got += sum(len(v) for v in await c.get_many(ks) if v is not None)
                i += BATCH
            get_s = time.perf_counter() - t0
            return {"put": put / put_s / 1e9, "get": got / get_s / 1e9, "keys": recent}
        finally:
            await c.aclose()

    out.put(anyio.run(run))


def _lookups(endpoints: list[str], keys: list[str], n: int = 300) -> list[float]:
    async def run() -> list[float]:
        c = open_client(_config(endpoints))
        try:
            await c.lookup(keys[:16])  # connections and slot map first
            lat = []
            for i in range(n):
                t = time.perf_counter()
                await c.lookup(keys[(i % 4) * 16 : (i % 4) * 16 + 16])
                lat.append(time.perf_counter() - t)
            return lat
        finally:
            await c.aclose()

    return anyio.run(run)


def measure(endpoints: list[str], clients: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(endpoints, seconds, i, q)) for i in range(clients)]
    for p in procs:
        p.start()
    results = [q.get(timeout=2 * seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(_lookups(endpoints, results[0]["keys"]))
    return {"put_gbps": sum(r["put"] for r in results), "get_gbps": sum(r["get"] for r in results),
            "lookup_p50_us": lat[len(lat) // 2] * 1e6, "lookup_p99_us": lat[int(len(lat) * 0.99)] * 1e6}


# ------------------------------------------------------------------ the stores


class MembrainNodes:
    name = "membrain"

    def __init__(self, n: int, capacity: str = "512MiB"):
        self.servers = [start_subprocess_server({"port": 0, "capacity": capacity}) for _ in range(n)]
        self.endpoints = [s.url for s in self.servers]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


class RedisClusterNodes:
    name = "redis-cluster"

    def __init__(self, n: int, replicas: int = 0, maxmemory: str = "512mb"):
        from membrain_async.testing.redis_servers import RedisCluster

        self.cluster = RedisCluster(n, replicas, 1000, "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru")
        self.endpoints = [self.cluster.url]

    def stop(self) -> None:
        self.cluster.stop()


class MooncakeNodes:
    """The hook for the Mooncake backend: a `mooncake://` endpoint through the same dispatch."""

    name = "mooncake"

    @staticmethod
    def unavailable() -> str | None:
        try:
            import membrain_async.client.mooncake_store  # noqa: F401
        except ImportError as exc:
            return f"the Mooncake backend does not import here: {exc}"
        from peers import MooncakeService

        return MooncakeService.unavailable()

    def __init__(self, n: int):
        from peers import MooncakeService

        if n != 1:
            raise RuntimeError("one Mooncake master with one store segment is what peers.py starts")
        self.service = MooncakeService()
        self.endpoints = [f"mooncake://{self.service.params['master']}"]
        os.environ["VLLM_MEMBRAIN_MOONCAKE_METADATA_SERVER"] = self.service.params["metadata"]

    def stop(self) -> None:
        os.environ.pop("VLLM_MEMBRAIN_MOONCAKE_METADATA_SERVER", None)
        self.service.stop()


def redis_unavailable() -> str | None:
    from membrain_async.testing.redis_servers import unavailable_reason

    return unavailable_reason()


# ------------------------------------------------------------------ node loss


def _read_share(endpoints: list[str], keys: list[str], **kw) -> float:
    async def run() -> float:
        c = open_client(_config(endpoints, timeout=1.0, breaker_threshold=1, **kw))
        try:
            got = await c.get_many(keys)
            return sum(v is not None for v in got) / len(keys)
        finally:
            await c.aclose()

    return anyio.run(run)


def _write(endpoints: list[str], keys: list[str], **kw) -> int:
    async def run() -> int:
        c = open_client(_config(endpoints, **kw))
        try:
            return await c.put_many(keys, [os.urandom(16 << 10) for _ in keys])
        finally:
            await c.aclose()

    return anyio.run(run)


def membrain_loss(replicas: int, n_keys: int = 2000) -> dict:
    nodes = MembrainNodes(4, "256MiB")
    try:
        keys = [f"k{i}" for i in range(n_keys)]
        _write(nodes.endpoints, keys, replicas=replicas)
        before = _read_share(nodes.endpoints, keys, replicas=replicas)
        nodes.servers[0].kill()
        t = time.perf_counter()
        after = _read_share(nodes.endpoints, keys, replicas=replicas)
        return {"hit_rate_before": before, "hit_rate_after": after, "read_after_loss_s": time.perf_counter() - t}
    finally:
        nodes.stop()


def redis_loss(n_keys: int = 2000) -> dict:
    nodes = RedisClusterNodes(4, replicas=1, maxmemory="256mb")
    try:
        keys = [f"k{i}" for i in range(n_keys)]
        _write(nodes.endpoints, keys)
        nodes.cluster.wait_replicated()
        before = _read_share(nodes.endpoints, keys)
        victim = nodes.cluster.masters()[0]
        seeds = [u for u in nodes.cluster.urls if not u.endswith(f":{victim.port}")]
        victim.kill()
        t = time.perf_counter()
        during = _read_share(seeds, keys)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        nodes.cluster.wait_failover(victim)
        failover_s = time.perf_counter() - t
        after = _read_share(seeds, keys)
        return {"hit_rate_before": before, "hit_rate_during_failover": during, "read_after_loss_s": read_s,
                "failover_s": failover_s, "hit_rate_after": after}
    finally:
        nodes.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    arms = {"membrain": (MembrainNodes, lambda: None), "redis-cluster": (RedisClusterNodes, redis_unavailable),
            "mooncake": (MooncakeNodes, MooncakeNodes.unavailable)}
    results: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
                     "params": {"value_bytes": VALUE, "batch": BATCH, "clients": args.clients, "seconds": args.seconds},
                     "throughput": {}, "node_loss": {}, "skipped": {}}
    for arm, (cls, unavailable) in arms.items():
        reason = unavailable()
        if reason:
            results["skipped"][arm] = reason
            print(f"{arm}: skipped: {reason}", flush=True)
            continue
        for n in args.nodes:
            try:
                store = cls(n)
            except Exception as exc:  # an arm that cannot start at this size is reported, not fatal
                results["skipped"][f"{arm}@{n}"] = f"{type(exc).__name__}: {exc}"
                print(f"{arm} at {n} node(s): skipped: {exc}", flush=True)
                continue
            try:
                r = measure(store.endpoints, args.clients, args.seconds)
            finally:
                store.stop()
            results["throughput"][f"{arm}@{n}"] = r
            print(f"{arm:14s} {n} node(s): put {r['put_gbps']:.2f} GB/s, get {r['get_gbps']:.2f} GB/s, "
                  f"lookup(16) p50 {r['lookup_p50_us']:.0f} us p99 {r['lookup_p99_us']:.0f} us", flush=True)
    for r in (1, 2):
        res = membrain_loss(r)
        results["node_loss"][f"membrain R={r}"] = res
        print(f"membrain R={r}: hit rate {res['hit_rate_before']:.1%} before, {res['hit_rate_after']:.1%} right after "
              f"losing 1 of 4 nodes", flush=True)
    if not redis_unavailable():
        res = redis_loss()
        results["node_loss"]["redis-cluster 4+4"] = res
        print(f"redis-cluster 4 masters + 4 replicas: hit rate {res['hit_rate_before']:.1%} before, "
              f"{res['hit_rate_during_failover']:.1%} right after losing a master, {res['hit_rate_after']:.1%} after "
              f"the failover ({res['failover_s']:.1f} s)", flush=True)
    results["summary"] = {
        "note": "one 2-core machine: nodes and clients share the cores, so this shows routing cost, not the gain of separate hosts",
        "throughput_gbps_put_get": {k: [round(v["put_gbps"], 2), round(v["get_gbps"], 2)] for k, v in results["throughput"].items()},
        "lookup_p50_us": {k: round(v["lookup_p50_us"]) for k, v in results["throughput"].items()},
        "hit_rate_after_losing_one_of_four": {k: round(v["hit_rate_after"], 3) for k, v in results["node_loss"].items()},
        "skipped": results["skipped"],
    }
    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

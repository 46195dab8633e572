"""Membrain's store calls against Redis: a standalone redis-server or a 3+3 Redis Cluster, started here.

    python examples/redis_store.py [--cluster] [--backend asyncio|trio]

Needs Debian's redis-server and `pip install -e '.[redis]'`. For vLLM the same endpoint goes into
VLLM_MEMBRAIN_ENDPOINT (e.g. redis+cluster://10.0.0.1:6379) and nothing else changes.
"""

from __future__ import annotations

import argparse

import anyio

from membrain_async.client.backends import open_client
from membrain_async.config import ConnectorConfig
from membrain_async.testing.redis_servers import RedisCluster, RedisServer, unavailable_reason


async def show(endpoint: str) -> None:
    config = ConnectorConfig.from_sources(env={}, overrides={"endpoint": endpoint, "namespace": "example"})
    client = open_client(config)  # the client the connector builds: chosen by the endpoint's scheme
    try:
        keys = [f"block-{i}" for i in range(8)]
        stored = await client.put_many(keys[:5], [b"kv-bytes" * 1000] * 5)
        print(f"{client.url}: stored {stored}, leading blocks present {await client.lookup(keys)} of {len(keys)}")
        print("values:", [None if v is None else len(v) for v in await client.get_many(keys[3:7])])
    finally:
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", action="store_true")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = ap.parse_args()
    if unavailable_reason():
        raise SystemExit(unavailable_reason())
    store = RedisCluster(3, 1) if args.cluster else RedisServer("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    try:
        anyio.run(show, store.url, backend=args.backend)
    finally:
        store.stop()


if __name__ == "__main__":
    main()

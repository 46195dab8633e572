"""Mooncake Store through Membrain's client, at 1 node: put/get GB/s and prefix-lookup latency.

    python bench/mooncake_client_bench.py [--rounds 3] [--keys 256] [--json bench/results/mooncake_client.json]

Values of 1 MiB in batches of 4, as bench/cluster_bench.py moves them. The segment's memory is written
once before (untimed), so no measurement pays its first page faults. Each round puts `--keys` fresh keys,
gets them back three times, then removes them (the store never fills, so no put is refused). Then
`--lookups` prefix lookups of 40 stored keys (one request's blocks at the demo's size). Measured in the
same run, on the same loopback: Mooncake through `MooncakeClient` (what the connector uses: a worker
thread per call, gets into the caller's buffers, one copy each way through registered slabs); Mooncake's own API called directly from
registered buffers (batch_put_from / batch_get_into, as bench/peers.py drives it), for the client's
overhead; and a Membrain node through `MembrainClient`, for scale. One client, one process each.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import anyio
import orjson

import provenance  # bench/, beside this script
from arg_types import json_output  # bench/, beside this script

from membrain_async.cache.remote import make_client
from membrain_async.client import MembrainClient
from membrain_async.config import ConnectorConfig
from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import mooncake

SIZE = 1 << 20
BATCH = 4
PREFIX = 40
CAPACITY = 512 << 20


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def through_client(client, rounds: int, nkeys: int, lookups: int, tag: str) -> dict:
    value = os.urandom(SIZE)
    into = [memoryview(bytearray(SIZE)) for _ in range(BATCH)]
    puts, gets = [], []
    for r in range(rounds):
        keys = [f"{tag}-{r}-{i}" for i in range(nkeys)]
        t0 = time.perf_counter()
        for i in range(0, nkeys, BATCH):
            assert await client.put_many(keys[i : i + BATCH], [value] * BATCH) == BATCH, "put refused"
        puts.append(nkeys * SIZE / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        for _ in range(3):
            for i in range(0, nkeys, BATCH):
                # Into buffers, as the connector's loads do (get_many_into).
                got = await client.get_many_into(keys[i : i + BATCH], into)
                assert got == [SIZE] * BATCH, "get missed"
        gets.append(3 * nkeys * SIZE / (time.perf_counter() - t0) / 1e9)
        if r == rounds - 1:
            lat = []
            for _ in range(lookups):
                t0 = time.perf_counter()
                assert await client.lookup(keys[:PREFIX]) == min(PREFIX, nkeys)
                lat.append(time.perf_counter() - t0)
        for k in keys:
            await client.delete(k)
    return _summary(puts, gets, lat)


def _summary(puts: list[float], gets: list[float], lat: list[float]) -> dict:
    return {
        "put_GBps": round(statistics.median(puts), 3), "get_GBps": round(statistics.median(gets), 3),
        "put_GBps_rounds": [round(x, 3) for x in puts], "get_GBps_rounds": [round(x, 3) for x in gets],
        "lookup_40_keys_us": {"p50": round(_pct(lat, 0.5) * 1e6, 1), "p99": round(_pct(lat, 0.99) * 1e6, 1),
                              "n": len(lat)},
    }


def warm(mc: mooncake.MooncakeCluster) -> None:
    """Untimed: write the segment's whole capacity once and remove it, so neither measurement pays for
    the segment's first page faults (whichever ran first would)."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", mc.metadata, 0, 64 << 20, "tcp", "", mc.master_addr) == 0
    value = bytes(SIZE)
    keys = [f"warm-{i}" for i in range(CAPACITY // SIZE)]
    for i in range(0, len(keys), 8):
        store.upsert_batch(keys[i : i + 8], [value] * 8)
    store.batch_remove(keys, True)
    store.close()


def mooncake_raw(mc: mooncake.MooncakeCluster, rounds: int, nkeys: int, lookups: int) -> dict:
    """Mooncake's own API from registered buffers: the ceiling the client is measured against."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", mc.metadata, 0, 64 << 20, "tcp", "", mc.master_addr) == 0
    src = bytearray(os.urandom(SIZE * BATCH))
    dst = bytearray(SIZE * BATCH)
    addr = [ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) for b in (src, dst)]
    for a, b in zip(addr, (src, dst)):
        assert store.register_buffer(a, len(b)) == 0
    sp = [addr[0] + i * SIZE for i in range(BATCH)]
    dp = [addr[1] + i * SIZE for i in range(BATCH)]
    puts, gets, lat = [], [], []
    for r in range(rounds):
        keys = [f"raw-{r}-{i}" for i in range(nkeys)]
        t0 = time.perf_counter()
        for i in range(0, nkeys, BATCH):
            assert store.batch_put_from(keys[i : i + BATCH], sp, [SIZE] * BATCH) == [0] * BATCH
        puts.append(nkeys * SIZE / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        for _ in range(3):
            for i in range(0, nkeys, BATCH):
                assert store.batch_get_into(keys[i : i + BATCH], dp, [SIZE] * BATCH) == [SIZE] * BATCH
        gets.append(3 * nkeys * SIZE / (time.perf_counter() - t0) / 1e9)
        if r == rounds - 1:
            for _ in range(lookups):
                t0 = time.perf_counter()
                assert store.batch_is_exist(keys[:PREFIX]) == [1] * min(PREFIX, nkeys)
                lat.append(time.perf_counter() - t0)
        store.batch_remove(keys, True)
    for a in addr:
        store.unregister_buffer(a)
    store.close()
    return _summary(puts, gets, lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=256)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    reason = mooncake.unavailable()
    if reason:
        print(f"mooncake: skipped: {reason}")
        if args.json:
            with open(args.json, "wb") as f:
                f.write(orjson.dumps({"skipped": reason}, option=orjson.OPT_INDENT_2))
        return
    out: dict = {"command": "python " + " ".join(sys.argv), "value_bytes": SIZE, "batch": BATCH,
                 "keys_per_round": args.keys, "rounds": args.rounds, "mooncake_version": mooncake.version(),
                 "protocol": "tcp", "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                 "commit": provenance.commit()}
    with mooncake.MooncakeCluster(CAPACITY) as mc:
        warm(mc)
        cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": mc.endpoint, "mooncake_metadata_server": mc.metadata,
                                                              "timeout": 30})

        async def run_client() -> dict:
            client = make_client(cfg)
            try:
                return await through_client(client, args.rounds, args.keys, args.lookups, "mc")
            finally:
                await client.aclose()

        out["mooncake_client"] = anyio.run(run_client)
        out["mooncake_raw"] = mooncake_raw(mc, args.rounds, args.keys, args.lookups)
    server = start_subprocess_server({"port": 0, "capacity": "1GiB", "max_value_bytes": "64MiB"})
    try:
        async def run_membrain() -> dict:
            async with MembrainClient(server.url, timeout=30) as client:
                return await through_client(client, args.rounds, args.keys, args.lookups, "mb")

        out["membrain_client"] = anyio.run(run_membrain)
    finally:
        server.stop()
    c, raw = out["mooncake_client"], out["mooncake_raw"]
    out["client_vs_raw"] = {"put": round(c["put_GBps"] / raw["put_GBps"], 2), "get": round(c["get_GBps"] / raw["get_GBps"], 2),
                            "lookup_p50": round(c["lookup_40_keys_us"]["p50"] / raw["lookup_40_keys_us"]["p50"], 2)}
    text = orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

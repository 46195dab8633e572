"""Puts against the loopback ceiling: single 1 MiB puts (and batches of 8) into a full, evicting
`membrain serve`, beside a raw Python socket doing the same put-and-ack, in the same run.

    python bench/put_bench.py [--rounds 5] [--seconds 1.5] [--json bench/results/put.json]

One client, one connection, one request at a time (what a save's upload waits on). The server is filled
past its capacity first (untimed), so every timed put evicts. Rounds interleave raw and Membrain; the
figure is the median of each round's ratio, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import anyio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
from arg_types import json_output, positive_float, positive_int  # noqa: E402
import rawsock  # noqa: E402

from membrain_async.client import MembrainClient  # noqa: E402
from membrain_async.server.embed import start_subprocess_server  # noqa: E402

SIZE = 1 << 20
CAPACITY = 256 << 20


def raw_put(total: int, seconds: float) -> float:
    peer = rawsock.RawPeer()
    try:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            peer.put(total)
            n += 1
        return n * total / (time.perf_counter() - t0) / 1e9
    finally:
        peer.close()


async def membrain_put(url: str, batch: int, seconds: float, tag: str) -> float:
    values = [os.urandom(SIZE) for _ in range(batch)]
    async with MembrainClient(url, timeout=60) as client:
        # Untimed: the client's first contact (server info, the bulk connection), as the raw peer
        # connects before its clock starts.
        assert await client.put_many([f"{tag}-warm-{i}" for i in range(batch)], values) == batch, "put refused"
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            keys = [f"{tag}-{n}-{i}" for i in range(batch)]
            assert await client.put_many(keys, values) == batch, "put refused"
            n += 1
        return n * batch * SIZE / (time.perf_counter() - t0) / 1e9


async def fill(url: str) -> None:
    value = os.urandom(SIZE)
    async with MembrainClient(url, timeout=60) as client:
        for i in range(0, 2 * CAPACITY // SIZE, 8):
            await client.put_many([f"fill-{i + j}" for j in range(8)], [value] * 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--seconds", type=positive_float, default=1.5)
    p.add_argument("--json", type=json_output, default=None)
    a = p.parse_args()
    out = {"bench": "put", "date": provenance.utc_now(), "commit": provenance.commit(), "value_bytes": SIZE, "capacity_bytes": CAPACITY, "cpus": os.cpu_count(),
           "command": "python " + " ".join(sys.argv), "cells": {}}
    server = start_subprocess_server({"port": 0, "capacity": str(CAPACITY)})
    try:
        anyio.run(fill, server.url)
        for batch in (1, 8):
            rounds = []
            for r in range(a.rounds):
                raw = raw_put(batch * SIZE, a.seconds)
                mb = anyio.run(membrain_put, server.url, batch, a.seconds, f"b{batch}-r{r}")
                rounds.append({"raw_GBps": round(raw, 3), "membrain_GBps": round(mb, 3), "ratio": round(mb / raw, 3)})
                print(f"batch {batch} round {r}: raw {raw:.2f} GB/s, membrain {mb:.2f} GB/s, {mb / raw:.2f}x",
                      flush=True)
            out["cells"][f"1MiB_x{batch}"] = {"rounds": rounds,
                                              "median_ratio": statistics.median(x["ratio"] for x in rounds)}
    finally:
        server.stop()
    provenance.emit(out, a.json)


if __name__ == "__main__":
    main()

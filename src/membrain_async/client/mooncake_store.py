"""Mooncake Store as a Membrain backend: `VLLM_MEMBRAIN_ENDPOINT=mooncake://master:port`.

The same store protocol as a Membrain node (store.py), so the same client does the rest: `MooncakeClient`
is a `StoreClient` (splitting, per-call timeout, retries, circuit breaker) over `MooncakeTransport`. Keys
and payloads are Membrain's own (header with checksum and key tag); the reader checks them above the
client, so whatever Mooncake hands back is verified before it reaches vLLM.

Why threads. Mooncake's Python API (`mooncake.store.MooncakeDistributedStore`, from the optional wheel
`mooncake-transfer-engine-non-cuda`) is synchronous and blocks: against a dead master each call spends
about 4.3 s reconnecting. Every call therefore runs in a daemon worker thread of this module's pool, at
most VLLM_MEMBRAIN_MOONCAKE_THREADS awaited at once, never on the event loop; the thread wakes the loop
when it is done (asyncio or trio). StoreClient's timeout (VLLM_MEMBRAIN_TIMEOUT) abandons a call that
overruns it: the caller sees "unavailable" at once (a miss above), the thread finishes Mooncake's call on
its own and its result is dropped. Abandoned threads are bounded: while twice the thread limit of calls
are still running, new calls fail fast (`OSError`, so the breaker opens) instead of piling up threads
behind a hung store. At exit the process waits up to EXIT_WAIT for calls still inside Mooncake.

`setup()` is worse: it holds the GIL (every Python thread of the process stops) for ~4.4 s per attempt
against an unreachable master, 20 attempts by default. It runs only once the master's and the metadata
server's ports accept a connection, with one attempt (see SETUP_RETRIES); until then calls fail fast.

Bytes move through memory registered with Mooncake (mooncake_buffers.py): a put copies the caller's
pages into a registered slab and Mooncake sends them from there (batch_upsert_from); a load's get lands
in a slab (batch_get_into) and is copied once into the caller's buffer. Measured against Mooncake's own
buffer (upsert_batch, batch_get_buffer and a copy out of it): bench/mooncake_client_bench.py.

What an abandoned thread may touch: only memory it owns. A put copies the caller's pages into its slab
in a thread that is never abandoned (a memcpy, bounded), then hands only the slab to Mooncake; a get
into a caller's buffer (`get_into`) lands in the thread's slab and is copied on the loop after the
thread has returned a complete value. A slab goes back to the pool only once both the thread and the
caller are done with it. So a late or failed transfer never writes into memory vLLM uses, and a buffer
is handed on only whole.

Keys: `<namespace>/<block key>` (Mooncake has one flat key space per tenant; the namespace is part of
the key, as it is on a Membrain server). Writes are upserts: Mooncake's plain put of an existing key
silently keeps the old value, which would make a corrupt block (found by the reader, `BlockStore.forget`)
unrepairable.

Refusals. A put the store refuses because it is full (NO_AVAILABLE_HANDLE: every segment at Mooncake's
eviction watermark and the rest still leased) is not stored; put reports the shortfall, the uploader
counts those saves as failed, and this transport counts them (`stats.puts_refused_full`). Connection
failures (RPC_FAIL, TRANSFER_FAIL on every key) raise OSError: unavailable.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

from .. import scatter
from ..config import ConnectorConfig
from ..urls import redact_url
from .blocking import EXIT_WAIT, BlockingPool, start_daemon
from .breaker import CircuitBreaker
from .mooncake_buffers import SLAB_BYTES, Lease, RegisteredSlabs
from .node import StoreClient
from .store import Limits, PutValue, value_parts

log = logging.getLogger("membrain.client")

T = TypeVar("T")

DEFAULT_MASTER_PORT = 50051  # mooncake_master's own default
DEFAULT_METADATA_PORT = 8080  # its built-in HTTP metadata server's default

# Mooncake's error codes (mooncake-store/include/types.h) that this transport tells apart.
NO_AVAILABLE_HANDLE = -200  # no segment has room: the store is full
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
TRANSFER_FAIL = -800
RPC_FAIL = -900
_UNREACHABLE = {TRANSFER_FAIL, RPC_FAIL, -1}

# Keys per Mooncake get call: their values pass through Mooncake's local buffer together.
GET_CHUNK = 16

# Mooncake's setup() tries 20 local ports, ~4.4 s each against an unreachable master (~90 s), and holds the
# GIL all along (its binding does not release it): every Python thread of the process stops meanwhile. So
# setup() is called only once the master's and the metadata server's ports accept a connection (PROBE_S),
# and tries one port; a failure is retried by the next call. An explicit MC_STORE_CLIENT_SETUP_RETRIES wins.
PROBE_S = 1.0
SETUP_RETRIES = "1"
@dataclass(frozen=True)
class MooncakeSettings:
    """What MooncakeDistributedStore.setup() needs, from `mooncake://master:port` and the settings."""

    master: str  # host:port of mooncake_master's RPC
    metadata_server: str
    local_hostname: str
    global_segment_size: int
    local_buffer_size: int
    protocol: str
    threads: int

    @classmethod
    def from_config(cls, config: ConnectorConfig) -> "MooncakeSettings":
        url = config.endpoint[0]
        parts = urlsplit(url)
        if parts.scheme != "mooncake" or not parts.hostname:
            raise ValueError(f"not a Mooncake endpoint: {redact_url(url)!r} (expected mooncake://master-host:port)")
        host, port = parts.hostname, parts.port or DEFAULT_MASTER_PORT
        return cls(
            master=f"{host}:{port}",
            metadata_server=config.mooncake_metadata_server or f"http://{host}:{DEFAULT_METADATA_PORT}/metadata",
            local_hostname=config.mooncake_local_hostname or local_address_towards(host, port),
            global_segment_size=config.mooncake_global_segment_size,
            local_buffer_size=config.mooncake_local_buffer_size,
            protocol=config.mooncake_protocol,
            threads=config.mooncake_threads,
        )


def mooncake_missing() -> str | None:
    """Why Mooncake's client cannot load here, or None."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return (f"Mooncake Store's client does not load ({exc}): pip install 'membrain-async[mooncake]' "
                "(Debian also needs: apt install libibverbs1)")
    return None


def _host_port(address: str, default_port: int) -> tuple[str, int] | None:
    """("host", port) of "host:port" or "http://host:port/...", None for what is not a TCP address
    (P2PHANDSHAKE, etcd lists)."""
    if address.upper() == "P2PHANDSHAKE":
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "http", "https") or not parts.hostname:
        return None
    return parts.hostname, parts.port or default_port


def accepts(address: str, default_port: int, timeout: float = PROBE_S) -> bool:
    """Does `address` accept a TCP connection now? (True for addresses that are not host:port.)"""
    hp = _host_port(address, default_port)
    if hp is None:
        return True
    try:
        socket.create_connection(hp, timeout=timeout).close()
        return True
    except OSError:
        return False


def local_address_towards(host: str, port: int) -> str:
    """This host's address on the route to `host` (no packet is sent: a UDP connect only picks the route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass
class MooncakeStats:
    calls: int = 0
    puts_refused_full: int = 0  # the store had no room (NO_AVAILABLE_HANDLE)
    puts_refused_other: int = 0  # other per-key refusals (leased, invalid)
    gets_failed: int = 0  # the store holds the key, but its transfer failed (a miss for that key)
    setups: int = 0
    setup_failures: int = 0
    error_codes: dict = field(default_factory=dict)  # Mooncake error code -> how often it was answered


def _bytes_view(part) -> memoryview:
    view = memoryview(part)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


class MooncakeTransport:
    """Store protocol over MooncakeDistributedStore. `setup()` runs on first use, in a thread."""

    name = "mooncake"
    # One batch_is_exist answers a whole prefix; gets are chunked inside (GET_CHUNK) for Mooncake's buffer.
    limits = Limits(max_keys=1024)

    def __init__(self, settings: MooncakeSettings):
        self.unusable = mooncake_missing()  # the wheel is not there: every call is "unavailable", vLLM runs on
        if self.unusable:
            log.warning("membrain: %s; every Mooncake call fails as unavailable (vLLM computes as plain vLLM)",
                        self.unusable)
        self.settings = settings
        self.stats = MooncakeStats()
        self.threads = BlockingPool(settings.threads, "mooncake")
        self._store: Any = None
        self._slabs: RegisteredSlabs | None = None
        self._setup_running = False
        self._setup_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        """In a worker thread. Against an unreachable master each of Mooncake's setup attempts takes ~4.4 s:
        whoever waits has given up by then (the call was abandoned); calls meanwhile fail fast, and the
        first one after it ended tries again."""
        from mooncake.store import MooncakeDistributedStore

        with self._setup_lock:
            if self._setup_running or self._store is not None or self._closed:
                return
            self._setup_running = True
        s = self.settings
        rc: Any = "exception"
        try:
            for what, address, port in (("master", s.master, DEFAULT_MASTER_PORT),
                                        ("metadata server", s.metadata_server, DEFAULT_METADATA_PORT)):
                if not accepts(address, port):
                    rc = f"{what} {address} does not accept connections"
                    self.stats.setup_failures += 1
                    raise OSError(f"Mooncake setup skipped: {rc}")
            import os

            os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", SETUP_RETRIES)
            store = MooncakeDistributedStore()
            self.stats.setups += 1
            rc = store.setup(s.local_hostname, s.metadata_server, s.global_segment_size, s.local_buffer_size,
                             s.protocol, "", s.master)
            if rc == 0:
                with self._setup_lock:
                    if not self._closed:
                        self._slabs = RegisteredSlabs(store, keep=s.threads)
                        self._store = store
                        return
            self.stats.setup_failures += 1
            try:
                store.close()
            except Exception:  # a half set-up store: nothing more to give back
                pass
        finally:
            with self._setup_lock:
                self._setup_running = False
        raise OSError(f"Mooncake setup failed ({rc}): master {s.master}, metadata {redact_url(s.metadata_server)}")

    async def _ready(self) -> Any:
        if self._store is not None:
            return self._store
        if self.unusable:
            raise OSError(self.unusable)
        with self._setup_lock:
            if self._closed:
                raise OSError("Mooncake transport is closed")
            if self._setup_running:
                raise OSError(f"Mooncake setup with master {self.settings.master} still in progress")
        await self.threads.run(self._setup)
        if self._store is None:
            raise OSError(f"Mooncake setup with master {self.settings.master} still in progress")
        return self._store

    async def _run(self, fn: Callable[[Any], T]) -> T:
        store = await self._ready()
        self.stats.calls += 1
        return await self.threads.run(lambda: fn(store))

    async def _run_leased(self, fn: Callable[[Any], T], lease: Lease, *, abandon: bool = True) -> T:
        """`fn(store)` in a thread that holds `lease` until it returns (the thread's side of the lease)."""
        store = await self._ready()
        self.stats.calls += 1

        def job() -> T:
            try:
                return fn(store)
            finally:
                lease.finish()

        return await self.threads.run(job, abandon=abandon, on_queued=lease.arm)

    def _count(self, code: int) -> None:
        self.stats.error_codes[code] = self.stats.error_codes.get(code, 0) + 1

    # ------------------------------------------------------------------ the store protocol

    @staticmethod
    def _keys(ns: str, keys: Sequence[str]) -> list[str]:
        return [f"{ns}/{k}" for k in keys]

    async def exists(self, ns: str, keys: list[str]) -> list[bool]:
        codes = await self._run(lambda s: s.batch_is_exist(self._keys(ns, keys)))
        return self._present(codes)

    def _present(self, codes: Sequence[int]) -> list[bool]:
        bad = [c for c in codes if c not in (0, 1)]
        if bad:
            self._count(bad[0])
            raise OSError(f"Mooncake exists failed ({bad[0]}) for {len(bad)} of {len(codes)} keys")
        return [c == 1 for c in codes]

    async def lookup(self, ns: str, keys: list[str]) -> int:
        """One batch_is_exist for the whole prefix (the client's split keeps it to one call up to 1024 keys)."""
        codes = await self._run(lambda s: s.batch_is_exist(self._keys(ns, keys)))
        n = 0
        for c in codes:
            if c != 1:
                break
            n += 1
        if n < len(codes) and codes[n] not in (0, 1):
            self._count(codes[n])
            raise OSError(f"Mooncake lookup failed ({codes[n]})")
        return n

    async def get(self, ns: str, keys: list[str]) -> list[memoryview | None]:
        full = self._keys(ns, keys)
        values: list = await self._run(lambda s: self._get_owned(s, full))
        return values

    def _get_owned(self, store: Any, keys: list[str]) -> list[memoryview | None]:
        """In the thread: each value copied out of Mooncake's buffer into a fresh one (None: not delivered)."""
        out: list[memoryview | None] = []
        for i in range(0, len(keys), GET_CHUNK):
            chunk = keys[i : i + GET_CHUNK]
            handles = store.batch_get_buffer(chunk)
            for h in handles:
                out.append(None if h is None else memoryview(bytearray(memoryview(h))))
            del handles  # gives Mooncake's buffer back before the next chunk
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            # batch_get_buffer says None for both "not stored" and "could not fetch": ask which.
            codes = store.batch_is_exist([keys[i] for i in missing])
            unreachable = [c for c in codes if c not in (0, 1)]
            failed = sum(1 for c in codes if c == 1)
            self.stats.gets_failed += failed
            if unreachable or (failed and failed == len(keys)):
                self._count(unreachable[0] if unreachable else TRANSFER_FAIL)
                raise OSError(f"Mooncake get failed for {len(missing)} of {len(keys)} keys")
        return out

    async def get_into(self, ns: str, keys: list[str], buffers: Sequence[memoryview]) -> list[int]:
        """Each value lands in a registered slab and is copied on the loop once the thread returned: a
        transfer that failed half-way never leaves a half-filled caller buffer behind. -1: not delivered."""
        await self._ready()
        full = self._keys(ns, keys)
        sizes = [len(b) for b in buffers]
        out: list[int] = []
        for part in slab_chunks(sizes):
            lease = Lease(self._slabs_now())
            try:
                lengths = await self._run_leased(
                    lambda s: self._get_into_slab(s, [full[i] for i in part], [sizes[i] for i in part], lease), lease)
                slab = lease.slab
                offset = 0
                for i, n in zip(part, lengths):
                    if n >= 0:
                        n = scatter.write(buffers[i], slab.view[offset : offset + n])  # type: ignore[union-attr]
                    out.append(n)
                    offset += sizes[i]
            finally:
                lease.close()
        return out

    def _slabs_now(self) -> RegisteredSlabs:
        if self._slabs is None:
            raise OSError("Mooncake transport is closed")
        return self._slabs

    def _get_into_slab(self, store: Any, keys: list[str], sizes: list[int], lease: Lease) -> list[int]:
        """In the thread: one batch_get_into for `keys`, laid out in the lease's slab at their buffers'
        sizes. Returns each value's length, -1 for a value not delivered (not stored, or too large)."""
        slab = lease.take(sum(sizes))
        ptrs, offset = [], 0
        for n in sizes:
            ptrs.append(slab.addr + offset)
            offset += n
        codes = store.batch_get_into(keys, ptrs, sizes)
        failed = [c for c in codes if c < 0 and c != OBJECT_NOT_FOUND]
        if failed:
            for c in failed:
                self._count(c)
            if all(c in _UNREACHABLE for c in failed) and len(failed) == len(codes):
                raise OSError(f"Mooncake get failed ({failed[0]}) for all {len(codes)} keys")
            self.stats.gets_failed += len(failed)
        return [c if c >= 0 else -1 for c in codes]

    async def put(self, ns: str, keys: list[str], values: Sequence[PutValue]) -> int:
        await self._ready()
        full = self._keys(ns, keys)
        parts = [[_bytes_view(p) for p in value_parts(v)] for v in values]
        sizes = [sum(p.nbytes for p in ps) for ps in parts]
        codes: list[int] = []
        for chunk in slab_chunks(sizes):
            lease = Lease(self._slabs_now())
            try:
                # The slab is filled in a thread that is never abandoned: once this returns, no thread reads
                # the caller's pages any more, whatever happens to the upsert.
                await self._run_leased(lambda s: _fill(lease, [parts[i] for i in chunk], [sizes[i] for i in chunk]),
                                       lease, abandon=False)
                codes += await self._run_leased(
                    lambda s: _upsert_from(s, [full[i] for i in chunk], lease, [sizes[i] for i in chunk]), lease)
            finally:
                lease.close()
        stored = sum(1 for c in codes if c == 0)
        if stored < len(codes):
            for c in codes:
                if c != 0:
                    self._count(c)
            if all(c in _UNREACHABLE for c in codes):
                raise OSError(f"Mooncake put failed ({codes[0]}) for all {len(codes)} keys")
            full_refusals = sum(1 for c in codes if c == NO_AVAILABLE_HANDLE)
            self.stats.puts_refused_full += full_refusals
            self.stats.puts_refused_other += len(codes) - stored - full_refusals
        return stored

    async def delete(self, ns: str, keys: list[str]) -> int:
        # force: a corrupt block is removed even while leased (a reader that holds it checks it anyway).
        codes = await self._run(lambda s: s.batch_remove(self._keys(ns, keys), True))
        if all(c in _UNREACHABLE for c in codes) and codes:
            raise OSError(f"Mooncake remove failed ({codes[0]})")
        return sum(1 for c in codes if c == 0)

    def close(self) -> None:
        """Give Mooncake's client back once no thread uses it (in a daemon thread: close() talks to the
        metadata server, holding the GIL, and a call of a dead store may still be finishing)."""
        with self._setup_lock:
            self._closed = True
            store, self._store = self._store, None
            slabs, self._slabs = self._slabs, None
        if store is None:
            self.threads.stop()
            return

        def later() -> None:
            import time

            end = time.monotonic() + EXIT_WAIT
            while self.threads.running and time.monotonic() < end:
                time.sleep(0.05)
            if self.threads.running or not accepts(self.settings.metadata_server, DEFAULT_METADATA_PORT):
                return  # in use by a hung call, or close() would hold the GIL on a dead host: leave it to exit
            try:
                if slabs is not None:
                    slabs.close()
                store.close()
            except Exception as exc:
                log.debug("mooncake close: %r", exc)
            finally:
                self.threads.stop()

        start_daemon(later, "membrain-mooncake-close")

    def snapshot(self) -> dict:
        out = {k: v for k, v in self.stats.__dict__.items() if k != "error_codes"}
        out["error_codes"] = dict(self.stats.error_codes)
        out["threads_running"] = self.threads.running
        out["abandoned"] = self.threads.abandoned
        out["busy_refusals"] = self.threads.busy_refusals
        return out


def slab_chunks(sizes: Sequence[int]) -> list[list[int]]:
    """Indices of `sizes` in runs whose total fits one slab (a value larger than a slab is a run alone)."""
    runs: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if runs and total + n <= SLAB_BYTES:
            runs[-1].append(i)
            total += n
        else:
            runs.append([i])
            total = n
    return runs


def _fill(lease: Lease, values: list[list[memoryview]], sizes: list[int]) -> None:
    """In a thread that is never abandoned: the values' parts, back to back, into the lease's slab."""
    slab = lease.take(sum(sizes))
    offset = 0
    for parts in values:
        for p in parts:
            slab.view[offset : offset + p.nbytes] = p
            offset += p.nbytes


def _upsert_from(store: Any, keys: list[str], lease: Lease, sizes: list[int]) -> list[int]:
    """In the thread: one batch_upsert_from of the slab (one status per key)."""
    slab = lease.slab
    assert slab is not None
    ptrs, offset = [], 0
    for n in sizes:
        ptrs.append(slab.addr + offset)
        offset += n
    return list(store.batch_upsert_from(keys, ptrs, sizes))


class MooncakeClient(StoreClient):
    """The MembrainClient interface over Mooncake Store (lookup, get_many, get_many_into, exists,
    put_many, delete, aclose, available, stats; `server_stats()` is this transport's counters)."""

    def __init__(self, settings: MooncakeSettings, *, namespace: str = "default", timeout: float = 2.0,
                 retries: int = 1, breaker: CircuitBreaker | None = None):
        self.settings = settings
        self.transport: MooncakeTransport = MooncakeTransport(settings)
        super().__init__(f"mooncake://{settings.master}", namespace=namespace, timeout=timeout, retries=retries,
                         breaker=breaker, transport=self.transport)

    async def health(self) -> bool:
        try:
            await self.lookup(["membrain-health-probe"])
            return True
        except Exception:
            return False

    async def server_stats(self) -> dict:
        return {"backend": "mooncake", "master": self.settings.master, "client": self.stats.__dict__,
                "mooncake": self.transport.snapshot()}


def open_mooncake_client(config: ConnectorConfig) -> MooncakeClient:
    """The client for a `mooncake://master:port` endpoint. Returns at once: Mooncake's setup() runs on the
    first call, in a worker thread, under the same timeout and breaker as every call."""
    return MooncakeClient(
        MooncakeSettings.from_config(config),
        namespace=config.namespace,
        timeout=config.timeout,
        breaker=CircuitBreaker(config.breaker_threshold, config.breaker_cooldown),
    )


__all__ = ["MooncakeClient", "MooncakeSettings", "MooncakeTransport", "open_mooncake_client"]


"""Async client for one Membrain node: httpx for the HTTP API, the bulk protocol for payloads.

anyio-native (asyncio or trio). Every call has a timeout; idempotent calls are retried with backoff on
connection errors; a circuit breaker makes a dead server fail fast. The client never guesses: a server
that cannot be reached (or whose breaker is open) raises `MembrainUnavailable`, a refusal by a live server
(bad input, auth) raises `MembrainRequestError`, and only a key the server does not hold is a miss (None,
False, -1). Whether "unavailable" is then treated as a miss is the cache layer's decision, where it is
also counted.

Against a server with only `/memory/{ns}/{key}` (no `/v1/info`) the client falls back to per-key calls.
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import orjson

from .. import sockio
from ..protocol import api, bulk
from ..protocol.bulk import Op
from ..protocol.names import validate_namespace
from .breaker import CircuitBreaker
from .bulkconn import BulkConnection, BulkPool
from .errors import MembrainRequestError, MembrainUnavailable

log = logging.getLogger("membrain.client")

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
# A value to put may be one buffer or a sequence of buffers sent back to back (header + payload).
PutValue = Buffer | Sequence[Buffer]

_TRANSIENT = (OSError, TimeoutError, httpx.TransportError, sockio.PeerClosed, bulk.ProtocolError)


@dataclass
class ClientStats:
    calls: int = 0
    failures: int = 0
    fast_fails: int = 0
    retries: int = 0
    bytes_put: int = 0
    bytes_got: int = 0
    errors_by_kind: dict = field(default_factory=dict)


def _vlen(v: PutValue) -> int:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return memoryview(v).nbytes
    return sum(memoryview(b).nbytes for b in v)


def _parts(v: PutValue) -> list[Buffer]:
    return [v] if isinstance(v, (bytes, bytearray, memoryview)) else list(v)


class MembrainClient:
    def __init__(
        self,
        url: str = "http://localhost:9201",
        *,
        namespace: str = "default",
        token: str | None = None,
        timeout: float = 2.0,
        retries: int = 2,
        breaker: CircuitBreaker | None = None,
        bulk_connections: int = 8,
        use_bulk: bool = True,
        tls: ssl.SSLContext | None = None,
    ):
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a Membrain URL: {url!r} (expected http://host:port)")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # https:// means TLS on both protocols, verified against the system store unless told otherwise.
        self.tls = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self.namespace = validate_namespace(namespace)
        self.token = token or None
        self.timeout = timeout
        self.retries = retries
        self.breaker = breaker or CircuitBreaker()
        self.stats = ClientStats()
        self._use_bulk = use_bulk
        self._bulk_connections = bulk_connections
        self._http: httpx.AsyncClient | None = None
        self._pool: BulkPool | None = None  # payload transfers
        self._control: BulkPool | None = None  # lookups and exists: never queued behind a multi-MiB transfer
        self._mode: str | None = None  # "bulk" | "batch" | "legacy", found from /v1/info
        self._batch_keys = 1024  # the server's max_batch_keys, once /v1/info has told us
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> "MembrainClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for pool in (self._pool, self._control):
            if pool is not None:
                pool.close()
        if self._http is not None:
            await self._http.aclose()

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
            self._http = httpx.AsyncClient(
                base_url=self.url,
                headers=headers,
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
                verify=self.tls if self.tls is not None else True,
            )
        return self._http

    @property
    def available(self) -> bool:
        return self.breaker.state == "closed"

    # --- the call wrapper: timeout, retries, breaker ----------------------------------------------

    async def _call(self, fn: Callable[[], Awaitable[T]], *, idempotent: bool = True) -> T:
        if self._closed:
            raise MembrainUnavailable("client is closed")
        attempts = 1 + (self.retries if idempotent else 0)
        last: BaseException | None = None
        for attempt in range(attempts):
            if not self.breaker.allow():
                self.stats.fast_fails += 1
                raise MembrainUnavailable(f"{self.url} is marked down (circuit open)")
            self.stats.calls += 1
            try:
                with anyio.fail_after(self.timeout):
                    result = await fn()
            except MembrainRequestError:
                self.breaker.record_success()  # the server is alive; it just said no
                raise
            except _TRANSIENT as exc:
                last = exc
                self.stats.failures += 1
                kind = type(exc).__name__
                self.stats.errors_by_kind[kind] = self.stats.errors_by_kind.get(kind, 0) + 1
                self.breaker.record_failure()
                if attempt + 1 < attempts:
                    self.stats.retries += 1
                    await anyio.sleep(min(0.2, 0.01 * 2**attempt) * (0.5 + random.random()))
                continue
            self.breaker.record_success()
            return result
        raise MembrainUnavailable(f"{self.url} unavailable: {_describe(last)}") from last

    async def _mode_of_server(self) -> str:
        if self._mode is None:
            info = await self._fetch_info()
            if info is not None:
                self._batch_keys = int((info.get("limits") or {}).get("max_batch_keys", self._batch_keys))
            if info is None:
                self._mode = "legacy"
            elif self._use_bulk and "bulk" in info.get("capabilities", []):
                bulk_info = info.get("bulk") or {}
                # Same port: dial the port we reached the server on, which survives proxies and NAT;
                # the server only knows the port it bound.
                port = self.port if bulk_info.get("same_port", True) else bulk_info.get("port") or self.port
                self._pool = BulkPool(self.host, port, self.token, self._bulk_connections, tls=self.tls)
                self._control = BulkPool(self.host, port, self.token, self._bulk_connections, tls=self.tls)
                self._mode = "bulk"
            else:
                self._mode = "batch"
        return self._mode

    async def _fetch_info(self) -> dict | None:
        r = await self._http_client().get("/v1/info")
        if r.status_code == 404:
            return None
        _raise_for_status(r)
        return r.json()

    # --- public API -------------------------------------------------------------------------------

    async def info(self) -> dict:
        async def go():
            info = await self._fetch_info()
            if info is None:
                raise MembrainRequestError(404, "server has no /v1/info (a plain /memory server)")
            return info

        return await self._call(go)

    async def health(self) -> bool:
        try:
            r = await self._call(lambda: self._http_client().get("/healthz"), idempotent=False)
            return r.status_code == 200
        except MembrainUnavailable:
            return False

    async def server_stats(self) -> dict:
        async def go():
            r = await self._http_client().get("/v1/stats")
            _raise_for_status(r)
            return r.json()

        return await self._call(go)

    async def put(self, key: str, value: PutValue, *, ns: str | None = None) -> bool:
        return await self.put_many([key], [value], ns=ns) == 1

    async def get(self, key: str, *, ns: str | None = None) -> memoryview | None:
        return (await self.get_many([key], ns=ns))[0]

    async def _split(self, n: int) -> list[range] | None:
        """Ranges of at most the server's batch size, or None when one request will do."""
        if self._mode is None and n > 1:
            try:
                await self._call(self._mode_of_server)  # learn the server's limits first
            except MembrainUnavailable:
                pass
        step = max(1, self._batch_keys)
        return None if n <= step else [range(i, min(n, i + step)) for i in range(0, n, step)]

    async def put_many(self, keys: Sequence[str], values: Sequence[PutValue], *, ns: str | None = None) -> int:
        """Store values; returns how many were stored. MembrainUnavailable if the server cannot be reached."""
        if len(keys) != len(values):
            raise ValueError("put_many needs as many values as keys")
        if not keys:
            return 0
        if parts := await self._split(len(keys)):
            return sum([await self.put_many([keys[i] for i in r], [values[i] for i in r], ns=ns) for r in parts])
        ns = ns or self.namespace

        async def go() -> int:
            mode = await self._mode_of_server()
            if mode == "bulk":
                return await self._pool.run(lambda c: self._bulk_put(c, ns, keys, values))  # type: ignore[union-attr]
            if mode == "batch":
                body = api.encode_batch(list(keys), [b"".join(_parts(v)) for v in values])
                r = await self._http_client().post(f"/v1/batch/put/{ns}", content=b"".join(body))
                _raise_for_status(r)
                return int(r.json()["stored"])
            stored = 0
            for k, v in zip(keys, values):
                r = await self._http_client().put(api.memory_path(ns, k), content=b"".join(_parts(v)))
                _raise_for_status(r)
                stored += 1
            return stored

        stored = await self._call(go)
        self.stats.bytes_put += sum(_vlen(v) for v in values)
        return stored

    async def _bulk_put(self, conn: BulkConnection, ns: str, keys, values) -> int:
        sizes = [_vlen(v) for v in values]
        body: list[Buffer] = []
        for v in values:
            body.extend(_parts(v))
        frame = await conn.call(Op.PUT, {"ns": ns, "keys": list(keys), "sizes": sizes}, body)
        return int(frame.head.get("stored", 0))

    async def get_many(self, keys: Sequence[str], *, ns: str | None = None) -> list[memoryview | None]:
        """Values (views into one buffer per call) or None for misses. MembrainUnavailable if the server
        cannot be reached."""
        if not keys:
            return []
        if parts := await self._split(len(keys)):
            out: list[memoryview | None] = []
            for r in parts:
                out += await self.get_many([keys[i] for i in r], ns=ns)
            return out
        ns = ns or self.namespace

        async def go() -> list[memoryview | None]:
            mode = await self._mode_of_server()
            if mode == "bulk":
                return await self._pool.run(lambda c: self._bulk_get(c, ns, keys))  # type: ignore[union-attr]
            if mode == "batch":
                r = await self._http_client().post(f"/v1/batch/get/{ns}", content=orjson.dumps({"keys": list(keys)}))
                _raise_for_status(r)
                _, values = api.decode_batch(r.content)
                return values
            return await self._legacy_get_many(ns, keys)

        values = await self._call(go)
        self.stats.bytes_got += sum(len(v) for v in values if v is not None)
        return values

    async def _bulk_get(self, conn: BulkConnection, ns: str, keys) -> list[memoryview | None]:
        frame = await conn.call(Op.GET, {"ns": ns, "keys": list(keys)})
        sizes = frame.head.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(keys) or sum(max(s, 0) for s in sizes) != frame.body_len:
            raise bulk.ProtocolError("GET reply sizes do not match its body")
        # One allocation per call; values are views into it, received in place.
        body = bytearray(frame.body_len)
        view = memoryview(body)
        await conn.read_body([view])
        out: list[memoryview | None] = []
        offset = 0
        for s in sizes:
            if s < 0:
                out.append(None)
            else:
                out.append(view[offset : offset + s])
                offset += s
        return out

    async def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview], *, ns: str | None = None) -> list[int]:
        """Receive values straight into caller-owned buffers (staging or pinned memory): no allocation.

        Returns each value's size, or -1 for a miss (or a value larger than its buffer, which is skipped).
        MembrainUnavailable if the server cannot be reached.
        """
        if len(buffers) != len(keys):
            raise ValueError("get_many_into needs one buffer per key")
        if not keys:
            return []
        ns = ns or self.namespace

        async def go() -> list[int]:
            mode = await self._mode_of_server()
            if mode != "bulk":  # no zero-copy path over HTTP: copy from the fetched values
                values = await self.get_many(keys, ns=ns)
                return [_copy_into(v, b) for v, b in zip(values, buffers)]
            return await self._pool.run(lambda c: self._bulk_get_into(c, ns, keys, buffers))  # type: ignore[union-attr]

        sizes = await self._call(go)
        self.stats.bytes_got += sum(s for s in sizes if s > 0)
        return sizes

    async def _bulk_get_into(self, conn: BulkConnection, ns: str, keys, buffers) -> list[int]:
        frame = await conn.call(Op.GET, {"ns": ns, "keys": list(keys)})
        sizes = frame.head.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(keys) or sum(max(s, 0) for s in sizes) != frame.body_len:
            raise bulk.ProtocolError("GET reply sizes do not match its body")
        targets: list = []
        out = []
        for s, buf in zip(sizes, buffers):
            if s < 0:
                out.append(-1)
            elif s <= len(buf):
                targets.append(memoryview(buf)[:s])
                out.append(s)
            else:
                targets.append(s)  # too big for its buffer: read past it, report a miss
                out.append(-1)
        await conn.read_body(targets)
        return out

    async def _legacy_get_many(self, ns: str, keys) -> list[memoryview | None]:
        async def one(key: str) -> memoryview | None:
            r = await self._http_client().get(api.memory_path(ns, key))
            if r.status_code == 404:
                return None
            _raise_for_status(r)
            return memoryview(r.content)

        return await _per_key(keys, one)

    async def lookup(self, keys: Sequence[str], *, ns: str | None = None) -> int:
        """How many leading keys are stored, in one round trip. MembrainUnavailable if the server cannot be
        reached."""
        if not keys:
            return 0
        if parts := await self._split(len(keys)):
            total = 0
            for r in parts:
                n = await self.lookup([keys[i] for i in r], ns=ns)
                total += n
                if n < len(r):
                    break
            return total
        ns = ns or self.namespace

        async def go() -> int:
            mode = await self._mode_of_server()
            if mode == "bulk":
                frame = await self._control.run(lambda c: c.call(Op.LOOKUP, {"ns": ns, "keys": list(keys)}))  # type: ignore[union-attr]
                return int(frame.head["count"])
            if mode == "batch":
                r = await self._http_client().post(f"/v1/lookup/{ns}", content=orjson.dumps({"keys": list(keys)}))
                _raise_for_status(r)
                return int(r.json()["count"])
            present = await self._legacy_exists(ns, keys)
            n = 0
            while n < len(present) and present[n]:
                n += 1
            return n

        return await self._call(go)

    async def exists(self, keys: Sequence[str], *, ns: str | None = None) -> list[bool]:
        """Which keys are stored. MembrainUnavailable if the server cannot be reached."""
        if not keys:
            return []
        if parts := await self._split(len(keys)):
            out: list[bool] = []
            for r in parts:
                out += await self.exists([keys[i] for i in r], ns=ns)
            return out
        ns = ns or self.namespace

        async def go() -> list[bool]:
            mode = await self._mode_of_server()
            if mode == "bulk":
                frame = await self._control.run(lambda c: c.call(Op.EXISTS, {"ns": ns, "keys": list(keys)}))  # type: ignore[union-attr]
                return [bool(p) for p in frame.head["present"]]
            if mode == "batch":
                r = await self._http_client().post(f"/v1/exists/{ns}", content=orjson.dumps({"keys": list(keys)}))
                _raise_for_status(r)
                return [bool(p) for p in r.json()["present"]]
            return await self._legacy_exists(ns, keys)

        return await self._call(go)

    async def _legacy_exists(self, ns: str, keys) -> list[bool]:
        async def one(key: str) -> bool:
            r = await self._http_client().head(api.memory_path(ns, key))
            if r.status_code == 404:
                return False
            _raise_for_status(r)
            return True

        return await _per_key(keys, one)

    async def delete(self, key: str, *, ns: str | None = None) -> bool:
        """True if the key was deleted, False if it was not stored. MembrainUnavailable if the server cannot
        be reached."""
        ns = ns or self.namespace

        async def go() -> bool:
            r = await self._http_client().delete(api.memory_path(ns, key))
            if r.status_code == 404:
                return False
            _raise_for_status(r)
            return True

        return await self._call(go)


async def _per_key(keys, one) -> list:
    """Per-key calls for servers without batch endpoints, all in flight at once, results in key order."""
    out: list = [None] * len(keys)

    async def run(i: int, key: str) -> None:
        out[i] = await one(key)

    async with anyio.create_task_group() as tg:
        for i, k in enumerate(keys):
            tg.start_soon(run, i, k)
    return out


def _describe(exc: BaseException | None) -> str:
    """'ConnectError: SSLCertVerificationError: ...': the wrappers' names and the root cause's message."""
    parts = []
    seen = 0
    while exc is not None and seen < 5:
        parts.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if str(exc) and exc.__cause__ is None and exc.__context__ is None:
            break
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return " <- ".join(parts)


def _copy_into(value: memoryview | None, buf: memoryview) -> int:
    if value is None or len(value) > len(buf):
        return -1
    memoryview(buf)[: len(value)] = value
    return len(value)


def _raise_for_status(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        message = r.json().get("error", r.text)
    except (ValueError, AttributeError):
        message = r.text[:200]
    raise MembrainRequestError(r.status_code, message)

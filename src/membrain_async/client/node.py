"""Async client for one Membrain node: httpx for the HTTP API, the bulk protocol for payloads.

anyio-native (asyncio or trio). Every call has a timeout; idempotent calls are retried with backoff on
connection errors; a circuit breaker makes a dead server fail fast. The client never guesses: a server
that cannot be reached (or whose breaker is open) raises `MembrainUnavailable`, a refusal by a live server
(bad input, auth) raises `MembrainRequestError`, and only a key the server does not hold is a miss (None,
False, -1). Whether "unavailable" is then treated as a miss is the cache layer's decision, where it is
also counted.

`StoreClient` holds what every backend shares; `MembrainClient` adds the Membrain node.

The operations go through one transport (store.py's protocol), chosen on first contact from /v1/info:
bulk frames, HTTP batch endpoints, or per-key calls against a server with only `/memory/{ns}/{key}`.
Batches are split to the transport's limits here, once, for every operation.
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

from .. import sockio
from ..protocol import api, bulk
from ..protocol.bodies import ServerInfo
from ..protocol.names import validate_namespace
from .breaker import CircuitBreaker
from .errors import MembrainRequestError, MembrainUnavailable
from .store import Limits, PutValue, Transport, split, value_len
from .transports import BulkTransport, HttpBatchTransport, PerKeyTransport, raise_for_status
from ..urls import redact_url

log = logging.getLogger("membrain.client")

T = TypeVar("T")

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


class StoreClient:
    """Splitting, timeouts, retries and the breaker over one transport (store.py's protocol), written once.

    MembrainClient chooses its transport on first contact; other backends (Redis, Mooncake Store) give
    theirs (`transport`, or override `_get_transport` to build it lazily, off the loop). `url` names the
    store in errors and logs, with any password in it redacted.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        timeout: float = 2.0,
        retries: int = 2,
        breaker: CircuitBreaker | None = None,
        transport: Transport | None = None,
    ):
        self.url = redact_url(url.rstrip("/"))
        self.namespace = validate_namespace(namespace)
        self.timeout = timeout
        self.retries = retries
        self.breaker = breaker or CircuitBreaker()
        self.stats = ClientStats()
        self._transport: Transport | None = transport
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

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

    async def _get_transport(self) -> Transport:
        if self._transport is None:
            raise MembrainUnavailable(f"{self.url}: no transport")
        return self._transport

    async def health(self) -> bool:
        """Does the store answer now (a transport's `ping`, where it has one)?"""
        ping = getattr(self._transport, "ping", None)
        if ping is None:
            return False
        try:
            return bool(await self._call(ping, idempotent=False))
        except MembrainUnavailable:
            return False

    async def info(self) -> dict:
        raise MembrainRequestError(400, f"{self.url} is not a Membrain server (no /v1/info)")

    async def server_stats(self) -> dict:
        raise MembrainRequestError(400, f"{self.url} is not a Membrain server (no /v1/stats)")

    async def _batches(self, keys: Sequence[str], sizes: Sequence[int] | None = None) -> tuple[Transport, list[range]]:
        """The transport, and the caller's keys split to its limits (by key count, and by bytes for puts)."""
        transport = self._transport or await self._call(self._get_transport)
        parts = split(len(keys), transport.limits, sizes)
        return transport, parts

    # --- the store operations -------------------------------------------------------------------------------

    # Every operation below raises MembrainUnavailable if the server cannot be reached.

    async def put(self, key: str, value: PutValue, *, ns: str | None = None) -> bool:
        return await self.put_many([key], [value], ns=ns) == 1

    async def get(self, key: str, *, ns: str | None = None) -> memoryview | None:
        return (await self.get_many([key], ns=ns))[0]

    async def put_many(self, keys: Sequence[str], values: Sequence[PutValue], *, ns: str | None = None) -> int:
        """Store values; returns how many were stored."""
        if len(keys) != len(values):
            raise ValueError("put_many needs as many values as keys")
        if not keys:
            return 0
        ns = ns or self.namespace
        sizes = [value_len(v) for v in values]
        t, parts = await self._batches(keys, sizes)
        stored = 0
        for r in parts:
            stored += await self._call(lambda: t.put(ns, [keys[i] for i in r], [values[i] for i in r]))
            self.stats.bytes_put += sum(sizes[i] for i in r)
        return stored

    async def get_many(self, keys: Sequence[str], *, ns: str | None = None) -> list[memoryview | None]:
        """Values (views into one buffer per batch) or None for misses."""
        if not keys:
            return []
        ns = ns or self.namespace
        t, parts = await self._batches(keys)
        out: list[memoryview | None] = []
        for r in parts:
            out += await self._call(lambda: t.get(ns, [keys[i] for i in r]))
        self.stats.bytes_got += sum(len(v) for v in out if v is not None)
        return out

    async def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview], *, ns: str | None = None) -> list[int]:
        """Receive values straight into caller-owned buffers (staging or pinned memory): no allocation.

        Returns each value's size, -1 for a miss, or scatter.MISFIT for a stored value that does not fit its
        buffer (skipped: nothing is written into the buffer).
        """
        if len(buffers) != len(keys):
            raise ValueError("get_many_into needs one buffer per key")
        if not keys:
            return []
        ns = ns or self.namespace
        t, parts = await self._batches(keys)
        out: list[int] = []
        for r in parts:
            out += await self._call(lambda: t.get_into(ns, [keys[i] for i in r], [buffers[i] for i in r]))
        self.stats.bytes_got += sum(s for s in out if s > 0)
        return out

    async def lookup(self, keys: Sequence[str], *, ns: str | None = None) -> int:
        """How many leading keys are stored (one round trip per batch of the server's max_batch_keys)."""
        if not keys:
            return 0
        ns = ns or self.namespace
        t, parts = await self._batches(keys)
        total = 0
        for r in parts:
            n = await self._call(lambda: t.lookup(ns, [keys[i] for i in r]))
            total += n
            if n < len(r):
                break
        return total

    async def exists(self, keys: Sequence[str], *, ns: str | None = None) -> list[bool]:
        """Which keys are stored."""
        if not keys:
            return []
        ns = ns or self.namespace
        t, parts = await self._batches(keys)
        out: list[bool] = []
        for r in parts:
            out += await self._call(lambda: t.exists(ns, [keys[i] for i in r]))
        return out

    async def delete(self, key: str, *, ns: str | None = None) -> bool:
        """True if the key was deleted, False if it was not stored."""
        ns = ns or self.namespace
        t, _ = await self._batches([key])
        return await self._call(lambda: t.delete(ns, [key])) > 0



class MembrainClient(StoreClient):
    """One Membrain node: the transport (bulk | HTTP batch | per-key) is chosen on first contact from /v1/info."""

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
        url = url.rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a Membrain URL: {redact_url(url)!r} (expected http://host:port)")
        super().__init__(url, namespace=namespace, timeout=timeout, retries=retries, breaker=breaker)
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # https:// means TLS on both protocols, verified against the system store unless told otherwise.
        self.tls = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self.token = token or None
        self._use_bulk = use_bulk
        self._bulk_connections = bulk_connections
        self._http: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        await super().aclose()
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
                # Plain http never negotiates TLS: a bare context (no CA store: it could verify nothing)
                # spares the ~20 ms httpx's default spends loading the CA bundle at a client's first call.
                verify=self.tls if self.tls is not None else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
            )
        return self._http

    @property
    def _mode(self) -> str | None:
        """"bulk" | "batch" | "legacy" once the server has been reached."""
        return self._transport.name if self._transport is not None else None

    async def _get_transport(self) -> Transport:
        if self._transport is None:
            raw = await self._fetch_info()
            if raw is None:
                self._transport = PerKeyTransport(self._http_client())
                return self._transport
            info = ServerInfo.from_wire(raw)
            max_keys = info.limits.max_batch_keys
            if self._use_bulk and "bulk" in info.capabilities:
                # Same port: dial the port we reached the server on, which survives proxies and NAT;
                # the server only knows the port it bound.
                port = self.port if info.bulk.same_port else info.bulk.port or self.port
                self._transport = BulkTransport(self.host, port, self.token, self._bulk_connections, self.tls,
                                                Limits(max_keys))
            else:
                # A batch put's whole body is bounded by max_value_bytes; leave room for its head.
                max_bytes = info.limits.max_value_bytes
                self._transport = HttpBatchTransport(self._http_client(), Limits(max_keys, max(1, max_bytes - (64 << 10))))
        return self._transport

    async def _fetch_info(self) -> dict | None:
        r = await self._http_client().get(api.INFO_PATH)
        if r.status_code == 404:
            return None
        raise_for_status(r)
        return r.json()

    # --- what only a Membrain node answers -------------------------------------------------------

    async def info(self) -> dict:
        async def go():
            info = await self._fetch_info()
            if info is None:
                raise MembrainRequestError(404, "server has no /v1/info (a plain /memory server)")
            return info

        return await self._call(go)

    async def health(self) -> bool:
        try:
            r = await self._call(lambda: self._http_client().get(api.HEALTHZ_PATH), idempotent=False)
            return r.status_code == 200
        except MembrainUnavailable:
            return False

    async def server_stats(self) -> dict:
        async def go():
            r = await self._http_client().get(api.STATS_PATH)
            raise_for_status(r)
            return r.json()

        return await self._call(go)


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

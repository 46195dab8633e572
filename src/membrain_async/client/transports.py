"""The Membrain transports behind the store protocol (see store.py): bulk frames, HTTP batch, per-key HTTP."""

from __future__ import annotations

import ssl
from typing import Sequence

import anyio
import httpx

from .. import scatter
from ..protocol import api, heads
from ..protocol.bulk import Frame
from ..protocol.bodies import KeysBody
from ..protocol.heads import (DeleteReply, DeleteRequest, ExistsReply, ExistsRequest, GetReply, GetRequest, LookupReply,
                              LookupRequest, PutReply, PutRequest)
from .bulkconn import BulkConnection, BulkPool, ReplyBody
from .errors import MembrainRequestError
from .store import Buffer, Limits, PutValue, copy_into, value_len, value_parts

# Lookups and exists requests share connections, this many at once on each (see BulkPool).
CONTROL_DEPTH = 32
# Longest a payload body waits, between two of its 1 MiB chunks, for small requests in flight to be
# answered (see BulkTransport._pace).
PACE_LIMIT = 0.005


class BulkTransport:
    """Binary frames on raw TCP (or TLS). Payloads get connections of their own, one request each, so a
    lookup never waits behind a multi-MiB body; lookups and exists are pipelined on a few connections.

    Small requests first: while a lookup (or exists, delete) is in flight, upload bodies pause between
    their 1 MiB chunks, up to PACE_LIMIT each time. Loads do not: a request is waiting for them. On a machine whose cores are all busy (vLLM's own
    threads), a lookup otherwise waits for the CPU behind the copies of uploads on both sides: the
    client's sends and the server's receives of the very same bytes.
    """

    name = "bulk"

    def __init__(self, host: str, port: int, token: str | None, connections: int, tls: ssl.SSLContext | None,
                 limits: Limits):
        self.limits = limits
        self._small_inflight = 0
        self._small_done = anyio.Event()
        self.paused_s = 0.0  # how long payloads waited for small requests, in all
        self.payloads = BulkPool(host, port, token, connections, tls=tls, pace=self._pace)
        self.control = BulkPool(host, port, token, max(1, min(connections, 4)), tls=tls, depth=CONTROL_DEPTH)

    async def _pace(self) -> None:
        if not self._small_inflight:
            await anyio.lowlevel.checkpoint()
            return
        t0 = anyio.current_time()
        with anyio.move_on_after(PACE_LIMIT):
            await self._small_done.wait()
        self.paused_s += anyio.current_time() - t0

    async def _small(self, request: heads.Request) -> Frame:
        self._small_inflight += 1
        try:
            return await self.control.run(lambda c: c.call(request))
        finally:
            self._small_inflight -= 1
            if not self._small_inflight:
                self._small_done.set()
                self._small_done = anyio.Event()

    async def lookup(self, ns: str, keys: list[str]) -> int:
        frame = await self._small(LookupRequest(ns, keys))
        return LookupReply.from_wire(frame.head).count

    async def exists(self, ns: str, keys: list[str]) -> list[bool]:
        frame = await self._small(ExistsRequest(ns, keys))
        return [bool(p) for p in ExistsReply.from_wire(frame.head).present]

    async def delete(self, ns: str, keys: list[str]) -> int:
        frame = await self._small(DeleteRequest(ns, keys))
        return DeleteReply.from_wire(frame.head).deleted

    async def put(self, ns: str, keys: list[str], values: Sequence[PutValue]) -> int:
        sizes = [value_len(v) for v in values]
        body: list[Buffer] = []
        for v in values:
            body.extend(value_parts(v))
        request = PutRequest(ns, keys, sizes)
        frame = await self.payloads.run(lambda c: c.call(request, body))
        return PutReply.from_wire(frame.head).stored

    async def get(self, ns: str, keys: list[str]) -> list[memoryview | None]:
        out: list[memoryview | None] = []

        def sink(frame: Frame) -> list:
            sizes = GetReply.from_frame(frame, len(keys)).sizes
            view = memoryview(bytearray(frame.body_len))  # one allocation per call; values are views into it
            offset = 0
            for s in sizes:
                if s < 0:
                    out.append(None)
                else:
                    out.append(view[offset : offset + s])
                    offset += s
            return [view]

        await self.payloads.run(lambda c: c.call(GetRequest(ns, keys), sink=sink))
        return out

    async def get_into(self, ns: str, keys: list[str], buffers: Sequence[memoryview]) -> list[int]:
        out: list[int] = []

        def sink(frame: Frame) -> ReplyBody:
            targets: list = []
            parts: list = []  # per target: (its Scatter, its part's index) where the Scatter sums as parts land
            for s, buf in zip(GetReply.from_frame(frame, len(keys)).sizes, buffers):
                if s < 0:
                    out.append(-1)
                elif scatter.fits(buf, s):
                    pieces = scatter.targets(buf, s)  # a Scatter's pieces: straight into the KV pages
                    targets.extend(pieces)
                    if isinstance(buf, scatter.Scatter):
                        buf.begin_fill()
                        parts.extend((buf, i) for i in range(len(pieces)))
                    else:
                        parts.extend([None] * len(pieces))
                    out.append(s)
                else:
                    targets.append(s)  # does not fit its buffer: read past it; the load fails its check
                    parts.append(None)
                    out.append(scatter.MISFIT)

            def on_filled(first: int, end: int) -> None:
                for entry in parts[first:end]:
                    if entry is not None:
                        entry[0].part_landed(entry[1])

            return ReplyBody(targets, on_filled)

        await self.payloads.run(lambda c: c.call(GetRequest(ns, keys), sink=sink))
        return out

    def close(self) -> None:
        self.payloads.close()
        self.control.close()


class HttpBatchTransport:
    """The HTTP API's batch endpoints: one request per batch. A batch put's body is bounded by the
    server's max_value_bytes, hence the byte limit."""

    name = "batch"

    def __init__(self, http: httpx.AsyncClient, limits: Limits):
        self.http = http
        self.limits = limits

    async def _post_json(self, path: str, keys: list[str]) -> httpx.Response:
        r = await self.http.post(path, content=KeysBody(keys).to_json())
        raise_for_status(r)
        return r

    async def lookup(self, ns: str, keys: list[str]) -> int:
        r = await self._post_json(api.lookup_path(ns), keys)
        return LookupReply.from_wire(r.json()).count

    async def exists(self, ns: str, keys: list[str]) -> list[bool]:
        r = await self._post_json(api.exists_path(ns), keys)
        return [bool(p) for p in ExistsReply.from_wire(r.json()).present]

    async def get(self, ns: str, keys: list[str]) -> list[memoryview | None]:
        _, values = api.decode_batch((await self._post_json(api.batch_get_path(ns), keys)).content)
        return values

    async def get_into(self, ns: str, keys: list[str], buffers: Sequence[memoryview]) -> list[int]:
        return [copy_into(v, b) for v, b in zip(await self.get(ns, keys), buffers)]  # no zero-copy over HTTP

    async def put(self, ns: str, keys: list[str], values: Sequence[PutValue]) -> int:
        body = api.encode_batch(keys, [b"".join(value_parts(v)) for v in values])
        r = await self.http.post(api.batch_put_path(ns), content=b"".join(body))
        raise_for_status(r)
        return PutReply.from_wire(r.json()).stored

    async def delete(self, ns: str, keys: list[str]) -> int:
        return await PerKeyTransport(self.http).delete(ns, keys)

    def close(self) -> None:
        pass


class PerKeyTransport:
    """A server with only /memory/{ns}/{key}: one HTTP call per key, all of a batch in flight at once."""

    name = "legacy"
    limits = Limits(max_keys=64)  # concurrent calls per batch

    def __init__(self, http: httpx.AsyncClient):
        self.http = http

    async def lookup(self, ns: str, keys: list[str]) -> int:
        present = await self.exists(ns, keys)
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    async def exists(self, ns: str, keys: list[str]) -> list[bool]:
        async def one(key: str) -> bool:
            r = await self.http.head(api.memory_path(ns, key))
            if r.status_code == 404:
                return False
            raise_for_status(r)
            return True

        return await _per_key(keys, one)

    async def get(self, ns: str, keys: list[str]) -> list[memoryview | None]:
        async def one(key: str) -> memoryview | None:
            r = await self.http.get(api.memory_path(ns, key))
            if r.status_code == 404:
                return None
            raise_for_status(r)
            return memoryview(r.content)

        return await _per_key(keys, one)

    async def get_into(self, ns: str, keys: list[str], buffers: Sequence[memoryview]) -> list[int]:
        return [copy_into(v, b) for v, b in zip(await self.get(ns, keys), buffers)]

    async def put(self, ns: str, keys: list[str], values: Sequence[PutValue]) -> int:
        async def one(i: int) -> bool:
            r = await self.http.put(api.memory_path(ns, keys[i]), content=b"".join(value_parts(values[i])))
            raise_for_status(r)
            return r.status_code != 202  # 202: the server's admission policy did not store it

        return sum(await _per_key(range(len(keys)), one))

    async def delete(self, ns: str, keys: list[str]) -> int:
        async def one(key: str) -> bool:
            r = await self.http.delete(api.memory_path(ns, key))
            if r.status_code == 404:
                return False
            raise_for_status(r)
            return True

        return sum(await _per_key(keys, one))

    def close(self) -> None:
        pass


async def _per_key(items, one) -> list:
    """One call per item, all in flight at once, results in order."""
    items = list(items)
    out: list = [None] * len(items)

    async def run(i: int) -> None:
        out[i] = await one(items[i])

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(items)):
                tg.start_soon(run, i)
    except BaseExceptionGroup as group:  # the first failure says what happened (refused, unreachable)
        raise _first(group) from None
    return out


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def raise_for_status(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        message = heads.error_message(r.json(), r.text[:200])
    except ValueError:  # not JSON (a proxy's page)
        message = r.text[:200]
    raise MembrainRequestError(r.status_code, message)


__all__ = ["BulkConnection", "BulkTransport", "HttpBatchTransport", "PerKeyTransport", "raise_for_status"]

"""HTTP/1.1 front end on h11 (sans-IO HTTP) over a raw non-blocking socket."""

from __future__ import annotations

import logging
import socket

import anyio
import h11
import orjson

from .. import sockio, telemetry
from ..protocol import api
from ..protocol.bulk import ProtocolError
from ..protocol.bodies import Health, KeysBody
from ..protocol.heads import ErrorReply, ExistsReply, LookupReply, PutReply
from .auth import bearer_token
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import RequestObservation
from .service import RequestError, Service

log = logging.getLogger("membrain.server.http")

_MAX_HEADER_BYTES = 16 * 1024
_JSON = [("content-type", "application/json")]
_OPS = {"batch_put": "put", "batch_get": "get"}  # routes by the operation they do, for metrics and spans
_NO_SUCH_KEY = ErrorReply("no such key").to_wire()


class _CloseConnection(Exception):
    pass


class HttpConnection:
    def __init__(self, service: Service, sock: socket.socket, initial: bytes):
        self.service = service
        self.sock = sock
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        self.conn.receive_data(initial)
        self.idle_timeout = service.config.idle_timeout
        self._buf = bytearray(256 * 1024)
        self._is_head = False

    async def run(self) -> None:
        try:
            while True:
                request = await self._next_event()
                if isinstance(request, h11.ConnectionClosed):
                    return
                if not isinstance(request, h11.Request):
                    return
                try:
                    await self._handle(request)
                except RequestError as exc:
                    # A body we did not read would be parsed as the next request: close instead.
                    unread_body = self.conn.their_state is h11.SEND_BODY
                    await self._send_json(exc.status, ErrorReply(str(exc)).to_wire(), close=exc.status in (408, 413) or unread_body)
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as exc:
            self.service.metrics.count_refusal("http", "malformed", 400)
            await self._try_send_error(exc.error_status_hint, f"malformed HTTP request: {exc}")
        except _CloseConnection:
            pass

    async def _recv(self) -> bytes:
        with anyio.move_on_after(self.idle_timeout) as scope:
            n = await sockio.recv_into(self.sock, memoryview(self._buf))
        if scope.cancelled_caught:
            raise _CloseConnection
        return bytes(self._buf[:n])

    async def _next_event(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                if self.conn.they_are_waiting_for_100_continue:
                    await sockio.send_all(self.sock, [self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))])
                self.conn.receive_data(await self._recv())
                continue
            return event

    async def _read_body(self, request: h11.Request) -> bytearray:
        limit = self.service.config.max_value_bytes
        length = None
        for name, value in request.headers:
            if name == b"content-length":
                length = int(value)
        if length is not None and length > limit:
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {limit}")
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                if len(body) + len(event.data) > limit:
                    raise RequestError(413, f"body exceeds the limit of {limit} bytes")
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body
            else:
                raise _CloseConnection

    async def _handle(self, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        self._is_head = method == "HEAD"
        target = request.target.decode("latin-1")
        token = None
        for name, value in request.headers:
            if name == b"authorization":
                token = bearer_token(value)
        svc = self.service
        try:
            route = api.match_route(method, target)
        except api.RouteError as exc:
            await self._drain_body(request)
            svc.metrics.count_refusal("http", "unknown", exc.status)
            raise RequestError(exc.status, str(exc)) from None
        parent = telemetry.extract_context(request.headers)
        with svc.metrics.request("http", _OPS.get(route.name, route.name), parent) as obs:
            obs.namespace = route.namespace
            await self._route(request, route, token, target, obs)

    async def _route(self, request: h11.Request, route: api.Route, token: str | None, target: str,
                     obs: RequestObservation) -> None:
        svc = self.service
        if route.name == "put":
            svc.begin_put(token, route.namespace, [route.key], [0])
            body = await self._read_body(request)
            svc.begin_put(token, route.namespace, [route.key], [len(body)])
            if not svc.store.fits(len(body)):
                raise RequestError(413, "value larger than the server's whole capacity")
            refused = svc.store.totals.refused
            (created,) = await svc.put_values(route.namespace, [route.key], [body])
            if created is None and svc.store.totals.refused > refused:
                # The admission policy's call (--eviction), not a failure: retrying would only count as sight.
                await self._send(202, [], b"")
                return
            if created is None:
                raise RequestError(503, "no room: every slot is being read or written; retry")
            await self._send(201 if created else 200, [], b"")
            return
        body = await self._read_body(request)
        if route.name == "healthz":
            await self._send_json(200, Health().to_wire())
        elif route.name == "readyz":
            readiness = svc.readiness()
            await self._send_json(200 if readiness.ready else 503, readiness.to_wire())
        elif route.name == "info":
            await self._send_json(200, svc.info().to_wire())
        elif route.name == "stats":
            await self._send_json(200, svc.stats(token))
        elif route.name == "metrics":
            svc.require_server_read(token)
            await self._send(200, [("content-type", METRICS_CONTENT_TYPE)], svc.metrics.render())
        elif route.name == "get":
            obs.keys = 1
            entries = await svc.get_entries(token, route.namespace, [route.key], obs)
            if entries[0] is None:
                await self._send_json(404, _NO_SUCH_KEY)  # a miss: answered, not refused
                return
            try:
                await self._send(200, [("content-type", "application/octet-stream")], entries[0].view)
            finally:
                svc.unpin_all(entries)
        elif route.name == "keys":
            try:
                limit = api.keys_limit(target)
            except api.RouteError as exc:
                raise RequestError(exc.status, str(exc)) from None
            await self._send_json(200, svc.list_keys(token, route.namespace, limit).to_wire())
        elif route.name == "head":
            obs.keys = 1
            size = svc.head(token, route.namespace, route.key, obs)
            if size is None:
                await self._send_json(404, _NO_SUCH_KEY)
                return
            await self._send(200, [("content-type", "application/octet-stream")], b"", content_length=size)
        elif route.name == "delete":
            obs.keys = 1
            if not svc.delete(token, route.namespace, [route.key]):
                await self._send_json(404, _NO_SUCH_KEY)
                return
            await self._send(204, [], b"")
        elif route.name == "batch_put":
            try:
                keys, values = api.decode_batch(body)
            except ValueError as exc:
                raise RequestError(400, str(exc)) from None
            if any(v is None for v in values):
                raise RequestError(400, "batch put needs a value (size >= 0) for every key")
            obs.keys = len(keys)
            svc.begin_put(token, route.namespace, keys, [len(v) for v in values])
            # Copied into arena slots: the request body is not kept.
            created = await svc.put_values(route.namespace, keys, values)
            await self._send_json(200, PutReply(sum(c is not None for c in created)).to_wire())
        elif route.name in ("batch_get", "lookup", "exists"):
            try:
                keys = KeysBody.from_json(body).keys
            except ProtocolError as exc:
                raise RequestError(exc.status, str(exc)) from None
            obs.keys = len(keys)
            if route.name == "lookup":
                await self._send_json(200, LookupReply(svc.lookup(token, route.namespace, keys, obs)).to_wire())
            elif route.name == "exists":
                await self._send_json(200, ExistsReply(svc.exists(token, route.namespace, keys, obs)).to_wire())
            else:
                entries = await svc.get_entries(token, route.namespace, keys, obs)
                try:
                    parts = api.encode_batch(keys, [None if e is None else e.view for e in entries])
                    await self._send(200, [("content-type", api.BATCH_CONTENT_TYPE)], parts)
                finally:
                    svc.unpin_all(entries)
        else:  # pragma: no cover - match_route only returns the names above
            raise RequestError(404, "no such route")

    async def _drain_body(self, request: h11.Request) -> None:
        try:
            await self._read_body(request)
        except RequestError:
            pass

    async def _send_json(self, status: int, obj, close: bool = False) -> None:
        await self._send(status, _JSON, orjson.dumps(obj), close=close)

    async def _send(self, status: int, headers, body, content_length: int | None = None, close: bool = False) -> None:
        parts = body if isinstance(body, list) else [body]
        length = sum(len(p) for p in parts) if content_length is None else content_length
        if self._is_head and content_length is None:
            length = 0
        hdrs = list(headers) + [("content-length", str(length)), ("server", "membrain")]
        if close:
            hdrs.append(("connection", "close"))
        out = [self.conn.send(h11.Response(status_code=status, headers=hdrs))]
        for part in parts:
            if len(part) and content_length is None and not self._is_head:
                out.extend(self.conn.send_with_data_passthrough(h11.Data(data=part)))
        out.append(self.conn.send(h11.EndOfMessage()))
        await sockio.send_all(self.sock, out)
        if close:
            raise _CloseConnection

    async def _try_send_error(self, status: int, message: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send_json(status, ErrorReply(message).to_wire(), close=True)
        except (_CloseConnection, OSError, h11.LocalProtocolError):
            pass

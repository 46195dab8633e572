"""Bulk front end: binary frames on a raw socket, values received straight into their arena slots."""

from __future__ import annotations

import logging
import socket
import ssl

import anyio

from .. import sockio
from ..protocol import heads
from ..protocol.bulk import BodyReader, Frame, FrameReader, Op, ProtocolError
from ..protocol.heads import (AuthReply, AuthRequest, DeleteReply, DeleteRequest, ExistsReply, ExistsRequest, GetReply,
                              GetRequest, LookupReply, LookupRequest, PingReply, PingRequest, PutReply, PutRequest)
from .metrics import RequestObservation
from .service import RequestError, Service

log = logging.getLogger("membrain.server.bulk")


_SMALL_PER_TURN = 64  # small frames (lookup, exists, delete, ping) answered before the loop's other tasks run


class _Closed(Exception):
    pass


def _op_name(op: int) -> str:
    try:
        return Op(op).name.lower()
    except ValueError:
        return "unknown"


class BulkConnection:
    def __init__(self, service: Service, sock: socket.socket, initial: bytes):
        self.service = service
        self.sock = sock
        self.reader = FrameReader()
        self.initial = initial
        self.token: str | None = None
        self.idle_timeout = service.config.idle_timeout

    async def run(self) -> None:
        small_in_a_row = 0
        try:
            while True:
                frame = await self._read_frame()
                if frame is None:
                    return
                try:
                    await self._dispatch(frame)
                except RequestError as exc:
                    await sockio.send_all(self.sock, [heads.encode_error(frame, exc.status, str(exc))])
                # Pipelined lookups come many to a connection: answer those already here back to back
                # rather than one per turn of the loop, where each would wait for a chunk of every upload.
                small_in_a_row += 1
                if frame.op in (Op.PUT, Op.GET) or small_in_a_row >= _SMALL_PER_TURN:
                    small_in_a_row = 0
                    await anyio.lowlevel.checkpoint()
        except ProtocolError as exc:
            # Framing is lost: say why, then close.
            self.service.metrics.count_refusal("bulk", "malformed", exc.status)
            try:
                await sockio.send_all(self.sock, [heads.encode_error(None, exc.status, str(exc))])
            except OSError:
                pass
        except (_Closed, sockio.PeerClosed):
            pass

    async def _recv(self, buf: memoryview) -> int:
        if self.initial:
            n = min(len(buf), len(self.initial))
            buf[:n] = self.initial[:n]
            self.initial = self.initial[n:]
            return n
        try:
            n = self.sock.recv_into(buf)  # data is usually there: no timer, no wait
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            with anyio.move_on_after(self.idle_timeout) as scope:
                n = await sockio.recv_into(self.sock, buf)
            if scope.cancelled_caught:
                raise _Closed from None  # idle, or a sender stalled mid-frame
        if n == 0:
            if self.reader.idle:
                raise _Closed
            raise sockio.PeerClosed("peer closed mid-frame")
        return n

    async def _read_frame(self) -> Frame | None:
        while True:
            frame = self.reader.advance(await self._recv(self.reader.want()))
            if frame is not None:
                return frame

    async def _read_body(self, targets: list) -> None:
        body = BodyReader(targets)
        wakeups = sockio.BodyWakeups(self.sock)
        since_yield = 0
        try:
            while not body.done:
                wakeups.expect(body.remaining)
                n = await self._recv(body.want()[: sockio.FAIR_SHARE])
                body.advance(n)
                since_yield += n
                if since_yield >= sockio.FAIR_SHARE and not body.done:
                    # Data keeps coming without a wait: let the other connections' small requests in.
                    since_yield = 0
                    await anyio.lowlevel.checkpoint()
        finally:
            wakeups.done()

    async def _discard_body(self, frame: Frame) -> None:
        cfg = self.service.config
        if frame.body_len > cfg.max_value_bytes * max(1, cfg.max_batch_keys):
            raise ProtocolError(f"frame body of {frame.body_len} bytes is beyond any limit", 413)
        await self._read_body([frame.body_len])

    async def _reply(self, frame: Frame, reply: heads.Reply, body: list | None = None) -> None:
        body = body or []
        header = heads.encode_reply(frame, reply, sum(len(b) for b in body))
        await sockio.send_all(self.sock, [header, *body])

    async def _dispatch(self, frame: Frame) -> None:
        svc = self.service
        try:
            request = heads.decode_request(frame)
        except ProtocolError as exc:
            await self._discard_body(frame)
            svc.metrics.count_refusal("bulk", _op_name(frame.op), exc.status)
            raise RequestError(exc.status, str(exc)) from None
        with svc.metrics.request("bulk", _op_name(frame.op)) as obs:
            obs.namespace = getattr(request, "ns", None)
            keys = getattr(request, "keys", None)
            obs.keys = None if keys is None else len(keys)
            await self._do(frame, request, obs)

    async def _do(self, frame: Frame, request: heads.Request, obs: RequestObservation) -> None:
        svc = self.service
        if isinstance(request, PutRequest):
            await self._put(frame, request)
            return
        await self._discard_body(frame)  # the other ops carry no body
        if isinstance(request, PingRequest):
            await self._reply(frame, PingReply())
        elif isinstance(request, AuthRequest):
            if svc.auth.enabled and svc.auth.match(request.token) is None:
                raise RequestError(401, "unknown token")
            self.token = request.token
            await self._reply(frame, AuthReply())
        elif isinstance(request, GetRequest):
            entries = await svc.get_entries(self.token, request.ns, request.keys, obs)
            try:  # pinned while they are on the wire: nobody can reuse their slots meanwhile
                sizes = [-1 if e is None else e.size for e in entries]
                await self._reply(frame, GetReply(sizes), [e.view for e in entries if e])
            finally:
                svc.unpin_all(entries)
        elif isinstance(request, LookupRequest):
            await self._reply(frame, LookupReply(svc.lookup(self.token, request.ns, request.keys, obs)))
        elif isinstance(request, ExistsRequest):
            await self._reply(frame, ExistsReply(svc.exists(self.token, request.ns, request.keys, obs)))
        elif isinstance(request, DeleteRequest):
            await self._reply(frame, DeleteReply(svc.delete(self.token, request.ns, request.keys)))

    async def _put(self, frame: Frame, request: PutRequest) -> None:
        svc = self.service
        keys, sizes = request.keys, request.sizes
        try:
            if sum(sizes) != frame.body_len:
                raise RequestError(400, f"sizes add up to {sum(sizes)} but the body is {frame.body_len} bytes")
            ns = svc.begin_put(self.token, request.ns, keys, sizes)
        except RequestError:
            await self._discard_body(frame)
            raise
        slots = await svc.alloc_put(ns, keys, sizes)
        try:
            # Straight into the arena: a value that could not get a slot is read and dropped.
            await self._read_body([slot.view[:size] if slot is not None else size for slot, size in zip(slots, sizes)])
            stored = svc.commit_put(ns, keys, slots, sizes)
        except BaseException:
            svc.abort_put(slots)
            raise
        await self._reply(frame, PutReply(stored))

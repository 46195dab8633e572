"""Bulk front end: binary frames on a raw socket, values received straight into their arena slots."""

from __future__ import annotations

import logging
import socket
import ssl

import anyio

from .. import sockio
from ..protocol import bulk
from ..protocol.bulk import BodyReader, Frame, FrameReader, Op, ProtocolError
from .service import RequestError, Service

log = logging.getLogger("membrain.server.bulk")


_SMALL_PER_TURN = 64  # small frames (lookup, exists, delete, ping) answered before the loop's other tasks run


class _Closed(Exception):
    pass


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
                self.service.counters.bulk_frames += 1
                try:
                    await self._dispatch(frame)
                except RequestError as exc:
                    self.service.counters.errors[exc.status] += 1
                    await sockio.send_all(self.sock, [bulk.encode_error(frame, exc.status, str(exc))])
                # Pipelined lookups come many to a connection: answer those already here back to back
                # rather than one per turn of the loop, where each would wait for a chunk of every upload.
                small_in_a_row += 1
                if frame.op in (Op.PUT, Op.GET) or small_in_a_row >= _SMALL_PER_TURN:
                    small_in_a_row = 0
                    await anyio.lowlevel.checkpoint()
        except ProtocolError as exc:
            # Framing is lost: say why, then close.
            self.service.counters.errors[exc.status] += 1
            try:
                await sockio.send_all(self.sock, [bulk.encode_error(None, exc.status, str(exc))])
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
        since_yield = 0
        while not body.done:
            n = await self._recv(body.want()[: sockio.FAIR_SHARE])
            body.advance(n)
            since_yield += n
            if since_yield >= sockio.FAIR_SHARE and not body.done:
                # Data keeps coming without a wait: let the other connections' small requests in.
                since_yield = 0
                await anyio.lowlevel.checkpoint()

    async def _discard_body(self, frame: Frame) -> None:
        cfg = self.service.config
        if frame.body_len > cfg.max_value_bytes * max(1, cfg.max_batch_keys):
            raise ProtocolError(f"frame body of {frame.body_len} bytes is beyond any limit", 413)
        await self._read_body([frame.body_len])

    async def _reply(self, frame: Frame, head: dict, body: list | None = None) -> None:
        body = body or []
        header = bulk.encode_reply(frame, head, sum(len(b) for b in body))
        await sockio.send_all(self.sock, [header, *body])

    async def _dispatch(self, frame: Frame) -> None:
        svc = self.service
        op = frame.op
        if op == Op.PING:
            await self._discard_body(frame)
            await self._reply(frame, {"pong": True})
            return
        if op == Op.AUTH:
            await self._discard_body(frame)
            token = frame.head.get("token")
            if not isinstance(token, str):
                raise RequestError(400, "AUTH needs a string 'token'")
            if svc.auth.enabled and svc.auth.match(token) is None:
                raise RequestError(401, "unknown token")
            self.token = token
            await self._reply(frame, {"ok": True})
            return
        if op not in (Op.PUT, Op.GET, Op.LOOKUP, Op.EXISTS, Op.DELETE):
            await self._discard_body(frame)
            raise RequestError(400, f"unknown bulk op {op}")
        try:
            ns, keys, sizes = bulk.keys_and_sizes(frame)
        except ProtocolError as exc:
            await self._discard_body(frame)
            raise RequestError(exc.status, str(exc)) from None
        if op == Op.PUT:
            try:
                if sum(sizes) != frame.body_len:
                    raise RequestError(400, f"sizes add up to {sum(sizes)} but the body is {frame.body_len} bytes")
                ns = svc.begin_put(self.token, ns, keys, sizes)
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
            await self._reply(frame, {"stored": stored})
            return
        await self._discard_body(frame)
        if op == Op.GET:
            entries = await svc.get_entries(self.token, ns, keys)
            try:  # pinned while they are on the wire: nobody can reuse their slots meanwhile
                await self._reply(
                    frame, {"sizes": [-1 if e is None else e.size for e in entries]}, [e.view for e in entries if e]
                )
            finally:
                svc.unpin_all(entries)
        elif op == Op.LOOKUP:
            await self._reply(frame, {"count": svc.lookup(self.token, ns, keys)})
        elif op == Op.EXISTS:
            await self._reply(frame, {"present": svc.exists(self.token, ns, keys)})
        elif op == Op.DELETE:
            await self._reply(frame, {"deleted": svc.delete(self.token, ns, keys)})

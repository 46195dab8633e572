"""Client side of the bulk protocol: a small pool of raw TCP connections, one request in flight each."""

from __future__ import annotations

import itertools
import socket
import ssl
import time

import anyio

from .. import sockio
from ..protocol import bulk
from ..protocol.bulk import BodyReader, Frame, FrameReader, Op
from .errors import MembrainRequestError


class BulkConnection:
    __slots__ = ("sock", "reader", "_ids", "idle_since")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = FrameReader()
        self._ids = itertools.count(1)
        self.idle_since = time.monotonic()

    def looks_alive(self) -> bool:
        """False if the server closed this idle connection (its idle timeout): cheaper than a failed call,
        which would also count against the circuit breaker."""
        if isinstance(self.sock, ssl.SSLSocket):
            return True  # no peek through TLS; the pool's age limit covers it
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: the normal state of an idle connection
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for: either way not a usable connection

    async def call(self, op: int, head: dict, body: list | tuple = ()) -> Frame:
        """Send one frame and read the reply's header and head; the caller then reads the reply body."""
        rid = next(self._ids) & 0xFFFFFFFF
        header = bulk.encode_frame(op, rid, head, sum(len(b) for b in body))
        await sockio.send_all(self.sock, [header, *body])
        while True:
            n = await sockio.recv_into(self.sock, self.reader.want())
            if n == 0:
                raise sockio.PeerClosed("server closed the bulk connection")
            frame = self.reader.advance(n)
            if frame is not None:
                break
        if frame.request_id != rid and frame.request_id != 0:
            raise bulk.ProtocolError(f"reply for request {frame.request_id}, expected {rid}")
        if frame.status:
            await self.read_body([frame.body_len])
            raise MembrainRequestError(frame.status, str(frame.head.get("error", "bulk request refused")))
        return frame

    async def read_body(self, targets: list) -> None:
        body = BodyReader(targets)
        since_yield = 0
        while not body.done:
            n = await sockio.recv_into(self.sock, body.want())
            if n == 0:
                raise sockio.PeerClosed("server closed the bulk connection mid-body")
            body.advance(n)
            since_yield += n
            if since_yield >= sockio.FAIR_SHARE and not body.done:
                since_yield = 0
                await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        sockio.close(self.sock)


class BulkPool:
    """At most `size` connections; idle ones are reused (LIFO: the warmest socket first).

    Idle connections the server has closed, or that sat idle longer than `max_idle` (below the server's
    default idle timeout), are dropped when taken, not used: after a quiet spell the first calls would
    otherwise fail one by one and trip the circuit breaker.
    """

    max_idle = 30.0

    def __init__(self, host: str, port: int, token: str | None, size: int = 8, tls: ssl.SSLContext | None = None):
        self.host, self.port, self.token, self.tls = host, port, token, tls
        self._idle: list[BulkConnection] = []
        self._slots = anyio.Semaphore(size)
        self.opened = 0

    async def _open(self) -> BulkConnection:
        conn = BulkConnection(await sockio.connect(self.host, self.port, self.tls))
        self.opened += 1
        if self.token:
            try:
                await conn.call(Op.AUTH, {"token": self.token})
            except BaseException:
                conn.close()
                raise
        return conn

    async def run(self, fn):
        """Run `fn(conn)` on a pooled connection; a connection that saw any error is closed, not reused."""
        async with self._slots:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if time.monotonic() - candidate.idle_since < self.max_idle and candidate.looks_alive():
                    conn = candidate
                    break
                candidate.close()
            if conn is None:
                conn = await self._open()
            ok = False
            try:
                result = await fn(conn)
                ok = True
                return result
            finally:
                if ok:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

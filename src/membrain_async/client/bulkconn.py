"""Client side of the bulk protocol: pipelined connections and the pools that hand them out.

A connection carries several requests at once. Every frame has a request id; replies are matched to their
requests by it, in whatever order they come. There is no background reader task (nothing outlives its
caller): whichever waiting caller finds nobody reading becomes the reader, reads replies (its own and
others', bodies straight into each request's own buffers) until its own has come, then hands reading over
to a caller still waiting. A connection whose byte stream is lost (closed, reset, a reply half read)
fails exactly the requests in flight on it, and is never used again.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Awaitable, Callable

import anyio

from .. import sockio
from ..protocol import bulk, heads
from ..protocol.bulk import BodyReader, Frame, FrameReader
from .errors import MembrainRequestError

class ReplyBody:
    """Where a reply's body goes: `targets`, filled in order (an int entry discards that many bytes), and
    `on_filled(i, j)`, told after a receive that targets i..j-1 are now complete (while their bytes are
    still in the CPU's cache)."""

    __slots__ = ("targets", "on_filled")

    def __init__(self, targets: list, on_filled: Callable[[int, int], None] | None = None):
        self.targets = targets
        self.on_filled = on_filled


# A request's body sink: given its reply's frame, where the body goes (a ReplyBody, or just its targets).
# None: the body (if any) is discarded.
Sink = Callable[[Frame], "ReplyBody | list"]


class ConnectionLost(sockio.PeerClosed):
    """The connection a request was in flight on can no longer carry it (closed, reset, framing lost)."""


class _Pending:
    __slots__ = ("sink", "frame", "error", "done", "wake")

    def __init__(self, sink: Sink | None):
        self.sink = sink
        self.frame: Frame | None = None
        self.error: BaseException | None = None
        self.done = False
        self.wake = anyio.Event()

    def finish(self, frame: Frame | None = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.frame, self.error, self.done = frame, error, True
            self.wake.set()


class BulkConnection:
    def __init__(self, sock: socket.socket, pace: Callable[[], Awaitable[None]] | None = None):
        self.sock = sock
        self.pace = pace  # awaited between the 1 MiB chunks of a request body sent (uploads)
        self.reader = FrameReader()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        # fast_acquire: an uncontended acquire takes no trip through the event loop. The request's own send
        # and wait for its reply are its checkpoints; py-spy on single 1 MiB puts showed the two extra
        # cancel-shielded checkpoints (lock, semaphore) among the client's costs.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._reading = False
        self.broken: BaseException | None = None
        # A request gave up before its reply came (a deadline, a cancelled job): that reply is still owed,
        # maybe late, and anything sent after it would wait behind it. No new request is placed here;
        # the connection closes once its last request in flight ended.
        self.retired = False
        self.idle_since = time.monotonic()

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def looks_alive(self) -> bool:
        """False if the server closed this idle connection (its idle timeout): cheaper than a failed call,
        which would also count against the circuit breaker."""
        if self.broken is not None:
            return False
        if isinstance(self.sock, ssl.SSLSocket):
            return True  # no peek through TLS; the pool's age limit covers it
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: the normal state of an idle connection
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for: either way not a usable connection

    def _new_id(self) -> int:
        while True:
            self._next_id = (self._next_id % 0xFFFFFFFF) + 1  # 1..2^32-1; 0 is the server's "no request"
            if self._next_id not in self._pending:
                return self._next_id

    async def call(self, request: heads.Request, body: list | tuple = (), sink: Sink | None = None) -> Frame:
        """Send one request and wait for its reply. The reply body goes where `sink(frame)` says.

        MembrainRequestError if the server refused it (the connection stays usable); ConnectionLost (or
        another OSError) if the connection failed while the request was in flight.
        """
        if self.broken is not None:
            raise ConnectionLost(f"bulk connection is closed: {self.broken!r}") from self.broken
        rid = self._new_id()
        pending = _Pending(sink)
        self._pending[rid] = pending
        try:
            header = heads.encode_request(rid, request, sum(len(b) for b in body))
            async with self._send_lock:
                if self.broken is not None:
                    raise ConnectionLost(f"bulk connection is closed: {self.broken!r}") from self.broken
                try:
                    await sockio.send_all(self.sock, [header, *body], self.pace)
                except BaseException as exc:
                    self._break(exc)  # a frame may be half sent: the stream's framing is lost
                    raise
            await self._wait(pending)
        finally:
            if self._pending.get(rid) is pending:
                del self._pending[rid]  # gave up (cancelled, timed out): its reply will never be read
                self.retired = True
            if not self._pending:
                self.idle_since = time.monotonic()
                if self.retired:
                    self.close()
        if pending.error is not None:
            raise pending.error
        frame = pending.frame
        assert frame is not None
        if frame.status:
            raise MembrainRequestError(frame.status, heads.error_message(frame.head, "bulk request refused"))
        return frame

    async def _wait(self, pending: _Pending) -> None:
        while not pending.done:
            if not self._reading:
                self._reading = True
                try:
                    while not pending.done:
                        await self._read_one()
                finally:
                    self._reading = False
                    self._hand_over(pending)
            else:
                await pending.wake.wait()
                if not pending.done:
                    pending.wake = anyio.Event()  # woken to take over reading

    def _hand_over(self, reader: _Pending) -> None:
        for other in self._pending.values():
            if other is not reader and not other.done:
                other.wake.set()
                return

    async def _read_one(self) -> None:
        """Read one reply frame, head and body, and complete its request."""
        while True:
            n = await sockio.recv_into(self.sock, self.reader.want())  # cancelled here: nothing is lost
            if n == 0:
                self._break(ConnectionLost("server closed the bulk connection"))
                return
            try:
                frame = self.reader.advance(n)
            except bulk.ProtocolError as exc:
                self._break(exc)
                return
            if frame is not None:
                break
        if frame.request_id == 0 and frame.status:
            # The server lost this connection's framing (or refused it as a whole) and is closing it.
            self._break(MembrainRequestError(frame.status, heads.error_message(frame.head, "bulk connection refused")))
            return
        # The request stays in flight until its body is read too: a connection reading a body is not idle,
        # so the pool neither places another payload on it nor peeks at (and closes) it meanwhile.
        pending = self._pending.get(frame.request_id)
        if pending is not None and not frame.status and pending.sink is not None:
            try:
                body = pending.sink(frame)
            except bulk.ProtocolError as exc:
                self._break(exc)  # a reply that does not add up: the body length cannot be trusted either
                pending.finish(error=exc)  # (_break already failed it with the same error)
                return
        else:
            body = [frame.body_len]  # an error's message, a request that gave up, or no body wanted
        try:
            await self._read_body(body if isinstance(body, ReplyBody) else ReplyBody(body))
        except BaseException as exc:
            self._break(exc)  # a body half read: the stream's framing is lost
            if pending is not None:
                pending.finish(error=self.broken)
            raise
        if pending is not None:
            if self._pending.get(frame.request_id) is pending:
                del self._pending[frame.request_id]
            pending.finish(frame)

    async def _read_body(self, reply: ReplyBody) -> None:
        body = BodyReader(reply.targets)
        wakeups = sockio.BodyWakeups(self.sock)
        since_yield = filled = 0
        try:
            while not body.done:
                wakeups.expect(body.remaining)
                # A value in pieces (a block's pages where they lie): one receive fills several.
                n = await sockio.recv_into_many(self.sock, body.want_many(sockio.FAIR_SHARE))
                if n == 0:
                    raise ConnectionLost("server closed the bulk connection mid-body")
                body.advance(n)
                if reply.on_filled is not None and body.filled > filled:
                    reply.on_filled(filled, body.filled)
                    filled = body.filled
                since_yield += n
                if since_yield >= sockio.FAIR_SHARE and not body.done:
                    since_yield = 0
                    await anyio.lowlevel.checkpoint()  # a load is waited for: it does not pace
        finally:
            wakeups.done()

    def _break(self, exc: BaseException) -> None:
        """The byte stream is lost: fail every request in flight, close the socket, never reuse it."""
        if self.broken is None:
            if isinstance(exc, (OSError, MembrainRequestError, bulk.ProtocolError)):
                self.broken = exc
            else:  # a cancelled or failed reader/sender: the others see a lost connection and may retry
                self.broken = ConnectionLost(f"bulk connection abandoned mid-frame ({type(exc).__name__})")
            sockio.close(self.sock)
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.finish(error=self.broken)

    def close(self) -> None:
        self._break(ConnectionLost("bulk connection closed by the client"))


class BulkPool:
    """At most `size` connections to one server, each carrying at most `depth` requests at once.

    depth 1 (payloads): a request has a connection to itself, so a 16 MiB body never delays another
    request's reply. depth > 1 (lookups, exists): requests share connections, filling one before
    opening the next, so a burst of small requests needs few connections and few syscalls.

    Idle connections the server has closed, or that sat idle longer than `max_idle` (below the server's
    default idle timeout), are dropped when taken, not used: after a quiet spell the first calls would
    otherwise fail one by one and trip the circuit breaker.
    """

    max_idle = 30.0
    check_after = 0.05  # a connection idle for less than this was alive a moment ago: no peek needed

    def __init__(self, host: str, port: int, token: str | None, size: int = 8, tls: ssl.SSLContext | None = None,
                 depth: int = 1, pace: Callable[[], Awaitable[None]] | None = None):
        self.host, self.port, self.token, self.tls, self.pace = host, port, token, tls, pace
        self.size, self.depth = size, depth
        self._conns: list[BulkConnection] = []  # most recently used last
        self._slots = anyio.Semaphore(size * depth, fast_acquire=True)  # see BulkConnection._send_lock
        self._opening = 0
        self._wanting = 0  # callers waiting for a connection
        self._opened_event = anyio.Event()
        self.opened = 0

    async def _open(self) -> BulkConnection:
        conn = BulkConnection(await sockio.connect(self.host, self.port, self.tls), self.pace)
        self.opened += 1
        if self.token:
            try:
                await conn.call(heads.AuthRequest(self.token))
            except BaseException:
                conn.close()
                raise
        return conn

    def _pick(self) -> BulkConnection | None:
        """The least busy connection with room (the warmest among equals); drops dead and stale ones."""
        while True:
            now = time.monotonic()
            best = None
            live = []
            for conn in self._conns:
                if conn.broken is not None or (not conn.inflight and now - conn.idle_since >= self.max_idle):
                    conn.close()
                    continue
                if conn.retired:  # closes itself when its last request ends; it takes no new ones
                    continue
                live.append(conn)
                if conn.inflight < self.depth and (best is None or conn.inflight <= best.inflight):
                    best = conn
            self._conns = live
            if best is None or best.inflight or now - best.idle_since < self.check_after or best.looks_alive():
                return best
            best.close()  # the server closed it while it sat idle

    async def _take(self) -> BulkConnection:
        self._wanting += 1
        try:
            while True:
                conn = self._pick()
                if conn is not None:
                    return conn
                # Open another connection only for demand the ones already opening cannot carry.
                capacity = (len(self._conns) + self._opening) * self.depth
                demand = sum(c.inflight for c in self._conns) + self._wanting
                if len(self._conns) + self._opening < self.size and (not self._opening or demand > capacity):
                    self._opening += 1
                    try:
                        conn = await self._open()
                    finally:
                        self._opening -= 1
                        self._opened_event.set()
                        self._opened_event = anyio.Event()
                    self._conns.append(conn)
                    return conn
                await self._opened_event.wait()
        finally:
            self._wanting -= 1

    async def run(self, fn):
        """Run `fn(conn)` on a pooled connection (opened if none has room)."""
        async with self._slots:
            conn = await self._take()
            if conn in self._conns:  # most recently used last
                self._conns.remove(conn)
                self._conns.append(conn)
            return await fn(conn)

    def close(self) -> None:
        while self._conns:
            self._conns.pop().close()

"""Raw non-blocking socket I/O on anyio, for the bulk path (client and server).

anyio's byte streams return fresh `bytes` per receive; the bulk path instead `recv_into`s preallocated
buffers and `sendmsg`s lists of buffers, waiting with `anyio.wait_readable/wait_writable` only when the
kernel has nothing for us. Works the same under asyncio and trio. Callers own deadlines (anyio.fail_after).

TLS sockets (`ssl.SSLSocket`, non-blocking) go through the same calls: "want read/write" from the TLS
layer waits on the socket like EAGAIN does, and sends go buffer by buffer (TLS has no sendmsg).
"""

from __future__ import annotations

import os
import socket
import ssl

import anyio

_IOV_MAX = 512
# Most bytes one send or receive moves before the event loop runs its other tasks. On loopback the kernel
# takes or hands over tens of MiB in one syscall (tcp_rmem autotunes to 32 MiB), which would keep a
# lookup's reply waiting behind a whole 16 MiB block; 1 MiB is ~0.1-0.3 ms of copying.
FAIR_SHARE = 1 << 20
# A frame's head rides in the same syscall as the body that follows it: sent alone, it costs the sender a
# syscall and the receiver a wake-up of its own for a hundred bytes (bench/put_bench.py). A whole buffer
# may therefore overshoot FAIR_SHARE by up to this much.
HEAD_ROOM = 64 << 10


# A large body is received in wake-ups of at least this many bytes (SO_RCVLOWAT, `BodyWakeups`). Without
# it the kernel wakes the reader for every ~64 KiB segment that lands: a 50 MB load took ~520 receives and
# ~300 event-loop wake-ups, each winning the GIL back from the forward pass (bench/datapath_bench.py).
RECV_BATCH = 256 << 10


class PeerClosed(ConnectionError):
    """The other end closed the connection."""


def configure(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


async def recv_into(sock: socket.socket, buf: memoryview) -> int:
    """Receive at least one byte into buf (at most FAIR_SHARE); 0 means the peer closed."""
    buf = buf[:FAIR_SHARE]
    while True:
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            # The TLS layer's own buffer is drained before it asks for more, so waiting on the socket is right.
            await anyio.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await anyio.wait_writable(sock)
        except ssl.SSLZeroReturnError:
            return 0


async def recv_into_many(sock: socket.socket, bufs: list[memoryview]) -> int:
    """Receive at least one byte into bufs, filled in order, with one syscall (recvmsg_into); 0 means the
    peer closed. TLS has no scatter receive: there it fills the first buffer only."""
    if len(bufs) == 1 or isinstance(sock, ssl.SSLSocket):
        return await recv_into(sock, bufs[0])
    while True:
        try:
            return sock.recvmsg_into(bufs[:_IOV_MAX])[0]
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)


class BodyWakeups:
    """While a large body is read, the socket wakes its reader only once RECV_BATCH bytes, or the rest of the
    body, are queued (SO_RCVLOWAT). Never more than the body still owes: the reader cannot wait for bytes
    that are not coming (and a peer that closes wakes it regardless). Back to one byte when the body ends,
    so the next frame's head is read as soon as it lands. Plain TCP sockets only: TLS records and other
    sockets keep the default."""

    __slots__ = ("sock", "current")

    def __init__(self, sock: socket.socket):
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        self.sock = sock if tcp and not isinstance(sock, ssl.SSLSocket) else None
        self.current = 1

    def expect(self, remaining: int) -> None:
        """Before waiting: `remaining` bytes of the body are still to come."""
        want = min(remaining, RECV_BATCH) if remaining > RECV_BATCH // 4 else 1
        if want != self.current and (want < self.current or self.current == 1):
            self._set(want)

    def done(self) -> None:
        if self.current != 1:
            self._set(1)

    def _set(self, n: int) -> None:
        self.current = n
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            except OSError:  # closed, or a socket kind without it: waking early is only slower
                self.sock = None


async def recv_exactly_into(sock: socket.socket, buf: memoryview) -> None:
    while buf:
        n = await recv_into(sock, buf)
        if n == 0:
            raise PeerClosed("connection closed mid-frame")
        buf = buf[n:]


async def send_all(sock: socket.socket, buffers, pace=None) -> None:
    """Send every buffer in order with scatter-gather I/O; no buffer is copied or joined.

    About FAIR_SHARE bytes go per syscall (a buffer that fits in FAIR_SHARE + HEAD_ROOM goes whole; a larger
    one is cut to fill the syscall up to FAIR_SHARE), and the loop runs other tasks between them
    (`await pace()` if given, a plain checkpoint otherwise)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    if isinstance(sock, ssl.SSLSocket):
        await _send_all_tls(sock, views)
        return
    i = 0
    while i < len(views):
        batch, size = [], 0
        for v in views[i : i + _IOV_MAX]:
            if size + len(v) > FAIR_SHARE + HEAD_ROOM:
                if size < FAIR_SHARE:
                    batch.append(v[: FAIR_SHARE - size])
                break
            batch.append(v)
            size += len(v)
        try:
            sent = sock.sendmsg(batch)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)
            continue
        moved = sent
        while sent:
            head = views[i]
            if sent >= len(head):
                sent -= len(head)
                i += 1
            else:
                views[i] = head[sent:]
                sent = 0
        if moved >= FAIR_SHARE // 2 and i < len(views):
            # A big body: let small requests and their replies go between its chunks.
            await (pace() if pace is not None else anyio.lowlevel.checkpoint())


async def _send_all_tls(sock: ssl.SSLSocket, views: list[memoryview]) -> None:
    for view in views:
        while view:
            try:
                view = view[sock.send(view) :]
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                await anyio.wait_writable(sock)
            except ssl.SSLWantReadError:
                await anyio.wait_readable(sock)


async def start_tls(sock: socket.socket, context: ssl.SSLContext, *, server_hostname: str | None = None,
                    server_side: bool = False) -> ssl.SSLSocket:
    """Wrap a connected non-blocking socket and complete the handshake (the caller owns the deadline)."""
    tls = context.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                              do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await anyio.wait_readable(tls)
            except ssl.SSLWantWriteError:
                await anyio.wait_writable(tls)
    except BaseException:
        close(tls)  # wrap_socket took over the descriptor: the caller's socket object is already empty
        raise


async def connect(host: str, port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    """Non-blocking TCP connect under the current anyio backend, then a TLS handshake if `tls` is given."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        configure(sock)
        try:
            try:
                sock.connect(addr)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connect to {host}:{port} failed: {os.strerror(err)}") from None
            if tls is not None:
                return await start_tls(sock, tls, server_hostname=host)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise last or OSError(f"cannot resolve {host}:{port}")


def close(sock: socket.socket) -> None:
    try:
        anyio.notify_closing(sock)
    except Exception:
        pass
    try:
        sock.close()
    except OSError:
        pass

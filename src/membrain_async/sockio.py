"""Raw non-blocking socket I/O on anyio, for the bulk path (client and server).

anyio's byte streams return fresh `bytes` per receive; the bulk path instead `recv_into`s preallocated
buffers and `sendmsg`s lists of buffers, waiting with `anyio.wait_readable/wait_writable` only when the
kernel has nothing for us. Works the same under asyncio and trio. Callers own deadlines (anyio.fail_after).
"""

from __future__ import annotations

import os
import socket

import anyio

_IOV_MAX = 512


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
    """Receive at least one byte into buf; 0 means the peer closed."""
    while True:
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)


async def recv_exactly_into(sock: socket.socket, buf: memoryview) -> None:
    while buf:
        n = await recv_into(sock, buf)
        if n == 0:
            raise PeerClosed("connection closed mid-frame")
        buf = buf[n:]


async def send_all(sock: socket.socket, buffers) -> None:
    """Send every buffer in order with scatter-gather I/O; no buffer is copied or joined."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + _IOV_MAX])
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)
            continue
        while sent:
            head = views[i]
            if sent >= len(head):
                sent -= len(head)
                i += 1
            else:
                views[i] = head[sent:]
                sent = 0


async def connect(host: str, port: int) -> socket.socket:
    """Non-blocking TCP connect under the current anyio backend."""
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

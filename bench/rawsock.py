"""The loopback ceiling: plain blocking Python sockets doing what a put/get does, nothing else.

A peer process either sinks `size`-byte messages into one preallocated buffer and answers 1 byte (put),
or answers each 1-byte request with `size` bytes from a preallocated buffer (get). The client side
sends from / receives into preallocated buffers too. This is the copy Membrain's bulk path must approach.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

_REQ = struct.Struct("<BQ")  # op (1 put, 2 get), size


def _peer(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(64 << 20))
    hdr = bytearray(_REQ.size)
    while True:
        if not _recv_exact(conn, memoryview(hdr)):
            return
        op, size = _REQ.unpack(hdr)
        if op == 1:
            _recv_exact(conn, buf[:size])
            conn.sendall(b"k")
        else:
            conn.sendall(buf[:size])


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    while view:
        n = conn.recv_into(view)
        if n == 0:
            return False
        view = view[n:]
    return True


class RawPeer:
    """A forked sink/source peer and a connected socket: one put or get of `total` bytes per call."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.proc = mp.get_context("fork").Process(target=_peer, args=(self.listener,), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(self.listener.getsockname())
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.payload = memoryview(bytearray(max_bytes))
        self.inbox = memoryview(bytearray(max_bytes))
        self._ack = memoryview(bytearray(1))

    def put(self, total: int) -> None:
        self.sock.sendall(_REQ.pack(1, total))
        self.sock.sendall(self.payload[:total])
        _recv_exact(self.sock, self._ack)

    def get(self, total: int) -> None:
        self.sock.sendall(_REQ.pack(2, total))
        _recv_exact(self.sock, self.inbox[:total])

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.join()
        self.listener.close()


def measure(size: int, seconds: float = 1.0, batch: int = 1) -> dict[str, float]:
    """GB/s for put and get of `batch` values of `size` bytes per round trip."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    proc = mp.get_context("fork").Process(target=_peer, args=(listener,), daemon=True)
    proc.start()
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    total = size * batch
    payload = memoryview(bytearray(total))
    inbox = memoryview(bytearray(total))
    ack = bytearray(1)
    out: dict[str, float] = {}
    try:
        for op, name in ((1, "put"), (2, "get")):
            n = 0
            t0 = time.perf_counter()
            while True:
                sock.sendall(_REQ.pack(op, total))
                if op == 1:
                    sock.sendall(payload)
                    _recv_exact(sock, memoryview(ack))
                else:
                    _recv_exact(sock, inbox)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= seconds and n >= 3:
                    break
            out[name] = n * total / dt / 1e9
    finally:
        sock.close()
        proc.terminate()
        proc.join()
        listener.close()
    return out


if __name__ == "__main__":
    for s in (64 << 10, 1 << 20, 4 << 20):
        print(s, measure(s))

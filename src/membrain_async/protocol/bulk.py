"""The bulk protocol: length-prefixed, versioned binary frames for block payloads.

A frame is a fixed 24-byte header, a small JSON "head" (keys, sizes, status) and an optional raw body.
Tensor bytes only ever travel in the body, as the concatenation of the values named in the head.

    header  = magic "MBRN" | version u8 | op u8 | status u16 | request id u32 | head length u32 | body length u64
    head    = orjson object (at most MAX_HEAD_BYTES)
    body    = raw bytes, body length long

The reader is sans-IO and zero-copy: instead of being handed bytes, it hands out the writable buffer it
wants filled next (`want()`), the I/O layer `recv_into`s it and reports how much arrived (`advance(n)`).
Bodies are read straight into buffers the caller picks (the server's value storage, the client's staging
memory), so no payload byte is copied or concatenated on the way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

MAGIC = b"MBRN"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE = HEADER.size  # 24
MAX_HEAD_BYTES = 4 << 20  # a head lists keys and sizes; 4 MiB is ~30k keys


class Op(IntEnum):
    """Each op's request and reply heads are the classes in heads.py (AuthRequest, AuthReply, ...)."""

    AUTH = 1  # once per connection
    PUT = 2  # body = the values
    GET = 3  # reply body = the present values
    LOOKUP = 4
    EXISTS = 5
    DELETE = 6
    PING = 7


REPLY_BIT = 0x80


class ProtocolError(ValueError):
    """The peer sent something that is not a valid frame or head. `status` is the HTTP-like code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Frame:
    op: int
    status: int
    request_id: int
    head: dict[str, Any]  # the JSON object as decoded; heads.py turns it into the op's typed head
    body_len: int

    @property
    def is_reply(self) -> bool:
        return bool(self.op & REPLY_BIT)


def encode_frame(op: int, request_id: int, head: dict[str, Any] | None = None, body_len: int = 0, status: int = 0) -> bytes:
    """Header + head as one bytes object; the body follows as separate buffers. heads.py builds the heads."""
    head_bytes = orjson.dumps(head) if head else b""
    if len(head_bytes) > MAX_HEAD_BYTES:
        raise ProtocolError(f"frame head of {len(head_bytes)} bytes exceeds {MAX_HEAD_BYTES}", 413)
    return HEADER.pack(MAGIC, VERSION, op, status, request_id & 0xFFFFFFFF, len(head_bytes), body_len) + head_bytes


def looks_like_bulk(first_bytes: bytes) -> bool:
    """Used by the server to tell a bulk connection from HTTP on the same port."""
    return first_bytes[: len(MAGIC)] == MAGIC[: len(first_bytes)] and len(first_bytes) > 0


class FrameReader:
    """Sans-IO reader of frame header + head. The body is read afterwards with a `BodyReader`.

    Usage:  buf = reader.want(); n = sock.recv_into(buf); frame = reader.advance(n)  (None until complete)
    """

    __slots__ = ("_header", "_head", "_filled", "_parsed", "_max_head")

    def __init__(self, max_head: int = MAX_HEAD_BYTES):
        self._header = bytearray(HEADER_SIZE)
        self._head: bytearray | None = None
        self._filled = 0
        self._parsed: tuple | None = None
        self._max_head = max_head

    @property
    def idle(self) -> bool:
        """True between frames: nothing of the next frame has arrived."""
        return self._filled == 0 and self._parsed is None

    def want(self) -> memoryview:
        if self._parsed is None:
            return memoryview(self._header)[self._filled :]
        assert self._head is not None
        return memoryview(self._head)[self._filled :]

    def feed(self, data: bytes) -> tuple[Frame | None, bytes]:
        """Convenience for tests and fuzzing: push bytes, get (frame or None, unconsumed rest)."""
        view = memoryview(data)
        while view:
            target = self.want()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            frame = self.advance(n)
            if frame is not None:
                return frame, bytes(view)
        return None, b""

    def advance(self, n: int) -> Frame | None:
        if n <= 0:
            raise ValueError("advance() needs the number of bytes received (> 0)")
        self._filled += n
        if self._parsed is None:
            if self._filled < HEADER_SIZE:
                return None
            magic, version, op, status, rid, head_len, body_len = HEADER.unpack(self._header)
            if magic != MAGIC:
                raise ProtocolError("bad magic: not a Membrain bulk frame")
            if version != VERSION:
                raise ProtocolError(f"unsupported bulk protocol version {version} (this side speaks {VERSION})", 505)
            if head_len > self._max_head:
                raise ProtocolError(f"frame head of {head_len} bytes exceeds {self._max_head}", 413)
            self._parsed = (op, status, rid, head_len, body_len)
            self._head = bytearray(head_len)
            self._filled = 0
            if head_len:
                return None
        op, status, rid, head_len, body_len = self._parsed
        if self._filled < head_len:
            return None
        head: Any = {}
        if head_len:
            try:
                head = orjson.loads(self._head)
            except orjson.JSONDecodeError as exc:
                raise ProtocolError(f"frame head is not JSON: {exc}") from None
            if not isinstance(head, dict):
                raise ProtocolError("frame head must be a JSON object")
        self._parsed = None
        self._head = None
        self._filled = 0
        return Frame(op, status, rid, head, body_len)


class BodyReader:
    """Fills a list of caller-chosen buffers in order, then is done. `None` entries are skipped bytes."""

    __slots__ = ("_targets", "_index", "_offset", "_scratch", "remaining")

    def __init__(self, targets: list[memoryview | bytearray | int]):
        # An int target means "discard that many bytes" (e.g. an oversize or unwanted value).
        self._targets = targets
        self._index = 0
        self._offset = 0
        self._scratch: memoryview | None = None
        self.remaining = sum(self._size(t) for t in targets)  # bytes of the body still to come
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._targets) and self._size(self._targets[self._index]) == 0:
            self._index += 1

    @staticmethod
    def _size(t) -> int:
        return t if isinstance(t, int) else len(t)

    @property
    def done(self) -> bool:
        return self._index >= len(self._targets)

    @property
    def filled(self) -> int:
        """How many targets, from the first, are complete."""
        return self._index

    def want(self) -> memoryview:
        t = self._targets[self._index]
        if isinstance(t, int):
            if self._scratch is None:
                self._scratch = memoryview(bytearray(min(t, 1 << 20)))
            return self._scratch[: min(len(self._scratch), t - self._offset)]
        return memoryview(t)[self._offset :]

    def want_many(self, limit: int, max_parts: int = 64) -> list[memoryview]:
        """The buffers one scatter receive may fill, in order: up to `limit` bytes over at most `max_parts`
        targets. A value received in pieces (a block's pages where they lie) then costs one syscall per
        `limit` bytes, not one per piece. A stretch to discard goes alone."""
        if isinstance(self._targets[self._index], int):
            return [self.want()]
        out: list[memoryview] = []
        size, i, offset = 0, self._index, self._offset
        while i < len(self._targets) and size < limit and len(out) < max_parts:
            t = self._targets[i]
            if isinstance(t, int):
                break
            view = memoryview(t)[offset : offset + limit - size]
            if len(view):
                out.append(view)
                size += len(view)
            i, offset = i + 1, 0
        return out

    def advance(self, n: int) -> None:
        """n more bytes were received into what `want` or `want_many` gave."""
        self.remaining -= n
        while n:
            size = self._size(self._targets[self._index])
            step = min(n, size - self._offset)
            self._offset += step
            n -= step
            if self._offset >= size:
                self._index += 1
                self._offset = 0
                self._skip_empty()

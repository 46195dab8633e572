"""RESP2 (the Redis protocol), sans-IO: commands to buffers, replies from bytes, cluster slots and redirects.

No sockets here: `encode` turns a command into a list of buffers to send back to back (a value's buffers
are passed through, never joined), `Replies` turns received bytes into replies (hiredis's C parser does
the parsing), `key_slot` is Redis Cluster's CRC16 slot of a key, `redirect` reads MOVED/ASK errors.
The transport (client/redis_store.py) owns the sockets, on anyio, so the same code runs under asyncio
and trio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SLOTS = 16384

Buffer = bytes | bytearray | memoryview


def _bulk(arg: Buffer | str | int) -> list[Buffer]:
    if isinstance(arg, str):
        arg = arg.encode()
    elif isinstance(arg, int):
        arg = str(arg).encode()
    return [b"$%d\r\n" % memoryview(arg).nbytes, arg, b"\r\n"]


def encode(*args: Buffer | str | int) -> list[Buffer]:
    """One command as buffers; small parts are merged, large values are passed through uncopied."""
    out: list[Buffer] = [b"*%d\r\n" % len(args)]
    for a in args:
        out += _bulk(a)
    return _merge_small(out)


def encode_value_command(head: Sequence[Buffer | str | int], parts: Sequence[Buffer]) -> list[Buffer]:
    """A command whose last argument is a value given as several buffers (payload header + body)."""
    size = sum(memoryview(p).nbytes for p in parts)
    out: list[Buffer] = [b"*%d\r\n" % (len(head) + 1)]
    for a in head:
        out += _bulk(a)
    out.append(b"$%d\r\n" % size)
    out += [p for p in parts if memoryview(p).nbytes]
    out.append(b"\r\n")
    return _merge_small(out)


def _merge_small(parts: list[Buffer], small: int = 4096) -> list[Buffer]:
    """Join runs of small buffers (headers, keys) so a send has few iovecs; big ones stay views."""
    out: list[Buffer] = []
    run = bytearray()
    for p in parts:
        if memoryview(p).nbytes <= small:
            run += p
        else:
            if run:
                out.append(bytes(run))
                run = bytearray()
            out.append(p)
    if run:
        out.append(bytes(run))
    return out


class ProtocolError(ValueError):
    """The peer sent bytes that are not RESP."""


class Replies:
    """Bytes in, replies out. An error reply comes out as a `ReplyError` value, never raised."""

    def __init__(self) -> None:
        try:
            import hiredis
        except ImportError as exc:  # the extra is missing: the connector says which one
            raise ImportError("the Redis backend needs hiredis: pip install 'membrain-async[redis]'") from exc
        self._hiredis = hiredis
        self._reader = hiredis.Reader()

    def feed(self, data: Buffer, n: int | None = None) -> None:
        if n is None:
            self._reader.feed(data)
        else:
            self._reader.feed(data, 0, n)

    def next(self):
        """The next complete reply, or `INCOMPLETE` when more bytes are needed."""
        try:
            reply = self._reader.gets()
        except self._hiredis.ProtocolError as exc:
            raise ProtocolError(str(exc)) from None
        if reply is False:
            return INCOMPLETE
        if isinstance(reply, self._hiredis.ReplyError):
            return ReplyError(str(reply))
        return reply


class _Incomplete:
    def __repr__(self) -> str:
        return "INCOMPLETE"


INCOMPLETE = _Incomplete()


class ReplyError(Exception):
    """An error reply ("-ERR ...", "-MOVED 3999 host:port", "-OOM ..."), as a value."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


@dataclass(frozen=True)
class Redirect:
    ask: bool  # ASK: this one command goes to `addr` (after ASKING); MOVED: the slot lives there now
    slot: int
    addr: tuple[str, int]


def redirect(err: ReplyError) -> Redirect | None:
    parts = str(err).split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return Redirect(parts[0] == "ASK", int(parts[1]), (host, int(port)))


# Errors that a Redis Cluster sends while it reshapes itself (failover, resharding, a node loading its
# data): worth retrying after refreshing the slot map, never a verdict on the key.
TRANSIENT_CODES = frozenset({"TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY"})
# The store refused a write because it is full (maxmemory with noeviction, or nothing evictable).
FULL_CODES = frozenset({"OOM"})


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes keys with."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The cluster slot of a key; a non-empty `{tag}` hashes the tag alone (as Redis does)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


def parse_cluster_slots(reply: list, asked: tuple[str, int]) -> dict[tuple[int, int], tuple[str, int]]:
    """CLUSTER SLOTS -> {(first, last): master address}. An empty host means the node we asked."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    for entry in reply:
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        if host in ("", "?"):
            host = asked[0]
        out[(first, last)] = (host, int(master[1]))
    return out

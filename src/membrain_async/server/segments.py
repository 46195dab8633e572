"""The disk tier's record format, sans-IO: bytes in, records out (no files, no threads).

A segment file is a run of records, each a header block (a 32-byte header, the namespace and the key,
zero-padded to 4 KiB) and then the value (padded to 4 KiB):

    magic "MBR1" | kind u8 (0 value, 1 tombstone) | flags u8 | ns_len u16 | key_len u16 | reserved u16
    | value size u64 | body crc32 u32 (namespace + key + value) | reserved u32 | header crc32 u32

Everything is 4 KiB aligned so that the disk tier can write and read with O_DIRECT, straight from and into
the arena's slots (whose classes above 4 KiB are page multiples): buffered writes through the page cache ran
at a third of this disk's speed. The padding costs 4 KiB per value plus the value's last page.

The header has its own checksum, so a torn or overwritten header is never trusted for the lengths that
find the next record; the body checksum covers the names too, so a value is never served under a key it
was not written for. Records are only appended; a delete appends a tombstone, and since whole segments are
reclaimed oldest first, a tombstone always outlives the records it cancels.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"MBR1"
VALUE, TOMBSTONE = 0, 1
_HEAD = struct.Struct("<4sBBHHHQII")  # everything but the header crc
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _CRC.size
assert HEADER_BYTES == 32
ALIGN = 4096


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)

MAX_NAME = 0xFFFF


class CorruptRecord(ValueError):
    pass


def body_crc(ns: bytes, key: bytes, value) -> int:
    return zlib.crc32(value, zlib.crc32(key, zlib.crc32(ns)))


def encode_header(kind: int, ns: bytes, key: bytes, size: int, crc: int) -> bytes:
    if len(ns) > MAX_NAME or len(key) > MAX_NAME:
        raise ValueError("namespace or key too long for a record")
    head = _HEAD.pack(MAGIC, kind, 0, len(ns), len(key), 0, size, crc, 0)
    return head + _CRC.pack(zlib.crc32(head))


def header_block_bytes(ns_len: int, key_len: int) -> int:
    return align(HEADER_BYTES + ns_len + key_len)


def header_block(kind: int, ns: bytes, key: bytes, size: int, crc: int) -> bytes:
    head = encode_header(kind, ns, key, size, crc) + ns + key
    return head + bytes(header_block_bytes(len(ns), len(key)) - len(head))


def record_bytes(ns: bytes, key: bytes, size: int) -> int:
    return header_block_bytes(len(ns), len(key)) + align(size)


def encode_record(kind: int, ns: bytes, key: bytes, value: bytes) -> bytes:
    """One whole record (tests, fuzzing, tools; the disk tier writes the parts without joining them)."""
    block = header_block(kind, ns, key, len(value), body_crc(ns, key, value))
    return block + value + bytes(align(len(value)) - len(value))


@dataclass(frozen=True)
class Header:
    kind: int
    ns_len: int
    key_len: int
    size: int
    crc: int

    @property
    def total(self) -> int:
        return header_block_bytes(self.ns_len, self.key_len) + align(self.size)


def decode_header(buf) -> Header:
    """Parse 32 header bytes; CorruptRecord if they are not a header written by encode_header."""
    if len(buf) < HEADER_BYTES:
        raise CorruptRecord("short header")
    head = bytes(buf[: _HEAD.size])
    (hcrc,) = _CRC.unpack_from(buf, _HEAD.size)
    if zlib.crc32(head) != hcrc:
        raise CorruptRecord("header checksum mismatch")
    magic, kind, _flags, ns_len, key_len, _r16, size, crc, _r32 = _HEAD.unpack(head)
    if magic != MAGIC or kind not in (VALUE, TOMBSTONE):
        raise CorruptRecord("not a record header")
    if kind == TOMBSTONE and size:
        raise CorruptRecord("tombstone with a value")
    return Header(kind, ns_len, key_len, size, crc)


@dataclass(frozen=True)
class Record:
    offset: int  # of the header, in the segment
    kind: int
    ns: str
    key: str
    size: int
    crc: int

    @property
    def value_offset(self) -> int:
        return self.offset + header_block_bytes(len(self.ns.encode()), len(self.key.encode()))


@dataclass
class Scan:
    records: list[Record] = field(default_factory=list)
    corrupt: int = 0  # headers that failed their checks (skipped by searching for the next magic)
    torn: bool = False  # the segment ends inside a record (a write cut short by a crash)
    end: int = 0  # where the last whole record ends


def scan(buf) -> Scan:
    """Every whole record of a segment image (a bytes-like or an mmap), reading headers and names only.

    Values are not read here (reopening must not read the whole disk): their checksum is checked when
    they are read back. A bad header costs a search for the next magic at a 4 KiB boundary; a tail cut
    short is ignored.
    """
    out = Scan()
    n = len(buf)
    off = 0
    while off < n:
        if n - off < HEADER_BYTES:
            out.torn = True
            break
        try:
            h = decode_header(buf[off : off + HEADER_BYTES])
            names_end = off + HEADER_BYTES + h.ns_len + h.key_len
            if off + h.total > n:
                out.torn = True
                break
            ns = bytes(buf[off + HEADER_BYTES : off + HEADER_BYTES + h.ns_len]).decode()
            key = bytes(buf[off + HEADER_BYTES + h.ns_len : names_end]).decode()
        except (CorruptRecord, UnicodeDecodeError):
            out.corrupt += 1
            nxt = buf.find(MAGIC, off + 1)
            while nxt >= 0 and nxt % ALIGN:
                nxt = buf.find(MAGIC, nxt + 1)
            if nxt < 0:
                break
            off = nxt
            continue
        out.records.append(Record(off, h.kind, ns, key, h.size, h.crc))
        off += h.total
        out.end = off
    return out


# --- hint files ------------------------------------------------------------------------------------
#
# When a segment is closed, the list of its records goes beside it in `seg-N.hint`, so that reopening
# reads one small file per segment instead of one header per value (each a random read of the disk). A hint
# that is missing, torn or does not match its segment's size is ignored and the segment is scanned.

HINT_MAGIC = b"MBH1"
_HINT_HEAD = struct.Struct("<4sQI")  # magic, segment bytes, record count
_HINT_REC = struct.Struct("<BHHQQI")  # kind, ns_len, key_len, header offset, value size, body crc


def hint_record_bytes(ns: bytes, key: bytes) -> int:
    """What one record adds to its segment's hint file (counted against the disk tier's capacity)."""
    return _HINT_REC.size + len(ns) + len(key)


def encode_hint(segment_bytes: int, records: list[Record]) -> bytes:
    parts = [_HINT_HEAD.pack(HINT_MAGIC, segment_bytes, len(records))]
    for r in records:
        ns, key = r.ns.encode(), r.key.encode()
        parts += [_HINT_REC.pack(r.kind, len(ns), len(key), r.offset, r.size, r.crc), ns, key]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode_hint(data: bytes, segment_bytes: int) -> list[Record] | None:
    """The records a hint lists, or None if it is not a whole hint for a segment of this size."""
    if len(data) < _HINT_HEAD.size + _CRC.size:
        return None
    body, (crc,) = data[: -_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        return None
    magic, seg_bytes, count = _HINT_HEAD.unpack_from(body)
    if magic != HINT_MAGIC or seg_bytes != segment_bytes:
        return None
    out: list[Record] = []
    off = _HINT_HEAD.size
    try:
        for _ in range(count):
            kind, ns_len, key_len, rec_off, size, rcrc = _HINT_REC.unpack_from(body, off)
            off += _HINT_REC.size
            ns = body[off : off + ns_len].decode()
            key = body[off + ns_len : off + ns_len + key_len].decode()
            off += ns_len + key_len
            out.append(Record(rec_off, kind, ns, key, size, rcrc))
    except (struct.error, UnicodeDecodeError):
        return None
    return out if off == len(body) else None

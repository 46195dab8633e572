"""The disk tier's file side: everything here runs in worker threads (or at start-up), never on the event loop.

Segment appends (O_DIRECT where the filesystem takes it), checksums, reads into arena slots, hint files and
the start-up scan. The loop-side bookkeeping that decides what to write and read is in disk.py; the record
format, sans-IO, in segments.py.
"""

from __future__ import annotations

import errno
import mmap
import os

from . import segments


class SegmentWriter:
    """The file side of writing, run in a worker thread, one job at a time.

    O_DIRECT where the filesystem takes it (tmpfs does not): values go from their slots to the device with no
    copy into the page cache. Header blocks, and values too small for a page-aligned slot, are copied into
    an aligned staging buffer first."""

    def __init__(self, directory: str, segment_bytes: int, next_id: int):
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.next_id = next_id
        self.fd: int | None = None
        self.seg_id = -1
        self.offset = 0
        self.direct = hasattr(os, "O_DIRECT")
        self._staging = mmap.mmap(-1, 1 << 20)
        self._records: list[segments.Record] = []  # of the open segment, for its hint file

    def path(self, seg_id: int) -> str:
        return os.path.join(self.directory, f"seg-{seg_id:012d}.mbs")

    def _open_fd(self, path: str, create: bool) -> int:
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        return os.open(path, flags, 0o644)

    def roll(self) -> None:
        try:
            self.close()
        except OSError:
            pass  # the old segment's last sync failed (a failing disk): its records are checked on read anyway
        seg_id = self.next_id
        fd = self._open_fd(self.path(seg_id), create=True)
        self.next_id += 1
        self.fd, self.seg_id, self.offset = fd, seg_id, 0

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            records, self._records = self._records, []
            hint = segments.encode_hint(self.offset, records)
            tmp = hint_path(self.path(self.seg_id)) + ".tmp"
            with open(tmp, "wb") as f:  # written whole, then renamed: a hint is never seen half-written
                f.write(hint)
                f.flush()
                os.fdatasync(f.fileno())
            os.replace(tmp, hint_path(self.path(self.seg_id)))

    def _stage(self, nbytes: int) -> memoryview:
        if len(self._staging) < nbytes:
            self._staging = mmap.mmap(-1, segments.align(nbytes))
        return memoryview(self._staging)

    def write(self, unlink: list[str], records: list, roll_first: bool, crcs: list[int]):
        """Delete reclaimed segments, then append records (kind, ns, key, value, padded slot view or None)
        with their body checksums (computed beforehand, see `checksums`); returns (segment, value offset,
        crc, record bytes) per record."""
        if roll_first or self.fd is None:
            self.roll()  # first: closing a segment writes its hint, which the unlinks below may remove
        for path in unlink:
            for p in (hint_path(path), path):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        align = segments.align
        stage_need = sum(
            segments.header_block_bytes(len(ns), len(key)) + (align(len(v)) if v is not None and padded is None else 0)
            for _, ns, key, v, padded in records
        )
        stage = self._stage(stage_need)
        used = 0
        out = []
        parts: list = []
        start = self.offset
        pending = 0
        for (kind, ns, key, value, padded), crc in zip(records, crcs):
            size = 0 if value is None else len(value)
            total = segments.record_bytes(ns, key, size)
            if self.offset > 0 and self.offset + pending + total > self.segment_bytes:
                self._writev(parts, pending)
                parts, pending = [], 0
                self.roll()
                start = 0
            block = segments.header_block(kind, ns, key, size, crc)
            stage[used : used + len(block)] = block
            parts.append(stage[used : used + len(block)])
            used += len(block)
            if size:
                if padded is None:  # not page-aligned in the arena: through the staging buffer
                    n = align(size)
                    stage[used : used + size] = value
                    stage[used + size : used + n] = bytes(n - size)
                    parts.append(stage[used : used + n])
                    used += n
                else:
                    parts.append(padded)  # the slot itself, its last page included
            out.append((self.seg_id, start + pending + len(block), crc, total + segments.hint_record_bytes(ns, key)))
            self._records.append(segments.Record(start + pending, kind, ns.decode(), key.decode(), size, crc))
            pending += total
        self._writev(parts, pending)
        return out

    def _writev(self, parts: list, total: int) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            try:
                n = os.writev(self.fd, views[:1024])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # This filesystem refuses O_DIRECT after all: go on buffered (same file, same format).
                self.direct = False
                fd, self.fd = self.fd, self._open_fd(self.path(self.seg_id), create=False)
                os.close(fd)
                continue
            if n == 0:
                raise OSError(errno.ENOSPC, "no progress writing a segment (disk full?)")
            # A short write is rare, but a filling disk produces them: go on from where it stopped.
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        self.offset += total


def checksums(records: list) -> list[int]:
    """Worker thread: the body checksums of a write job, computed while the previous job is being written."""
    return [segments.body_crc(ns, key, b"" if value is None else value) for _, ns, key, value, _ in records]


def read_into(path: str, offset: int, view: memoryview, size: int, direct: bool, crc: int, ns: bytes, key: bytes) -> bool:
    """Worker thread: read one value into its slot and check it. False: unreadable or corrupt.

    `direct`: `view` is the slot padded to whole pages, so the read can be O_DIRECT, from the device
    straight into the slot."""
    fd = -1
    try:
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return False
        if fd < 0:
            fd = os.open(path, os.O_RDONLY)
            view = view[:size]
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                return False
            os.close(fd)  # O_DIRECT refused at read time: read through the page cache instead
            fd = os.open(path, os.O_RDONLY)
            view = view[:size]
            got = os.preadv(fd, [view], offset)
    except OSError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)
    return got >= size and segments.body_crc(ns, key, view[:size]) == crc


def read_run(path: str, start: int, parts: list[memoryview], checks: list[tuple]) -> list[bool]:
    """Worker thread: read neighbouring records with one O_DIRECT preadv (values into their slots, the header
    blocks between them into scratch) and check each value; `checks` is (part index, size, crc, ns, key).
    Records of one prompt are written together, so a get of its blocks is one sequential read."""
    total = sum(len(p) for p in parts)
    fd = -1
    got = -1
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        got = os.preadv(fd, parts, start)
    except OSError:
        got = -1
    finally:
        if fd >= 0:
            os.close(fd)
    if got != total:  # short, refused or failed: each value on its own (which falls back to buffered reads)
        out, off = [], start
        offsets = []
        for p in parts:
            offsets.append(off)
            off += len(p)
        for i, size, crc, ns, key in checks:
            out.append(read_into(path, offsets[i], parts[i], size, True, crc, ns, key))
        return out
    return [segments.body_crc(ns, key, parts[i][:size]) == crc for i, size, crc, ns, key in checks]


def padded(slot_view: memoryview, size: int) -> memoryview | None:
    """The slot's first `size` bytes padded to whole pages, if the slot is page-aligned and big enough
    (classes of 4 KiB and up are page multiples in page-aligned slabs), else None."""
    n = segments.align(size)
    if size and len(slot_view) >= n and len(slot_view) % segments.ALIGN == 0:
        return slot_view[:n]
    return None


def hint_path(segment_path: str) -> str:
    return segment_path[: -len(".mbs")] + ".hint"


def scan_file(path: str) -> tuple[segments.Scan, int]:
    """A segment's records: from its hint file if it has a valid one, else by scanning its headers."""
    size = os.path.getsize(path)
    if size == 0:
        return segments.Scan(), 0
    try:
        with open(hint_path(path), "rb") as f:
            listed = segments.decode_hint(f.read(), size)
        if listed is not None:
            return segments.Scan(records=listed, end=size), size
    except OSError:
        pass
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return segments.scan(m), size

"""The disk tier: values written behind to append-only segment files, read back (promoted) on a get.

Every stored value is queued for writing as soon as it is put (write-behind), so by the time RAM evicts it
it is usually on disk already and eviction costs nothing; one evicted before its write keeps its slot
until the write ends (the store's `spill_pending`), and puts wait a bounded time for that room. Segments
are reclaimed whole, oldest first, to stay within `--disk-capacity`.

Threads: file I/O and checksums run in worker threads (`anyio.to_thread`, the file side is diskio.py), so the
event loop never waits on the disk: one write job is written while the next is checksummed, and reads of
disk-resident values run a few at a time. Slots being written or read are pinned or held, so their bytes
cannot change under a thread. All bookkeeping (index, queues, counters) lives on the event loop.

Failure: any error writing (disk full, unwritable, I/O error) degrades the server to RAM-only with one
logged warning: queued writes are dropped, values already on disk stay readable, nothing reaches a client.
A read that fails or does not match its checksum is a miss, and the key is forgotten.

Restart: opening reads each closed segment's hint file, or scans the headers (not the values) of a segment
without one, and serves what they hold; a torn tail or corrupt header is skipped, and a value whose checksum
fails on read is a miss.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import anyio

from . import diskio, segments
from .store import Entry, Store

log = logging.getLogger("membrain.server.disk")

_SEGMENT_NAME = re.compile(r"^seg-(\d{12})\.mbs$")
_BATCH_BYTES = 16 << 20  # one write job: large enough for sequential speed, small enough to keep the queue moving
_BATCH_RECORDS = 256
RETRY_SECONDS = 30.0  # a degraded disk tier probes the directory again this often
READ_THREADS = 4  # concurrent reads of disk-resident values (queue depth for the device)
SPILL_WAIT = 1.0  # seconds a put waits for evicted values to reach disk before dropping them (RAM-only for those)


def segment_bytes_for(capacity: int) -> int:
    """Segment size: an eighth of the disk tier (reclaiming one loses at most 1/8 of it), 1-256 MiB."""
    return max(1 << 20, min(256 << 20, capacity // 8))


@dataclass
class Loc:
    seg: int
    offset: int  # of the value in the segment
    size: int
    crc: int


@dataclass
class Segment:
    id: int
    path: str
    bytes: int = 0
    keys: list = field(default_factory=list)  # (ns, key) of records written here (some since superseded)


@dataclass
class DiskStats:
    hits: int = 0
    misses_corrupt: int = 0  # records that failed their checksum (or could not be read) on a get
    writes: int = 0
    write_bytes: int = 0
    evictions: int = 0  # values lost with a reclaimed segment
    segments_reclaimed: int = 0
    spill_dropped: int = 0  # values evicted from RAM that never reached disk (slow or failed disk)
    too_big: int = 0
    recovered_keys: int = 0
    recovered_bytes: int = 0
    recovered_corrupt_headers: int = 0
    recovered_torn_segments: int = 0
    reopen_seconds: float = 0.0
    read_bytes: int = 0
    prefetched: int = 0  # values read back into RAM after a lookup found them on disk only
    write_seconds: float = 0.0  # in write jobs (worker thread): write_bytes / write_seconds is the disk's pace
    read_seconds: float = 0.0


class _Tombstone:
    __slots__ = ("ns", "key")

    def __init__(self, ns: str, key: str):
        self.ns = ns
        self.key = key


_RUN_BYTES = 4 << 20  # per coalesced read: several such reads in flight beat one long read on this disk (virtio)


class DiskTier:
    def __init__(self, directory: str, capacity: int, store: Store):
        self.directory = directory
        self.capacity = capacity
        self.store = store
        self.segment_bytes = segment_bytes_for(capacity)
        self.index: dict[tuple[str, str], Loc] = {}
        self.segments: OrderedDict[int, Segment] = OrderedDict()
        self.used = 0
        self.stats = DiskStats()
        self.observe_io: Callable[[str, float], None] = lambda kind, seconds: None  # "read"/"write" job times
        self.state = "ok"
        self.reason = ""
        self._queue: deque = deque()  # values as they are put, and tombstones
        self._urgent: deque = deque()  # values evicted before their write: their slots are awaited
        self._in_flight: list = []
        self._wake = anyio.Event()
        self._progress = anyio.Event()
        self._roll_next = False
        self._spilled: dict[tuple[str, str], Entry] = {}  # evicted, waiting for their write
        self._batch_limit = max(1, min(_BATCH_BYTES, capacity // 4))
        self._writer: diskio.SegmentWriter | None = None
        self._read_limiter: anyio.CapacityLimiter | None = None  # made on the loop, at the first read
        self._promoting: dict[tuple[str, str], anyio.Event] = {}  # reads in flight, so a key is read once
        self._prefetch: deque = deque()
        self._prefetch_bytes = 0
        self._prefetch_wake = anyio.Event()
        self._open()

    # --- opening and recovery ----------------------------------------------------------------------

    def _open(self) -> None:
        t0 = time.perf_counter()
        try:
            os.makedirs(self.directory, exist_ok=True)
            names = sorted(n for n in os.listdir(self.directory) if _SEGMENT_NAME.match(n))
        except OSError as exc:
            self._degrade(f"cannot open {self.directory}: {exc}", at_open=True)
            return
        present = set(names)
        for name in os.listdir(self.directory):  # hints of reclaimed segments, a hint cut short while written
            if name.endswith(".tmp") or (name.endswith(".hint") and name[: -len(".hint")] + ".mbs" not in present):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass
        next_id = 0
        for name in names:
            seg_id = int(_SEGMENT_NAME.match(name).group(1))  # type: ignore[union-attr]
            path = os.path.join(self.directory, name)
            next_id = max(next_id, seg_id + 1)
            try:
                found, size = diskio.scan_file(path)
            except (OSError, ValueError) as exc:
                log.warning("disk tier: skipping unreadable segment %s: %s", path, exc)
                continue
            try:
                size += os.path.getsize(diskio.hint_path(path))  # the hint counts against the capacity too
            except OSError:
                pass
            seg = Segment(seg_id, path, size)
            self.segments[seg_id] = seg
            self.used += size
            self.stats.recovered_corrupt_headers += found.corrupt
            self.stats.recovered_torn_segments += int(found.torn)
            for rec in found.records:
                k = (rec.ns, rec.key)
                if rec.kind == segments.TOMBSTONE:
                    self.index.pop(k, None)
                else:
                    self.index[k] = Loc(seg_id, rec.value_offset, rec.size, rec.crc)
                    seg.keys.append(k)
        self.stats.recovered_keys = len(self.index)
        self.stats.recovered_bytes = sum(loc.size for loc in self.index.values())
        self.stats.reopen_seconds = time.perf_counter() - t0
        # New records always go to a new segment: a torn tail of the last one is never appended to.
        self._writer = diskio.SegmentWriter(self.directory, self.segment_bytes, next_id)
        if self.index or self.segments:
            log.info("disk tier: reopened %d values (%d bytes) in %d segments in %.2f s (%d corrupt headers, %d torn)",
                     self.stats.recovered_keys, self.stats.recovered_bytes, len(self.segments),
                     self.stats.reopen_seconds, self.stats.recovered_corrupt_headers, self.stats.recovered_torn_segments)
        probe = os.path.join(self.directory, ".membrain-write-probe")
        try:  # find out now, not at the first eviction, whether this directory takes writes
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.unlink(probe)
        except OSError as exc:
            self._degrade(f"cannot write to {self.directory}: {exc}", at_open=True)

    # --- state -------------------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self.state == "ok"

    def _degrade(self, reason: str, at_open: bool = False) -> None:
        if self.state != "ok":
            return
        self.state, self.reason = "degraded", reason
        if not at_open:  # at open, the server either refuses to start or starts degraded, and says which
            log.warning("disk tier: %s; serving from RAM only (values already on disk stay readable)", reason)
        for q in (self._urgent, self._queue):
            while q:
                item = q.popleft()
                if isinstance(item, Entry):
                    self._unqueue(item)
        self._progress.set()

    def _unqueue(self, entry: Entry) -> None:
        entry.queued = False
        if entry.spilled:
            self.stats.spill_dropped += 1
            self._release_spill(entry)

    def _release_spill(self, entry: Entry) -> None:
        if self._spilled.get((entry.ns, entry.key)) is entry:
            del self._spilled[(entry.ns, entry.key)]
        self.store.finish_spill(entry)

    # --- what the service calls --------------------------------------------------------------------

    def contains(self, ns: str, key: str) -> bool:
        """On disk, or evicted from RAM with its write queued first (its bytes are held until it is on disk):
        either way stored. Without the second, a key was in neither tier while RAM made room for a
        promotion, and `exists` said it was gone (a flaky test_disk_tier working-set test)."""
        return (ns, key) in self.index or (ns, key) in self._spilled

    def spilled(self, ns: str, key: str) -> Entry | None:
        """An evicted value whose disk write has not ended: its bytes are still in its RAM slot, and a get
        is served from there (pinned, the slot outlives the write) rather than missing until the write ends."""
        entry = self._spilled.get((ns, key))
        return entry if entry is not None and entry.spilled else None

    def size(self, ns: str, key: str) -> int | None:
        loc = self.index.get((ns, key))
        return None if loc is None else loc.size

    def keys(self, ns: str) -> list[str]:
        return [k for (n, k) in self.index if n == ns]

    def queue(self, entry: Entry) -> None:
        """Write a newly stored value behind."""
        if not self.writable or entry.on_disk:
            return
        if self._too_big(entry):
            self.stats.too_big += 1  # larger than the whole tier: stays RAM-only
            return
        entry.queued = True
        self._queue.append(entry)
        self._wake.set()

    def spill(self, entry: Entry) -> bool:
        """The store evicts `entry`: True if its slot must wait for its disk write (we release it then)."""
        if entry.on_disk:
            return False
        if not self.writable or (not entry.queued and self._too_big(entry)):
            self.stats.spill_dropped += 1  # evicted with no disk copy: RAM-only for this one
            return False
        # Written before anything else queued: a put may be waiting for this slot. (A value whose disk copy
        # was reclaimed while it sat in RAM is written again here, once, on its way out.)
        entry.queued = True
        self._urgent.append(entry)
        self._spilled[(entry.ns, entry.key)] = entry
        self._wake.set()
        return True

    def _too_big(self, entry: Entry) -> bool:
        return segments.record_bytes(entry.ns.encode(), entry.key.encode(), entry.size) > self.capacity

    def delete(self, ns: str, key: str) -> None:
        was_on_disk = self.index.pop((ns, key), None) is not None
        spilled = self._spilled.get((ns, key))
        if spilled is not None:
            # Evicted and not yet written: it must not be written (and indexed) after this delete.
            spilled.queued = False
            if not any(e is spilled for e in self._in_flight):
                self._release_spill(spilled)
        pending = any(isinstance(e, Entry) and e.ns == ns and e.key == key for e in self._in_flight)
        if (was_on_disk or pending) and self.writable:
            # A tombstone keeps a restart from bringing the value back.
            self._queue.append(_Tombstone(ns, key))
            self._wake.set()

    async def alloc(self, size: int, deadline: float | None = None, ns: str | None = None, pending: int = 0):
        """A slot for an incoming value. If RAM is full of evicted values still being written, wait for the
        writer (without blocking the loop) until `deadline` (one per request: SPILL_WAIT from its first
        value); past that, drop them: RAM-only for those. Puts thus go at the disk's pace, not past it."""
        slot = self.store.alloc(size, ns, pending)
        if slot is not None or not self.store.spill_pending:
            return slot
        if deadline is None:
            deadline = anyio.current_time() + SPILL_WAIT
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            while slot is None and self.store.spill_pending and self.writable:
                if self._progress.is_set():
                    self._progress = anyio.Event()
                await self._progress.wait()
                slot = self.store.alloc(size, ns, pending)
        if slot is None:
            self._drop_spills()
            slot = self.store.alloc(size, ns, pending)
        return slot

    def _drop_spills(self) -> None:
        """Too slow a disk: give up on the evicted values still queued (not those being written)."""
        in_flight = {id(e) for e in self._in_flight}
        for entry in list(self._spilled.values()):
            if id(entry) not in in_flight:
                self._unqueue(entry)

    async def promote(self, ns: str, key: str, count: bool = True) -> Entry | None:
        """Read a disk-resident value back into RAM, pinned for the caller; None is a miss.
        `count=False` (a prefetch): no hit is counted, the get that follows counts its own."""
        k = (ns, key)
        busy = self._promoting.get(k)
        if busy is not None:  # already being read (a prefetch, another get): wait for that read
            await busy.wait()
            current = self.store.peek(ns, key)
            if current is not None:
                if count:
                    self.store.entry(ns, key)
                self.store.pin(current)
                return current
        done = self._promoting[k] = anyio.Event()
        try:
            return await self._promote(ns, key, count)
        finally:
            if self._promoting.get(k) is done:
                del self._promoting[k]
            done.set()

    async def promote_many(self, ns: str, keys: list[str], count: bool = True) -> list[Entry | None]:
        """promote() for many keys at once: neighbouring records of a segment are read with one preadv each,
        runs in parallel (up to READ_THREADS). Entries come back pinned; None is a miss."""
        out: list[Entry | None] = [None] * len(keys)
        solo: list[int] = []
        plan: list[list] = []  # [index, loc, seg, slot, padded view, event, done]
        try:
            for i, key in enumerate(keys):
                k = (ns, key)
                loc = self.index.get(k)
                seg = None if loc is None else self.segments.get(loc.seg)
                if k in self._promoting or seg is None:
                    solo.append(i)  # being read already (wait for it), or gone
                    continue
                event = self._promoting[k] = anyio.Event()
                item = [i, loc, seg, None, None, event, False]
                plan.append(item)
                slot = await self.alloc(loc.size)
                padded = None if slot is None else diskio.padded(slot.view, loc.size)
                if padded is None:
                    if slot is not None:
                        self.store.release(slot)
                        solo.append(i)  # a small value: read on its own, through the page cache
                    self._end_promotion(k, event)
                    item[6] = True
                    continue
                item[3], item[4] = slot, padded
            runs = self._runs([it for it in plan if not it[6]])
            async with anyio.create_task_group() as tg:
                for run in runs:
                    tg.start_soon(self._read_one_run, ns, keys, run, out, count)
                for i in solo:
                    tg.start_soon(self._promote_into, ns, keys, i, out, count)
        except BaseException:
            for it in plan:
                if not it[6]:
                    if it[3] is not None:
                        self.store.release(it[3])
                    self._end_promotion((ns, keys[it[0]]), it[5])
            for e in out:
                if e is not None:
                    self.store.unpin(e)
            raise
        return out

    def _runs(self, items: list[list]) -> list[list[list]]:
        """Group planned reads into runs of records that follow each other in one segment."""
        items = sorted(items, key=lambda it: (it[1].seg, it[1].offset))
        runs: list[list[list]] = []
        for it in items:
            loc = it[1]
            if runs:
                prev = runs[-1][-1][1]
                run_bytes = sum(len(x[4]) for x in runs[-1])
                if (prev.seg == loc.seg and loc.offset > prev.offset and run_bytes + len(it[4]) <= _RUN_BYTES
                        and loc.offset - (prev.offset + segments.align(prev.size)) <= segments.ALIGN * 4):
                    runs[-1].append(it)
                    continue
            runs.append([it])
        return runs

    async def _read_one_run(self, ns: str, keys: list[str], run: list[list], out: list, count: bool) -> None:
        parts: list[memoryview] = []
        checks: list[tuple] = []
        end = None
        for it in run:
            loc = it[1]
            if end is not None and loc.offset > end:
                parts.append(memoryview(mmap.mmap(-1, loc.offset - end)))  # the header block between two values
            checks.append((len(parts), loc.size, loc.crc, ns.encode(), keys[it[0]].encode()))
            parts.append(it[4])
            end = loc.offset + len(it[4])
        if self._read_limiter is None:
            self._read_limiter = anyio.CapacityLimiter(READ_THREADS)
        t0 = time.perf_counter()
        try:
            oks = await anyio.to_thread.run_sync(diskio.read_run, run[0][2].path, run[0][1].offset, parts, checks,
                                                 limiter=self._read_limiter)
        except BaseException:
            for it in run:  # cancelled: nothing was learnt about these records, so the index stays as it is
                it[6] = True
                self.store.release(it[3])
                self._end_promotion((ns, keys[it[0]]), it[5])
            raise
        finally:
            took = time.perf_counter() - t0
            self.stats.read_seconds += took
            self.observe_io("read", took)
        for it, ok in zip(run, oks):
            key = keys[it[0]]
            it[6] = True
            out[it[0]] = self._finish_read(ns, key, it[1], it[3], ok, count)
            self._end_promotion((ns, key), it[5])

    async def _promote_into(self, ns: str, keys: list[str], i: int, out: list, count: bool) -> None:
        out[i] = await self.promote(ns, keys[i], count)

    def _end_promotion(self, k: tuple[str, str], event) -> None:
        if self._promoting.get(k) is event:
            del self._promoting[k]
        event.set()

    def prefetch(self, ns: str, keys: list[str]) -> None:
        """A lookup found these only on disk: read them back now, so the get that usually follows finds them
        in RAM. Bounded to a quarter of RAM waiting (more would evict what was just read); the rest are read
        by their gets."""
        for key in keys:
            loc = self.index.get((ns, key))
            if loc is None:
                continue
            if self._prefetch_bytes + loc.size > self.store.capacity // 4:
                break
            self._prefetch.append((ns, key, loc.size))
            self._prefetch_bytes += loc.size
        if self._prefetch:
            self._prefetch_wake.set()

    async def _prefetcher(self) -> None:
        while True:
            if not self._prefetch:
                self._prefetch_wake = anyio.Event()
                await self._prefetch_wake.wait()
                continue
            # Up to 16 keys of one namespace at a time: neighbours on disk are read together.
            ns = self._prefetch[0][0]
            batch: list[str] = []
            while self._prefetch and self._prefetch[0][0] == ns and len(batch) < 16:
                _, key, size = self._prefetch.popleft()
                self._prefetch_bytes -= size
                if not self.store.contains(ns, key) and (ns, key) in self.index and (ns, key) not in self._promoting:
                    batch.append(key)
            if not batch:
                continue
            for entry in await self.promote_many(ns, batch, count=False):
                if entry is not None:
                    self.stats.prefetched += 1
                    self.store.unpin(entry)

    async def _promote(self, ns: str, key: str, count: bool) -> Entry | None:
        k = (ns, key)
        loc = self.index.get(k)
        seg = None if loc is None else self.segments.get(loc.seg)
        if seg is None:
            return None
        slot = await self.alloc(loc.size)
        if slot is None:
            return None
        t0 = time.perf_counter()
        padded = diskio.padded(slot.view, loc.size)
        view = slot.view[: loc.size] if padded is None else padded
        try:
            if self._read_limiter is None:
                self._read_limiter = anyio.CapacityLimiter(READ_THREADS)
            ok = await anyio.to_thread.run_sync(
                diskio.read_into, seg.path, loc.offset, view, loc.size, padded is not None, loc.crc, ns.encode(), key.encode(),
                limiter=self._read_limiter,
            )
            took = time.perf_counter() - t0
            self.stats.read_seconds += took
            self.observe_io("read", took)
        except BaseException:
            self.store.release(slot)
            raise
        return self._finish_read(ns, key, loc, slot, ok, count)

    def _finish_read(self, ns: str, key: str, loc: Loc, slot, ok: bool, count: bool) -> Entry | None:
        k = (ns, key)
        current = self.store.peek(ns, key)
        if current is not None or self.index.get(k) is not loc:
            # Stored again, deleted or reclaimed while we read: the index says what is true now.
            self.store.release(slot)
            if current is not None:
                if count:
                    self.store.entry(ns, key)
                self.store.pin(current)
            return current
        if not ok:
            self.store.release(slot)
            self.stats.misses_corrupt += 1
            del self.index[k]
            log.warning("disk tier: %s/%s in segment %d failed its read or checksum: served as a miss", ns, key, loc.seg)
            return None
        entry, _ = self.store.commit(ns, key, slot, loc.size, on_disk=True, promoted=True)
        self.stats.read_bytes += loc.size
        if count:
            self.stats.hits += 1
            self.store.count_hit(entry)
        self.store.pin(entry)
        return entry

    # --- the writer --------------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer and the prefetchers: run until cancelled (the server's task group owns them)."""
        async with anyio.create_task_group() as tg:
            for _ in range(READ_THREADS):
                tg.start_soon(self._prefetcher)
            await self._write_loop()

    async def _write_loop(self) -> None:
        while True:
            if not self.writable:
                # A full or failing disk may come back (space freed, disk replaced): try again now and then.
                await anyio.sleep(RETRY_SECONDS)
                await self._retry()
                continue
            if not self._queue and not self._urgent:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            # Two jobs in flight: one being written while the next is checksummed (both in worker threads).
            job = await self._prepare(self._take_batch())
            while job is not None:
                nxt: list = []

                async def prepare_next() -> None:
                    nxt.append(await self._prepare(self._take_batch()))

                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(prepare_next)
                        await self._commit(job)
                except BaseException:
                    for pending in nxt:
                        if pending is not None:
                            self._requeue(pending)
                    raise
                job = nxt[0] if nxt else None
                if job is not None and not self.writable:
                    self._settle(job, None)
                    job = None

    async def _retry(self) -> None:
        def probe() -> None:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, ".membrain-write-probe")
            with open(path, "wb") as f:
                f.write(b"ok")
            os.unlink(path)

        try:
            await anyio.to_thread.run_sync(probe)
        except OSError:
            return
        log.warning("disk tier: %s takes writes again; the disk tier is back (new values are written behind)", self.directory)
        self.state, self.reason = "ok", ""
        self._roll_next = True  # a fresh segment: the last one may have been cut short by the failure

    def _take_batch(self) -> list:
        """The next write job: evicted values first, then the rest in put order, up to a batch's bytes."""
        batch, nbytes = [], 0
        for q in (self._urgent, self._queue):
            while q and len(batch) < _BATCH_RECORDS:
                item = q[0]
                if isinstance(item, Entry):
                    if not (item.live or item.spilled) or not item.queued:
                        q.popleft()  # replaced, deleted or written already: nothing to write
                        continue
                    size = segments.record_bytes(item.ns.encode(), item.key.encode(), item.size)
                else:
                    size = segments.record_bytes(item.ns.encode(), item.key.encode(), 0)
                if batch and nbytes + size > self._batch_limit:
                    return batch
                q.popleft()
                batch.append(item)
                nbytes += size
        return batch

    def _make_room(self, nbytes: int) -> list[str]:
        """Reclaim oldest segments until `nbytes` more fit in the capacity; the paths to delete."""
        unlink = []
        current = self._writer.seg_id if self._writer else -1
        while self.used + nbytes > self.capacity and self.segments:
            oldest_id, oldest = next(iter(self.segments.items()))
            if oldest_id == current:
                self._roll_next = True  # the current segment goes too: new records start a new one
            del self.segments[oldest_id]
            self.used -= oldest.bytes
            self.stats.segments_reclaimed += 1
            unlink.append(oldest.path)
            for k in oldest.keys:
                loc = self.index.get(k)
                if loc is not None and loc.seg == oldest_id:
                    del self.index[k]
                    resident = self.store.peek(*k)
                    if resident is not None and resident.on_disk:
                        resident.on_disk = False  # still in RAM: written again if RAM evicts it
                    else:
                        self.stats.evictions += 1
        return unlink

    async def _write_batch(self) -> None:
        """One write job, start to end (the shutdown flush)."""
        job = await self._prepare(self._take_batch())
        if job is not None:
            await self._commit(job)

    async def _prepare(self, batch: list) -> list | None:
        """Pin a batch's values and checksum them in a worker thread: [batch, records, nbytes, crcs]."""
        if not batch:
            return None
        records = []
        nbytes = 0
        for item in batch:
            ns, key = item.ns.encode(), item.key.encode()
            if isinstance(item, Entry):
                self.store.arena.pin(item.slot)  # its bytes cannot change while threads read them
                records.append((segments.VALUE, ns, key, item.view, diskio.padded(item.slot.view, item.size)))
                nbytes += segments.record_bytes(ns, key, item.size) + segments.hint_record_bytes(ns, key)
            else:
                records.append((segments.TOMBSTONE, ns, key, None, None))
                nbytes += segments.record_bytes(ns, key, 0) + segments.hint_record_bytes(ns, key)
        job = [batch, records, nbytes, None]
        self._in_flight.extend(batch)
        try:
            job[3] = await anyio.to_thread.run_sync(diskio.checksums, records)
        except BaseException:
            self._requeue(job)
            raise
        return job

    def _requeue(self, job: list) -> None:
        """A job that was never written (shutdown came first) goes back to the front of its queue, so the
        shutdown flush writes it; tombstones especially must not be lost."""
        batch = job[0]
        done = {id(item) for item in batch}
        self._in_flight = [item for item in self._in_flight if id(item) not in done]
        for item in reversed(batch):
            if isinstance(item, Entry):
                self.store.arena.unpin(item.slot)
                (self._urgent if item.spilled else self._queue).appendleft(item)
            else:
                self._queue.appendleft(item)

    async def _commit(self, job: list) -> None:
        """Append a prepared job to the current segment (reclaiming old ones first), then index it."""
        # Shielded: a job once started is written whole (at most one batch), even at shutdown. Cancelled
        # between reclaiming segments and writing, it would otherwise drop its records, tombstones included.
        with anyio.CancelScope(shield=True):
            await self._commit_shielded(job)

    async def _commit_shielded(self, job: list) -> None:
        batch, records, nbytes, crcs = job
        written = None
        try:
            if self.writable:
                unlink = self._make_room(nbytes)
                roll, self._roll_next = self._roll_next, False
                t0 = time.perf_counter()
                try:
                    written = await anyio.to_thread.run_sync(self._writer.write, unlink, records, roll, crcs)
                    took = time.perf_counter() - t0
                    self.stats.write_seconds += took
                    self.observe_io("write", took)
                except OSError as exc:
                    self._degrade(f"writing to {self.directory} failed: {exc}")
        finally:
            self._settle(job, written)

    def _settle(self, job: list, written: list | None) -> None:
        batch = job[0]
        done = {id(item) for item in batch}
        self._in_flight = [item for item in self._in_flight if id(item) not in done]
        for item, res in zip(batch, written or [None] * len(batch)):
            if res is not None:
                self._account(res)
            if isinstance(item, Entry):
                self.store.arena.unpin(item.slot)
                self._finish(item, res)
        self._progress.set()

    def _account(self, res) -> None:
        seg_id, _, _, total = res
        seg = self.segments.get(seg_id)
        if seg is None:
            seg = self.segments[seg_id] = Segment(seg_id, self._writer.path(seg_id))
        seg.bytes += total
        self.used += total
        self.stats.writes += 1
        self.stats.write_bytes += total

    def _finish(self, entry: Entry, res) -> None:
        entry_queued, entry.queued = entry.queued, False
        if res is not None and entry_queued and (entry.live or entry.spilled):
            seg_id, offset, crc, _ = res
            k = (entry.ns, entry.key)
            self.index[k] = Loc(seg_id, offset, entry.size, crc)
            self.segments[seg_id].keys.append(k)
            entry.on_disk = True
        elif entry.spilled:
            self.stats.spill_dropped += 1
        if entry.spilled:
            self._release_spill(entry)

    async def flush(self) -> int:
        """Write what RAM holds and the disk does not (SIGTERM); the caller bounds the time. Values written."""
        if not self.writable:
            return 0
        for entry in self.store.entries_lru():
            if not entry.on_disk and not entry.queued:
                self.queue(entry)
        before = self.stats.writes
        while (self._queue or self._urgent) and self.writable:
            await self._write_batch()
        return self.stats.writes - before

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                await anyio.to_thread.run_sync(writer.close)
            except OSError as exc:
                log.warning("disk tier: closing the last segment failed: %s", exc)

    def stats_dict(self) -> dict:
        s = self.stats
        return {
            "state": self.state,
            "reason": self.reason,
            "path": self.directory,
            "capacity": self.capacity,
            "used": self.used,
            "keys": len(self.index),
            "segments": len(self.segments),
            "segment_bytes": self.segment_bytes,
            "queued": len(self._queue) + len(self._urgent),
            "spill_pending": self.store.spill_pending,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.__dict__.items()},
        }


"""The write-behind queue: saves are accepted at once and uploaded behind, in batches, by one task.

Policy: bounded in bytes (a save past the bound is refused before anything waits; the caller drops it
and the block is a future miss, never a stall); batches of at most `batch_keys` saves and about
`batch_bytes`; within a batch the last write of a key wins and it is uploaded once; at shutdown the
queue drains within the drain deadline, and what is left is released and counted as dropped.

`offer()` runs on callers' threads; everything else on the runtime thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import anyio

from ..runtime.ring import Completion
from .outcome import Outcome

log = logging.getLogger("membrain.runtime")

Buffer = bytes | bytearray | memoryview

# Prepare hooks (checksums) of a batch bigger than this run on a worker thread, so the loop keeps
# answering lookups meanwhile; small ones are cheaper to run in place.
PREPARE_OFF_LOOP_BYTES = 4 << 20


@dataclass(slots=True)
class PendingSave:
    key: str
    parts: Sequence[Buffer]
    nbytes: int
    tag: Any
    parent: Any  # the submitter's tracing context
    on_done: Callable[[], None] | None  # the caller's bytes are free again
    prepare: Callable[[], None] | None  # runs before the upload, off the caller's thread
    ring: Any = None  # CompletionRing: gets Completion("save", tag, key, outcome) when the save ended
    # ok | present (the server held it) | failed | unavailable | dropped (never sent: shutdown, a bad hook)
    outcome: Outcome | None = None


# upload(saves, nbytes): one batch, one save per key; must not raise for a failed upload (it counts it).
Upload = Callable[[list[PendingSave], int], Awaitable[None]]
# lost(saves): a batch that could not be prepared (a bug in a hook); never uploaded half-written.
Lost = Callable[[list[PendingSave]], None]


class WriteBehind:
    def __init__(self, capacity: int, batch_bytes: int, batch_keys: int = 256):
        self.capacity = capacity
        self.batch_bytes = batch_bytes
        self.batch_keys = batch_keys
        self._queue: deque[PendingSave] = deque()
        self._bytes = 0  # queued and uploading
        self._lock = threading.Lock()  # byte accounting across callers' threads
        self._uploading = 0
        self._closed = False
        self._wanted: anyio.Event | None = None  # set when there is work for the uploader
        self._idle: anyio.Event | None = None

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and self._uploading == 0

    def offer(self, save: PendingSave) -> bool:
        """Queue a save; False (nothing queued, on_done not called) when closed or past the byte bound."""
        if self._closed:
            return False
        with self._lock:
            if self._bytes + save.nbytes > self.capacity:
                return False
            self._bytes += save.nbytes
        self._queue.append(save)
        return True

    def close(self) -> None:
        """Refuse new saves (shutdown); what is queued still drains."""
        self._closed = True

    # ------------------------------------------------------------------ runtime thread

    def kick(self) -> None:
        if self._queue and self._wanted is not None:
            self._wanted.set()

    def next_batch(self) -> tuple[list[PendingSave], int]:
        batch: list[PendingSave] = []
        size = 0
        while self._queue and len(batch) < self.batch_keys and (size < self.batch_bytes or not batch):
            item = self._queue.popleft()
            batch.append(item)
            size += item.nbytes
        return batch, size

    async def run(self, upload: Upload, lost: Lost) -> None:
        """The uploader task (owned by the runtime's task group)."""
        self._wanted = anyio.Event()
        while True:
            if not self._queue:
                if self._idle is not None:
                    self._idle.set()
                await self._wanted.wait()
                self._wanted = anyio.Event()
                continue
            batch, size = self.next_batch()
            self._uploading += 1
            last = {item.key: item for item in batch}  # last write of a key wins
            unique = list(last.values())
            try:
                try:
                    await _prepare(batch, size)
                except Exception:
                    log.exception("membrain: preparing a save batch failed; it is not uploaded")
                    lost(unique)
                else:
                    await upload(unique, size)
            finally:
                self._uploading -= 1
                with self._lock:
                    self._bytes -= size
                for item in batch:  # an earlier write of a key shares the fate of the one sent
                    item.outcome = item.outcome or last[item.key].outcome or Outcome.DROPPED
                release(batch)

    async def drain(self) -> None:
        while not self.idle:
            self._idle = anyio.Event()
            if self._wanted is not None:
                self._wanted.set()
            await self._idle.wait()

    def abandon(self) -> int:
        """The thread is ending: release whatever is still queued; returns how many saves that was."""
        dropped = len(self._queue)
        for item in self._queue:
            item.outcome = Outcome.DROPPED
        release(self._queue)
        self._queue.clear()
        with self._lock:
            self._bytes = 0
        return dropped


def release(saves) -> None:
    """The saves' bytes are free again, and their outcomes go to their submitters' rings."""
    for item in saves:
        if item.ring is not None:
            item.ring.push(Completion("save", item.tag, item.key, item.outcome or Outcome.DROPPED))
        if item.on_done is not None:
            try:
                item.on_done()
            except Exception:
                log.exception("membrain save callback failed")


async def _prepare(batch: list[PendingSave], size: int) -> None:
    hooks = [item.prepare for item in batch if item.prepare is not None]
    if not hooks:
        return

    def run() -> None:
        for hook in hooks:
            hook()

    if size > PREPARE_OFF_LOOP_BYTES:
        await anyio.to_thread.run_sync(run)
    else:
        run()

"""Loads of the same keys at once fetch them once: the first load asks the server, the others take a copy.

Requests that share a prefix and arrive together each load it (vLLM has not cached it yet: nobody has
computed or loaded it). Without this, a fresh instance fetched 72 blocks for 26 distinct keys.

A key being received for one load is *on the wire*. A later load of it registers its own buffer with the
record and waits; when the first load's values are in, it copies each into the registered buffers (on the
loop thread, while its own buffer is certainly alive) before it ends. If the first load fails or is
cancelled, the waiters fetch the key themselves. A waiter that is cancelled takes its buffer back out of the
record first, so nothing is ever copied into a buffer after its owner stopped waiting for it.

Touched only on the runtime thread, so no locks.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

import anyio

from .. import scatter

GetInto = Callable[[list[str], list[scatter.Target]], Awaitable[list[int]]]


class _OnWire:
    __slots__ = ("done", "ok", "waiters")

    def __init__(self):
        self.done = anyio.Event()
        self.ok = False  # the owner's fetch answered (a value or a miss) for this key
        self.waiters: list[tuple[scatter.Target, list[int], int]] = []  # (buffer, their sizes, their index)


class SharedFetches:
    def __init__(self):
        self._on_wire: dict[str, _OnWire] = {}
        self.shared = 0  # keys a load took from another's fetch instead of the server

    def __len__(self) -> int:
        return len(self._on_wire)

    async def get_into(self, keys: Sequence[str], buffers: Sequence[scatter.Target], get_into: GetInto) -> list[int]:
        """Each key's value received into its buffer (its size; -1: a miss), asking the server only for keys
        no other load is receiving now. get_into's errors propagate."""
        sizes = [-1] * len(keys)
        mine: list[int] = []
        theirs: list[tuple[int, _OnWire]] = []
        for i, key in enumerate(keys):
            wire = self._on_wire.get(key)
            if wire is None:
                self._on_wire[key] = _OnWire()
                mine.append(i)
            else:
                entry = (buffers[i], sizes, i)
                wire.waiters.append(entry)
                theirs.append((i, wire))
        try:
            if mine:
                await self._fetch_mine(keys, buffers, mine, sizes, get_into)
            retry: list[int] = []
            for i, wire in theirs:
                await wire.done.wait()
                if not wire.ok:
                    retry.append(i)
                else:
                    self.shared += 1
            theirs = []
            if retry:
                got = await get_into([keys[i] for i in retry], [buffers[i] for i in retry])
                for i, size in zip(retry, got):
                    sizes[i] = size
        finally:
            for i, wire in theirs:  # still registered: we stop waiting, so no copy may land in our buffer
                if not wire.done.is_set():
                    wire.waiters = [w for w in wire.waiters if w[1] is not sizes]
        return sizes

    async def _fetch_mine(self, keys, buffers, mine: list[int], sizes: list[int], get_into: GetInto) -> None:
        wires = [self._on_wire[keys[i]] for i in mine]
        try:
            got = await get_into([keys[i] for i in mine], [buffers[i] for i in mine])
            for i, size, wire in zip(mine, got, wires):
                sizes[i] = size
                for buf, their_sizes, j in wire.waiters:
                    if size >= 0:
                        their_sizes[j] = scatter.write(buf, scatter.filled(buffers[i], size))
                    elif size == scatter.MISFIT:
                        their_sizes[j] = size  # stored but the wrong size: their check fails it too
                wire.ok = True
        finally:
            for i, wire in zip(mine, wires):
                if self._on_wire.get(keys[i]) is wire:
                    del self._on_wire[keys[i]]
                wire.waiters = []
                wire.done.set()

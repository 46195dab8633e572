"""Completion ring: the runtime thread appends completions, the caller drains them with poll().

A deque: append and popleft are atomic under the GIL, so neither side takes a lock or waits. Nothing is
dropped; `high_water` tells how far behind a caller has fallen. `wait` is for a caller with nothing else
to do (an idle vLLM step): it rests until something lands instead of spinning.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Completion:
    kind: str  # "lookup" | "fetch" | "prefetch" | "save" | ...
    tag: Any  # the caller's tag, usually a request id
    value: Any  # the result, or the exception for outcome "error"
    outcome: str  # how it ended; for the block store's jobs a cache.outcome.Outcome (ok, unavailable, timeout, ...)
    latency_s: float = 0.0


class CompletionRing:
    def __init__(self) -> None:
        self._items: deque[Completion] = deque()
        self._landed = threading.Event()
        self.high_water = 0

    def push(self, item: Completion) -> None:
        self._items.append(item)
        self._landed.set()  # after the append: a waiter that wakes always finds the item
        n = len(self._items)
        if n > self.high_water:
            self.high_water = n

    def poll(self, max_items: int | None = None) -> list[Completion]:
        """Everything completed since the last poll (non-blocking)."""
        out = []
        items = self._items
        while items and (max_items is None or len(out) < max_items):
            try:
                out.append(items.popleft())
            except IndexError:
                break
        return out

    def wait(self, timeout: float) -> bool:
        """Until something is in the ring, at most `timeout` seconds. True if something is."""
        if self._items:
            return True
        self._landed.clear()
        if self._items:  # pushed between the check and the clear
            return True
        return self._landed.wait(timeout)

    def __len__(self) -> int:
        return len(self._items)

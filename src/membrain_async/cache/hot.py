"""The hot tier: recently loaded or saved pages kept in process, checked before staging and the network.

Touched only on the runtime thread. Values are copied in (each owns its bytes), so the byte bound is exact.
"""

from __future__ import annotations

from collections import OrderedDict

from ..scatter import Scatter


class HotTier:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._values: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get(self, key: str) -> memoryview | None:
        value = self._values.get(key)
        if value is None:
            self.misses += 1
            return None
        self._values.move_to_end(key)
        self.hits += 1
        return memoryview(value)

    def put(self, key: str, value) -> None:
        size = len(value) if isinstance(value, Scatter) else memoryview(value).nbytes
        if size > self.capacity:
            return
        old = self._values.pop(key, None)
        if old is not None:
            self.used -= len(old)
        while self.used + size > self.capacity and self._values:
            _, victim = self._values.popitem(last=False)
            self.used -= len(victim)
        self._values[key] = value.tobytes() if isinstance(value, Scatter) else bytes(value)
        self.used += size

    def discard(self, key: str) -> None:
        old = self._values.pop(key, None)
        if old is not None:
            self.used -= len(old)

    def leading(self, keys: list[str]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self._values:
            n += 1
        return n

    def fill(self, keys: list[str], out: list, missing: list[int]) -> list[int]:
        """Fill out[i] for the missing indices this tier holds; returns those still missing."""
        still = []
        for i in missing:
            value = self.get(keys[i])
            if value is None:
                still.append(i)
            else:
                out[i] = value
        return still

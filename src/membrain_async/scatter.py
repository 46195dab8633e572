"""Where a fetched value lands: one buffer, or a `Scatter` of pieces filled in order.

A load on a CPU KV cache receives each block straight into the cache: the 64-byte payload header goes to a
small buffer of its own, and the block's page of every layer to where that page lies (`kv[layer][block]`).
No staging buffer, and no copy after the receive (vllm/worker/movers.py). Everything that hands a value to
a load's buffer (the bulk transport's body reader, the byte-copying transports, the local tiers, a shared
fetch) goes through the functions here, so either kind of buffer works everywhere.

A plain buffer takes any value up to its size (the value is `buf[:n]`); a Scatter takes only a value of
exactly its size, since its pieces are a block's fixed layout. A stored value that does not fit its buffer is
not a miss: the transports report it as MISFIT, and the load sees a `Misfit`, which fails the block's check
like any corrupt payload (so the key is forgotten and the next save repairs it).

A Scatter may also sum its data as it lands. Built with a `checksum` factory, it keeps a running checksum of
its parts after the first (the payload header), which a receiver that fills parts one by one (the bulk
transport) feeds each part as it completes, while its bytes are still in the CPU's cache. The check then
compares one number instead of reading the whole block back from memory: on the 2-core Xeon that second
pass took 4.5-6.5 ms of a 42 MB load, after the last byte (a trace of warm 2k loads in vLLM). Whatever
fills a Scatter another way (`write`) drops the running sum, and the check sums the bytes itself.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, Union


class RunningSum(Protocol):
    def update(self, data, /) -> None: ...

    def intdigest(self) -> int: ...


class Scatter:
    """One value's destination in pieces, filled in order."""

    __slots__ = ("parts", "nbytes", "_checksum", "_running", "_summed")

    def __init__(self, parts: Sequence, checksum: Callable[[], RunningSum] | None = None):
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(len(p) for p in self.parts)
        if checksum is not None and not callable(checksum):
            raise TypeError(f"Scatter checksum must be a factory of running sums, got {checksum!r}")
        self._checksum = checksum  # sums parts[1:] as they land, where the receiver feeds them
        self._running: RunningSum | None = None
        self._summed = 0  # parts after the first summed so far, in order

    def begin_fill(self) -> None:
        """A receive into this Scatter begins (again): its running sum starts over."""
        self._running = self._checksum() if self._checksum is not None else None
        self._summed = 0

    def part_landed(self, i: int) -> None:
        """Part i is complete. Parts are summed in order; one out of order (never, from a receive that fills
        them in order) stops the sum, and the check then sums the bytes itself."""
        if self._running is None or i == 0:
            return
        if i != self._summed + 1:
            self._running = None
            return
        self._running.update(self.parts[i])
        self._summed = i

    def landed_sum(self) -> int | None:
        """The checksum of parts[1:] as they landed, if every one of them was fed since the last begin_fill."""
        if self._running is None or self._summed != len(self.parts) - 1:
            return None
        return self._running.intdigest()

    def drop_sum(self) -> None:
        self._running = None

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        return f"Scatter({len(self.parts)} parts, {self.nbytes} bytes)"

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


Target = Union[memoryview, Scatter]

# A get_into size: the value is stored but does not fit its buffer (nothing was written into the buffer).
MISFIT = -2


class Misfit:
    """A fetched value that did not fit its buffer: none of its bytes were delivered."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0  # no bytes landed

    def __repr__(self) -> str:
        return "Misfit()"


def fits(buf: Target, n: int) -> bool:
    """Can a value of n bytes land in buf?"""
    return n == buf.nbytes if isinstance(buf, Scatter) else 0 <= n <= len(buf)


def targets(buf: Target, n: int) -> list[memoryview]:
    """The pieces a value of n bytes (that fits) is received into, in order."""
    if isinstance(buf, Scatter):
        return list(buf.parts)
    return [memoryview(buf).cast("B")[:n]]


def filled(buf: Target, n: int) -> Target | Misfit | None:
    """What a get_into size means for the load: the value now in buf (n bytes long), a Misfit (MISFIT), or
    None (a miss)."""
    if n == MISFIT:
        return Misfit()
    if n < 0:
        return None
    return buf if isinstance(buf, Scatter) else memoryview(buf)[:n]


def pieces(value) -> list[memoryview]:
    """A value (a buffer or a Scatter) as the buffers that hold it, in order."""
    if isinstance(value, Scatter):
        return value.parts
    return [memoryview(value).cast("B")]


def write(buf: Target, value) -> int:
    """Copy a value (a buffer or a Scatter) into buf; its size, or MISFIT if it does not fit (nothing copied)."""
    n = len(value) if isinstance(value, Scatter) else memoryview(value).nbytes
    if not fits(buf, n):
        return MISFIT
    if isinstance(buf, Scatter):
        buf.drop_sum()  # filled here, not by a receive that sums: the check sums it
    dst = targets(buf, n)
    src = pieces(value)
    di = si = doff = soff = 0
    while si < len(src) and di < len(dst):
        d, s = dst[di], src[si]
        step = min(len(d) - doff, len(s) - soff)
        d[doff : doff + step] = s[soff : soff + step]
        doff += step
        soff += step
        if doff == len(d):
            di, doff = di + 1, 0
        if soff == len(s):
            si, soff = si + 1, 0
    return n

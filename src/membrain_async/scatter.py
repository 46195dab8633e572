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
"""

from __future__ import annotations

from typing import Sequence, Union


class Scatter:
    """One value's destination in pieces, filled in order."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: Sequence):
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(len(p) for p in self.parts)

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

"""The store protocol: the few operations every transport implements, one batch at a time.

A transport (Membrain bulk, Membrain HTTP batch, per-key HTTP; later Redis/Valkey, Mooncake) only moves
one batch that fits its `limits`. Splitting a caller's keys into such batches, timeouts, retries and the
circuit breaker are written once, above it, in `MembrainClient`. A transport raises what happened: a miss
is None / False / -1, a refusal `MembrainRequestError`, a connection failure an OSError (which the client
turns into `MembrainUnavailable` once its retries are spent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .. import scatter
from ..scatter import Target

Buffer = bytes | bytearray | memoryview
# A value to put may be one buffer or a sequence of buffers sent back to back (header + payload).
PutValue = Buffer | Sequence[Buffer]


def value_len(v: PutValue) -> int:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return memoryview(v).nbytes
    return sum(memoryview(b).nbytes for b in v)


def value_parts(v: PutValue) -> list[Buffer]:
    return [v] if isinstance(v, (bytes, bytearray, memoryview)) else list(v)


@dataclass(frozen=True)
class Limits:
    """What one request of a transport may carry."""

    max_keys: int = 1024
    max_bytes: int | None = None  # payload bytes of one put; None: no limit


def split(n: int, limits: Limits, sizes: Sequence[int] | None = None) -> list[range]:
    """Consecutive ranges covering 0..n, each of at most `max_keys` keys and, when `sizes` are given, at
    most `max_bytes` bytes. A value bigger than `max_bytes` goes alone (and the server decides)."""
    step = max(1, limits.max_keys)
    if sizes is None or limits.max_bytes is None:
        return [range(i, min(n, i + step)) for i in range(0, n, step)]
    if len(sizes) != n:
        raise ValueError("split needs one size per key")
    out: list[range] = []
    start, size = 0, 0
    for i, s in enumerate(sizes):
        if i > start and (i - start >= step or size + s > limits.max_bytes):
            out.append(range(start, i))
            start, size = i, 0
        size += s
    if n > start:
        out.append(range(start, n))
    return out


class Transport(Protocol):
    """One batch at a time; `keys` never exceed `limits`."""

    name: str
    limits: Limits

    async def lookup(self, ns: str, keys: list[str]) -> int:
        """How many leading keys are stored."""

    async def exists(self, ns: str, keys: list[str]) -> list[bool]: ...

    async def get(self, ns: str, keys: list[str]) -> list[memoryview | None]: ...

    async def get_into(self, ns: str, keys: list[str], buffers: Sequence[memoryview]) -> list[int]:
        """Each value's size received into its buffer, -1 (a miss), or scatter.MISFIT (stored, but it does
        not fit its buffer: scatter.fits; nothing written)."""

    async def put(self, ns: str, keys: list[str], values: Sequence[PutValue]) -> int:
        """How many were stored."""

    async def delete(self, ns: str, keys: list[str]) -> int:
        """How many were deleted (the others were not stored)."""

    def close(self) -> None: ...


def copy_into(value: memoryview | None, buf: Target) -> int:
    """A value a transport received whole, copied into the caller's buffer: its size, -1 (a miss), or
    scatter.MISFIT (stored, but it does not fit the buffer)."""
    return -1 if value is None else scatter.write(buf, value)

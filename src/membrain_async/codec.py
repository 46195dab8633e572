"""Payload header for stored KV pages: what the bytes are, and proof they arrived intact.

    magic "MBKV" | version u8 | dtype u8 | layout u8 | checksum algo u8 | ndim u8 | 7 reserved
    payload length u64 | checksum u64 | dims 6 x u32 | key tag u64        (64 bytes, little-endian)

The key tag (xxh3-64 of the key the payload was written for, 0 if unbound) ties a payload to its key:
a valid payload copied or written under another key (another namespace fingerprint, another prefix)
is refused on read instead of being loaded as somebody else's KV.

then the raw page bytes. Built and read with memoryviews: the header is 64 fresh bytes, the payload is
never copied here. A header or checksum that does not match is a `PayloadError`, which every caller
treats as a miss (and counts): wrong KV must never reach the attention kernels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"MBKV"
VERSION = 2
HEADER = struct.Struct("<4sBBBBB7xQQ6IQ")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 64

DTYPES = {
    "uint8": 1,
    "int8": 2,
    "float16": 3,
    "bfloat16": 4,
    "float32": 5,
    "float8_e4m3fn": 6,
    "float8_e5m2": 7,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# How the page bytes are arranged. A CPU page and a CUDA page of the same block are not interchangeable,
# so the layout is also part of the namespace fingerprint; here it is a last line of defence.
LAYOUTS = {
    "raw": 0,
    "cpu-pages": 1,  # [layers, kv_heads, block_size, 2*head_dim]: whole CPU_ATTN pages, layer after layer
    "cuda-pages": 2,  # [layers, 2, block_size, kv_heads, head_dim]: FlashAttention pages, layer after layer
}
LAYOUT_NAMES = {v: k for k, v in LAYOUTS.items()}

CHECKSUM_XXH3_64 = 1


class PayloadError(ValueError):
    """A stored payload is not what it claims to be (bad header, wrong length or checksum)."""


@dataclass(frozen=True, slots=True)
class Payload:
    dtype: str
    layout: str
    shape: tuple[int, ...]
    data: memoryview  # view into the buffer given to decode(); no copy


def checksum(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


def key_tag(key: str | None) -> int:
    return xxhash.xxh3_64_intdigest(key.encode()) if key else 0


def encode_header(data, *, dtype: str, shape: tuple[int, ...], layout: str = "raw", key: str | None = None) -> bytes:
    """64-byte header for `data` (any buffer), bound to `key` if given. Send it followed by `data` itself."""
    view = memoryview(data).cast("B")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; known: {sorted(DTYPES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    if len(shape) > 6:
        raise ValueError("at most 6 dimensions")
    dims = list(shape) + [0] * (6 - len(shape))
    return HEADER.pack(
        MAGIC, VERSION, DTYPES[dtype], LAYOUTS[layout], CHECKSUM_XXH3_64, len(shape), len(view), checksum(view), *dims,
        key_tag(key),
    )


def encode(data, *, dtype: str, shape: tuple[int, ...], layout: str = "raw", key: str | None = None) -> bytes:
    """Header + payload in one bytes object. For tests and small values; the hot path sends the two separately."""
    return encode_header(data, dtype=dtype, shape=shape, layout=layout, key=key) + bytes(memoryview(data).cast("B"))


def decode(buf, *, verify: bool = True, key: str | None = None) -> Payload:
    """Check and view a payload; with `key`, it must also have been written for that key."""
    view = memoryview(buf).cast("B")
    if len(view) < HEADER_SIZE:
        raise PayloadError(f"payload of {len(view)} bytes is shorter than its {HEADER_SIZE}-byte header")
    data = view[HEADER_SIZE:]
    payload, csum = _read_header(view, len(data), key, data)
    if verify and checksum(data) != csum:
        raise PayloadError("payload checksum mismatch")
    return payload


def running_checksum() -> xxhash.xxh3_64:
    """The payload checksum, fed piece by piece (scatter.Scatter sums a block's pages as they land)."""
    return xxhash.xxh3_64()


def decode_pieces(pieces: list[memoryview], *, key: str | None = None, landed_sum: int | None = None) -> Payload:
    """Check a payload received in pieces: its 64-byte header, then its data in any number of pieces
    (checksummed as one stream). The Payload's data is empty: the bytes stay where they are.

    `landed_sum`: the data's checksum, already taken as the pieces landed (scatter.Scatter.landed_sum);
    without it, the pieces are summed here."""
    if not pieces or len(pieces[0]) != HEADER_SIZE:
        raise PayloadError(f"a payload in pieces starts with its {HEADER_SIZE}-byte header")
    payload, csum = _read_header(pieces[0], sum(len(p) for p in pieces[1:]), key, memoryview(b""))
    if landed_sum is None:
        h = running_checksum()
        for piece in pieces[1:]:
            h.update(piece)
        landed_sum = h.intdigest()
    if landed_sum != csum:
        raise PayloadError("payload checksum mismatch")
    return payload


def _read_header(view: memoryview, data_len: int, key: str | None, data: memoryview) -> tuple[Payload, int]:
    """The header's fields checked against the data's length and the key; the payload and its checksum."""
    magic, version, dtype, layout, algo, ndim, length, csum, *dims, tag = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError("bad magic: not a Membrain KV payload")
    if version != VERSION:
        raise PayloadError(f"payload format version {version}, this reader knows {VERSION}")
    if dtype not in DTYPE_NAMES or layout not in LAYOUT_NAMES or ndim > 6:
        raise PayloadError("payload header names an unknown dtype, layout or rank")
    if key is not None and tag != key_tag(key):
        raise PayloadError("payload was written for another key (another namespace, model or prefix)")
    if data_len != length:
        raise PayloadError(f"payload holds {data_len} bytes, header says {length}")
    if algo != CHECKSUM_XXH3_64:
        raise PayloadError(f"unknown checksum algorithm {algo}")
    return Payload(DTYPE_NAMES[dtype], LAYOUT_NAMES[layout], tuple(dims[:ndim]), data), csum

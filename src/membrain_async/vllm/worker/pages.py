"""What a block's payload is: the KV cache's page layout, the payload header, its check, and the save budget.

A block's payload is its page from every layer, layer after layer: `[layers, *page_shape]`, behind the
64-byte header (codec.py). Pages are always moved whole: on CPU a page `kv[b]` is `[kv_heads, block_size,
2*head_dim]` but CPU_ATTN keeps K in the first half of the token axis and V in the second, so slicing
tokens would silently mix K and V.

The block dimension is found from the cache's shape (the axis of length num_blocks), so the same layout
describes CPU pages (`[num_blocks, H, N, 2D]`, block axis 0) and CUDA FlashAttention pages
(`[2, num_blocks, N, H, D]`, block axis 1). Moving the pages is movers.py's job.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ... import codec
from ...scatter import Misfit, Scatter

_TORCH_DTYPES = {
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_DTYPES[getattr(torch, _name)] = _name


class UnsupportedLayout(Exception):
    """The registered KV caches are not something we can move whole pages of."""


@dataclass(frozen=True)
class PageLayout:
    layer_names: tuple[str, ...]
    block_major: tuple[torch.Tensor, ...]  # per layer, a view with the block axis first
    page_shape: tuple[int, ...]
    dtype: torch.dtype
    dtype_name: str
    layout: str  # codec layout tag

    @property
    def page_elems(self) -> int:
        n = 1
        for d in self.page_shape:
            n *= d
        return n

    @property
    def payload_bytes(self) -> int:
        return len(self.layer_names) * self.page_elems * self.dtype.itemsize

    @property
    def payload_shape(self) -> tuple[int, ...]:
        return (len(self.layer_names), *self.page_shape)

    @classmethod
    def from_kv_caches(cls, kv_caches: dict[str, torch.Tensor], num_blocks: int, layout: str) -> "PageLayout":
        if not kv_caches:
            raise UnsupportedLayout("no KV caches were registered")
        names, views = [], []
        page_shape = dtype = None
        for name, kv in kv_caches.items():
            axes = [i for i, d in enumerate(kv.shape) if d == num_blocks]
            if not axes:
                raise UnsupportedLayout(f"{name}: no axis of length num_blocks={num_blocks} in shape {tuple(kv.shape)}")
            view = kv.movedim(axes[0], 0)
            if page_shape is None:
                page_shape, dtype = tuple(view.shape[1:]), kv.dtype
            elif tuple(view.shape[1:]) != page_shape or kv.dtype != dtype:
                raise UnsupportedLayout(f"{name}: page {tuple(view.shape[1:])} {kv.dtype} differs from other layers")
            names.append(name)
            views.append(view)
        assert dtype is not None and page_shape is not None
        if dtype not in _TORCH_DTYPES:
            raise UnsupportedLayout(f"KV dtype {dtype} has no payload encoding")
        return cls(tuple(names), tuple(views), page_shape, dtype, _TORCH_DTYPES[dtype], layout)


class SaveBudget:
    """The bytes a worker's saves may hold, from the gather to the end of their upload.

    Everything a save holds (staged awaiting its verdict, queued for write-behind, on the wire) is counted
    here, so `limit` bounds all of it. A save that would pass the limit is not gathered at all (dropped
    and counted): a future miss, never a wait. Bytes come back when an upload ended (or was dropped or
    discarded), from the runtime thread, hence the lock.
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        """Hold `size` more bytes; False (and nothing held) if that would pass the limit."""
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            self.peak = max(self.peak, self.held)
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.held -= size


def write_header(layout: PageLayout, payload: memoryview, key: str) -> None:
    """Checksum the pages and write the header in front of them (xxhash releases the GIL while hashing)."""
    body = payload[codec.HEADER_SIZE :]
    payload[: codec.HEADER_SIZE] = encode_block_header(layout, body, key)


def encode_block_header(layout: PageLayout, body, key: str) -> bytes:
    return codec.encode_header(body, dtype=layout.dtype_name, shape=layout.payload_shape, layout=layout.layout, key=key)


def check_block(layout: PageLayout, value, key: str) -> None:
    """Check a fetched payload (header, key, checksum, dtype, shape, layout); raises PayloadError."""
    if isinstance(value, Misfit):
        raise codec.PayloadError(f"stored value is not the size of a {layout.payload_bytes}-byte block and its header")
    if isinstance(value, Scatter):  # received straight into the KV pages
        payload = codec.decode_pieces(value.parts, key=key, landed_sum=value.landed_sum())
    else:
        payload = codec.decode(value, key=key)
    if payload.dtype != layout.dtype_name or payload.shape != layout.payload_shape or payload.layout != layout.layout:
        raise codec.PayloadError(
            f"payload is {payload.dtype} {payload.shape} {payload.layout}, "
            f"this cache needs {layout.dtype_name} {layout.payload_shape} {layout.layout}"
        )

"""Copying whole KV pages between vLLM's cache and Membrain payloads.

A block's payload is its page from every layer, layer after layer: `[layers, *page_shape]`. Pages are
always copied whole: on CPU a page `kv[b]` is `[kv_heads, block_size, 2*head_dim]` but CPU_ATTN keeps K in
the first half of the token axis and V in the second, so slicing tokens would silently mix K and V.

The block dimension is found from the cache's shape (the axis of length num_blocks), so the same code
moves CPU pages (`[num_blocks, H, N, 2D]`, block axis 0) and CUDA FlashAttention pages
(`[2, num_blocks, N, H, D]`, block axis 1) on the host side; the CUDA transfer path proper (pinned
staging, streams) is a separate module.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import codec

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

    def gather(self, block_id: int, out: torch.Tensor) -> None:
        """Copy block `block_id` of every layer into `out`, a `[layers, *page_shape]` tensor."""
        for layer, kv in enumerate(self.block_major):
            out[layer].copy_(kv[block_id])

    def scatter(self, block_id: int, src: torch.Tensor) -> None:
        """Copy a `[layers, *page_shape]` payload into block `block_id` of every layer."""
        for layer, kv in enumerate(self.block_major):
            kv[block_id].copy_(src[layer])

    def scatter_many(self, block_ids: list[int], payloads: list[torch.Tensor]) -> None:
        """Copy payloads into their blocks with one copy per layer (plus one to gather them).

        Each torch call releases the GIL and must win it back: on a loaded process (vLLM's loop spinning
        on an idle engine) every hand-back can wait a switch interval (5 ms), so a load copied page by
        page (blocks x layers calls) took up to half a second. This makes it layers + 1 calls.
        """
        if len(block_ids) == 1:
            self.scatter(block_ids[0], payloads[0])
            return
        stacked = torch.stack(payloads)  # [n, layers, *page]
        idx = torch.tensor(block_ids, dtype=torch.long)
        for layer, kv in enumerate(self.block_major):
            kv.index_copy_(0, idx, stacked[:, layer])

    def payload_view(self, buf) -> torch.Tensor:
        """A `[layers, *page_shape]` tensor over a payload's bytes (no copy)."""
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).view(self.payload_shape)


class StagingPool:
    """Host memory for saves, bounded: reusable header + payload buffers, one size per model.

    Everything a save holds between the gather and the end of its upload (staged awaiting its verdict,
    queued for write-behind, on the wire) lives in buffers from here, so `limit` bounds all of it, free
    buffers included. A save that would pass the limit is not gathered at all (dropped and counted).
    Fresh memory costs a page fault per 4 KiB (measured at ~250-700 us per MiB here); reusing buffers
    keeps that off the forward pass. A buffer comes back when its upload finished (or was dropped or
    discarded), from the runtime thread, hence the lock.
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self._free: dict[int, list[bytearray]] = defaultdict(list)
        self._free_bytes = 0
        self.held = 0  # bytes handed out and not yet released (buffers or reservations)
        self.peak = 0
        self._lock = threading.Lock()

    def acquire(self, size: int) -> bytearray | None:
        """A buffer of `size` bytes, or None if holding it would pass the limit."""
        with self._lock:
            free = self._free.get(size)
            if free:
                self._free_bytes -= size
                self._hold(size)
                return free.pop()
            while self._free_bytes and self.held + self._free_bytes + size > self.limit:
                self._drop_one_free()
            if self.held + size > self.limit:
                return None
            self._hold(size)
        return bytearray(size)

    def release(self, buf: bytearray) -> None:
        with self._lock:
            self.held -= len(buf)
            if self.held + self._free_bytes + len(buf) <= self.limit:
                self._free[len(buf)].append(buf)
                self._free_bytes += len(buf)

    def reserve(self, size: int) -> bool:
        """Account for `size` bytes held elsewhere (the device path's pinned buffers); False: over the limit."""
        with self._lock:
            while self._free_bytes and self.held + self._free_bytes + size > self.limit:
                self._drop_one_free()
            if self.held + size > self.limit:
                return False
            self._hold(size)
            return True

    def unreserve(self, size: int) -> None:
        with self._lock:
            self.held -= size

    def _hold(self, size: int) -> None:
        self.held += size
        if self.held > self.peak:
            self.peak = self.held

    def _drop_one_free(self) -> None:
        for size, bufs in self._free.items():
            if bufs:
                bufs.pop()
                self._free_bytes -= size
                return


def gather_block(layout: PageLayout, block_id: int, buf: bytearray) -> memoryview:
    """Copy one block's pages into `buf` after room for the 64-byte header; returns the whole payload view.

    The header (with its checksum) is written later by `write_header`, off the forward pass.
    """
    view = memoryview(buf)
    layout.gather(block_id, layout.payload_view(view[codec.HEADER_SIZE :]))
    return view


def write_header(layout: PageLayout, payload: memoryview, key: str) -> None:
    """Checksum the pages and write the header in front of them (xxhash releases the GIL while hashing)."""
    body = payload[codec.HEADER_SIZE :]
    payload[: codec.HEADER_SIZE] = encode_block_header(layout, body, key)


def encode_block_header(layout: PageLayout, body, key: str) -> bytes:
    return codec.encode_header(body, dtype=layout.dtype_name, shape=layout.payload_shape, layout=layout.layout, key=key)


def decode_block(layout: PageLayout, value, key: str) -> torch.Tensor:
    """Check a fetched payload (header, key, checksum, dtype, shape, layout) and view its pages; raises PayloadError."""
    payload = codec.decode(value, key=key)
    if payload.dtype != layout.dtype_name or payload.shape != layout.payload_shape or payload.layout != layout.layout:
        raise codec.PayloadError(
            f"payload is {payload.dtype} {payload.shape} {payload.layout}, "
            f"this cache needs {layout.dtype_name} {layout.payload_shape} {layout.layout}"
        )
    return layout.payload_view(payload.data)

"""Moving whole KV pages between vLLM's cache and host buffers laid out as Membrain payloads.

A host buffer holds *slots*, one per block: room for the 64-byte payload header, then the block's page from
every layer (`[layers, *page_shape]`). Loads receive fetched values straight into slots (no allocation and
no copy on the way in) and scatter them into the cache; saves gather pages into slots and upload each slot
as it stands, its header written later, off the forward pass. Either way it is one torch call per layer,
not one per block and layer: every call gives up the GIL and must win it back, and in a busy engine each
return can wait a whole switch interval.

One interface, two implementations, chosen once per worker by `make_mover`:

- `CpuPageMover`: the slots are the gather and scatter buffer itself.
- `DevicePageMover` (CUDA, or any accelerator): gathers and scatters on the device, in a device buffer
  laid out like the slots, and moves it to or from pinned host memory in one contiguous copy on a stream of
  its own, ordered by events (never a device-wide sync). Saves never read a block vLLM may have reused: the
  compute stream waits (on the GPU; the CPU does not block) for the save stream's gather before it runs
  anything else, so the next step's forward cannot overwrite a freed block before its pages were copied
  out; only the device-to-host copy overlaps the next forward. Buffers used on a side stream are marked
  with `record_stream`, so the caching allocator never hands their memory to another stream meanwhile.
  On a CPU device the same code runs without streams or events; every stream operation goes through one
  seam (`StreamOps`), so a test can replay the ordering on CPU and check it.

Host buffers are pooled, one size per mover (the largest batch seen so far): fresh memory costs a page fault
per 4 KiB, measured here at 250-700 us per MiB, and freeing a large buffer unmaps it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ... import codec
from .pages import PageLayout

# Free host buffers a mover keeps for reuse (more are freed).
POOLED_BUFFERS = 4
# Runs of consecutive block ids up to which pages move as slices (a plain copy, the fastest there is);
# past it, one indexed copy per layer (vLLM hands a request's blocks out mostly in runs, but not always).
MAX_RUNS = 8


class _NoStream:
    """Stand-in for a CUDA stream or event on the CPU, where work is synchronous."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return _DoneEvent()


class _DoneEvent:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE = _DoneEvent()


class StreamOps:
    """The stream calls the device mover makes. CUDA: torch.cuda's; elsewhere: no-ops (work is synchronous)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def new_stream(self):
        return torch.cuda.Stream(device=self.device) if self.cuda else _NoStream()

    def current_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else _NoStream()

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else _NoStream()

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        if self.cuda:
            tensor.record_stream(stream)


class PageMover:
    """What both implementations share: slots, the host buffer pool, gathers and scatters."""

    def __init__(self, layout: PageLayout):
        self.layout = layout
        self.slot_bytes = codec.HEADER_SIZE + layout.payload_bytes
        # Slot offsets and sizes in elements of the KV dtype; a header is a whole number of elements.
        self._elem = layout.dtype.itemsize
        if codec.HEADER_SIZE % self._elem or self.slot_bytes % self._elem:
            raise ValueError(f"{layout.dtype} pages do not tile {self.slot_bytes}-byte slots")
        self._cap = 0  # slots per pooled buffer
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # buffers come back from the runtime thread and worker threads

    # ------------------------------------------------------------------ host buffers

    def host_buffer(self, n: int) -> torch.Tensor:
        """A host buffer of at least n slots (`[cap * slot_bytes]` uint8), from the pool."""
        with self._lock:
            if n > self._cap:
                self._cap = max(n, 2 * self._cap, 8)
                self._free = []  # sized for the old capacity; buffers in flight are not taken back
            if self._free:
                return self._free.pop()
            cap = self._cap
        return self._new_host(cap * self.slot_bytes)

    def _new_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def prefault(self, n: int) -> None:
        """Fault in one pooled buffer of n slots now, at start-up: the first load then pays no page faults
        (about 10-30 ms for a 40 MB prefix here)."""
        buf = self.host_buffer(n)
        buf.zero_()
        self.release_host(buf)

    def release_host(self, buf: torch.Tensor) -> None:
        """Give a host buffer back once nothing writes into or reads from it."""
        with self._lock:
            if buf.numel() == self._cap * self.slot_bytes and len(self._free) < POOLED_BUFFERS:
                self._free.append(buf)

    def slot(self, host: torch.Tensor, i: int) -> memoryview:
        """Slot i of a host buffer: header room, then the block's pages."""
        return memoryview(host[i * self.slot_bytes : (i + 1) * self.slot_bytes].numpy())

    def _pages(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        """`[n, layers, page_elems]` view of the pages in n slots of `slots` (uint8), skipping the headers."""
        elems = self.layout.page_elems
        per_slot = self.slot_bytes // self._elem
        return torch.as_strided(slots.view(self.layout.dtype), (n, len(self.layout.layer_names), elems),
                                (per_slot, elems, 1), codec.HEADER_SIZE // self._elem)

    def _gather(self, block_ids: list[int], slots: torch.Tensor) -> None:
        n, page_shape = len(block_ids), self.layout.page_shape
        pages = self._pages(slots, n)
        runs = _runs(block_ids)
        if len(runs) > MAX_RUNS:
            idx = torch.tensor(block_ids, dtype=torch.long, device=slots.device)
            for layer, kv in enumerate(self.layout.block_major):
                torch.index_select(kv, 0, idx, out=pages[:, layer].view(n, *page_shape))
            return
        for layer, kv in enumerate(self.layout.block_major):
            for first_slot, first_block, count in runs:
                pages[first_slot : first_slot + count, layer].view(count, *page_shape).copy_(
                    kv[first_block : first_block + count])

    def _scatter(self, block_ids: list[int], slots: torch.Tensor) -> None:
        n, page_shape = len(block_ids), self.layout.page_shape
        pages = self._pages(slots, n)
        runs = _runs(block_ids)
        if len(runs) > MAX_RUNS:
            idx = torch.tensor(block_ids, dtype=torch.long, device=slots.device)
            for layer, kv in enumerate(self.layout.block_major):
                kv.index_put_((idx,), pages[:, layer].view(n, *page_shape))
            return
        for layer, kv in enumerate(self.layout.block_major):
            for first_slot, first_block, count in runs:
                kv[first_block : first_block + count].copy_(
                    pages[first_slot : first_slot + count, layer].view(count, *page_shape))

    # ------------------------------------------------------------------ the interface

    def start_save(self, block_ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Gather blocks' pages into the slots of a host buffer. Returns it and an event whose `query()`
        says the pages are there (poll it; never block on the forward path)."""
        raise NotImplementedError

    def load(self, block_ids: list[int], host: torch.Tensor) -> None:
        """On a worker thread: copy the pages of the first len(block_ids) slots into those blocks; returns
        once they are there (vLLM schedules nothing over an async load's blocks until it is reported)."""
        raise NotImplementedError


class CpuPageMover(PageMover):
    """The host buffer's slots are where pages are gathered to and scattered from."""

    def start_save(self, block_ids: list[int]) -> tuple[torch.Tensor, Any]:
        host = self.host_buffer(len(block_ids))
        self._gather(block_ids, host)
        return host, DONE

    def load(self, block_ids: list[int], host: torch.Tensor) -> None:
        self._scatter(block_ids, host)


class DevicePageMover(PageMover):
    """Gathers and scatters on the device; one contiguous copy each way through pinned host memory."""

    def __init__(self, layout: PageLayout, device: torch.device, ops: StreamOps | None = None):
        super().__init__(layout)
        self.device = device
        self.cuda = device.type == "cuda"
        self.ops = ops or StreamOps(device)
        self.save_stream = self.ops.new_stream()
        self.load_stream = self.ops.new_stream()
        # One device buffer per direction: a save's gather must never overwrite a load being scattered.
        self._dev: dict[str, torch.Tensor] = {}

    def _new_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _device_slots(self, direction: str, n: int) -> torch.Tensor:
        buf = self._dev.get(direction)
        if buf is None or buf.numel() < n * self.slot_bytes:
            buf = self._dev[direction] = torch.empty(max(n, self._cap) * self.slot_bytes, dtype=torch.uint8,
                                                     device=self.device)
        return buf[: n * self.slot_bytes]

    def start_save(self, block_ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Queue the gather and the device-to-host copy, after what the compute stream already has."""
        n = len(block_ids)
        host = self.host_buffer(n)
        dev = self._device_slots("save", n)
        ops, compute = self.ops, self.ops.current_stream()
        self.save_stream.wait_event(compute.record_event())  # after this step's forward wrote the pages
        with ops.on(self.save_stream):
            self._gather(block_ids, dev)
            gathered = self.save_stream.record_event()
            host[: dev.numel()].copy_(dev, non_blocking=self.cuda)
            copied = self.save_stream.record_event()
        # Nothing on the compute stream (the next step's forward, vLLM's zeroing of reused blocks) runs
        # before the pages are gathered: the blocks may be freed and reused as soon as this step ends.
        compute.wait_event(gathered)
        ops.record_stream(dev, self.save_stream)
        return host, copied

    def load(self, block_ids: list[int], host: torch.Tensor) -> None:
        """One host-to-device copy of the slots, then a scatter per layer, on the load stream; waits for it.

        vLLM skips zeroing an async load's blocks and schedules nothing over them until the request is
        reported finished, so only the load's own completion needs waiting for."""
        n = len(block_ids)
        dev = self._device_slots("load", n)
        ops = self.ops
        # After everything already queued on the compute stream (a sync-mode load's blocks were zeroed
        # there just before start_load_kv, and a scatter that ran first would be zeroed away).
        self.load_stream.wait_event(ops.current_stream().record_event())
        ops.record_stream(dev, self.load_stream)
        with ops.on(self.load_stream):
            dev.copy_(host[: dev.numel()], non_blocking=self.cuda)
            self._scatter(block_ids, dev)
            done = self.load_stream.record_event()
        done.synchronize()


def _runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive block ids as (first slot, first block, count)."""
    runs: list[tuple[int, int, int]] = []
    for slot, block in enumerate(block_ids):
        if runs and block == runs[-1][1] + runs[-1][2] and slot == runs[-1][0] + runs[-1][2]:
            first_slot, first_block, count = runs[-1]
            runs[-1] = (first_slot, first_block, count + 1)
        else:
            runs.append((slot, block, 1))
    return runs


def make_mover(layout: PageLayout, device: torch.device, force_device_path: bool = False) -> PageMover:
    """The mover for a KV cache on `device`: the device path on accelerators (or when forced, to test it on CPU)."""
    if device.type != "cpu" or force_device_path:
        return DevicePageMover(layout, device)
    return CpuPageMover(layout)

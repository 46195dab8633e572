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

Host buffers are pooled: fresh memory costs a page fault per 4 KiB (measured at 250-700 us per MiB, and
6-8x a warm copy on an AVX2 host: a 2048-token prompt's 32 MiB gather took 30-43 ms into fresh memory
against 4.5-5 ms into used), and freeing a large buffer unmaps it. A buffer is sized to its batch (rounded
up to SLOT_QUANTUM slots); a request takes the smallest free buffer that fits (a save none over twice its
batch). The pool keeps free buffers up to `pool_bytes` (the worker's write-behind and step-load budgets) with
those in use, dropping the smallest first: a large buffer serves any batch up to its size, a small one only
small ones. The worker faults in one buffer of its whole step-load budget at start-up, for loads.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ... import codec
from .pages import PageLayout

# Host buffers are allocated in multiples of this many slots, so nearby batch sizes share buffers.
SLOT_QUANTUM = 4
# Free host-buffer bytes a mover keeps when it is not told (tests, tools).
POOL_BYTES = 256 << 20
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

    def __init__(self, layout: PageLayout, pool_bytes: int = POOL_BYTES):
        self.layout = layout
        self.pool_bytes = pool_bytes
        self.slot_bytes = codec.HEADER_SIZE + layout.payload_bytes
        # Slot offsets and sizes in elements of the KV dtype; a header is a whole number of elements.
        self._elem = layout.dtype.itemsize
        if codec.HEADER_SIZE % self._elem or self.slot_bytes % self._elem:
            raise ValueError(f"{layout.dtype} pages do not tile {self.slot_bytes}-byte slots")
        self._free: list[torch.Tensor] = []  # free host buffers, smallest first
        self._pooled = 0  # their bytes
        self._out = 0  # bytes of the buffers handed out and not given back
        self.allocated = 0  # host buffers made because none free fitted (each faults its pages in on first use)
        self._lock = threading.Lock()  # buffers come back from the runtime thread and worker threads

    # ------------------------------------------------------------------ host buffers

    def host_buffer(self, n: int, *, any_size: bool = False) -> torch.Tensor:
        """A host buffer of at least n slots (`[k * slot_bytes]` uint8): the smallest free one that fits.

        A save takes none over twice its batch: what it holds in flight stays within twice what it reserved
        from the write-behind budget, and a larger buffer is left for a larger batch. A load (`any_size`)
        takes any that fits: it holds it only until its pages are scattered, within the step-load budget,
        and the buffer faulted in at start-up (`prefault`) is meant for it, whatever its size."""
        need = n * self.slot_bytes
        slots = -(-n // SLOT_QUANTUM) * SLOT_QUANTUM
        with self._lock:
            for i, buf in enumerate(self._free):
                if need <= buf.numel() and (any_size or buf.numel() <= 2 * slots * self.slot_bytes):
                    del self._free[i]
                    self._pooled -= buf.numel()
                    self._out += buf.numel()
                    return buf
                if buf.numel() > 2 * slots * self.slot_bytes:
                    break
            self.allocated += 1
            self._out += slots * self.slot_bytes
        try:
            return self._new_host(slots * self.slot_bytes)
        except BaseException:  # no memory: nothing was handed out
            with self._lock:
                self.allocated -= 1
                self._out -= slots * self.slot_bytes
            raise

    def _new_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def prefault(self, n: int) -> None:
        """Fault in one pooled buffer of n slots now, at start-up: a load up to its size then pays no page
        faults (perf counted 0.28 s of page zeroing in a fresh instance's first 91 MB load on the development VM)."""
        buf = self.host_buffer(n)
        buf.zero_()
        self.release_host(buf)

    def release_host(self, buf: torch.Tensor) -> None:
        """Give a host buffer back once nothing writes into or reads from it."""
        with self._lock:
            self._out -= buf.numel()
            sizes = [b.numel() for b in self._free]
            at = next((i for i, size in enumerate(sizes) if size >= buf.numel()), len(sizes))
            self._free.insert(at, buf)
            self._pooled += buf.numel()
            # Buffers in use and kept together stay within the bound: past it the smallest free ones go.
            while self._free and self._pooled + self._out > self.pool_bytes:
                self._pooled -= self._free.pop(0).numel()

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

    # True: loads are received straight into the cache (`pieces`), with no host buffer and no copy.
    direct = False

    def pieces(self, block_id: int) -> list[memoryview]:
        raise NotImplementedError

    def start_save(self, block_ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Gather blocks' pages into the slots of a host buffer. Returns it and an event whose `query()`
        says the pages are there (poll it; never block on the forward path)."""
        raise NotImplementedError

    def load(self, block_ids: list[int], host: torch.Tensor) -> None:
        """On a worker thread: copy the pages of the first len(block_ids) slots into those blocks; returns
        once they are there (vLLM schedules nothing over an async load's blocks until it is reported)."""
        raise NotImplementedError


class CpuPageMover(PageMover):
    """The host buffer's slots are where pages are gathered to; loads need no host buffer at all when every
    layer's cache is one contiguous tensor: a block's pages are received where they lie (`pieces`)."""

    def __init__(self, layout: PageLayout, pool_bytes: int = POOL_BYTES):
        super().__init__(layout, pool_bytes)
        self._page_bytes = layout.page_elems * self._elem
        # Per layer, the whole cache as flat bytes: a block's page is a slice of it (no tensor op per page).
        self._flat: list[memoryview] | None = None
        if all(kv.is_contiguous() for kv in layout.block_major):
            self._flat = [memoryview(kv.view(torch.uint8).reshape(-1).numpy()) for kv in layout.block_major]

    @property
    def direct(self) -> bool:
        return self._flat is not None

    def pieces(self, block_id: int) -> list[memoryview]:
        """Where block `block_id`'s page of every layer lies, in payload order (only when `direct`)."""
        assert self._flat is not None
        start = block_id * self._page_bytes
        return [flat[start : start + self._page_bytes] for flat in self._flat]

    def start_save(self, block_ids: list[int]) -> tuple[torch.Tensor, Any]:
        host = self.host_buffer(len(block_ids))
        self._gather(block_ids, host)
        return host, DONE

    def load(self, block_ids: list[int], host: torch.Tensor) -> None:
        self._scatter(block_ids, host)


class DevicePageMover(PageMover):
    """Gathers and scatters on the device; one contiguous copy each way through pinned host memory."""

    def __init__(self, layout: PageLayout, device: torch.device, ops: StreamOps | None = None,
                 pool_bytes: int = POOL_BYTES):
        super().__init__(layout, pool_bytes)
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
            slots = max(n, 2 * (buf.numel() // self.slot_bytes if buf is not None else 0))
            buf = self._dev[direction] = torch.empty(slots * self.slot_bytes, dtype=torch.uint8,
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


def make_mover(layout: PageLayout, device: torch.device, force_device_path: bool = False,
               pool_bytes: int = POOL_BYTES) -> PageMover:
    """The mover for a KV cache on `device`: the device path on accelerators (or when forced, to test it on CPU)."""
    if device.type != "cpu" or force_device_path:
        return DevicePageMover(layout, device, pool_bytes=pool_bytes)
    return CpuPageMover(layout, pool_bytes)

"""Batched page transfer between an accelerator's KV cache and host memory (the CUDA path).

Per batch of blocks, for every layer, one gather (`index_select`) into a device buffer laid out like the
payloads (`[blocks, layers, page]`), then ONE contiguous copy into a pinned host buffer, on a dedicated
stream, ordered after the forward pass with an event (never a device-wide sync). Loads run the other
way: one contiguous host-to-device copy, then per layer an `index_copy_` into the cache, each layer
followed by its own event so attention for layer l waits only for layer l (`wait_for_layer_load`).

Saves never read a block vLLM may have reused: the compute stream waits (on the GPU, the CPU does not
block) for the save stream's gather before it runs anything else, so the next step's forward cannot
overwrite a freed block before its pages were copied out; only the device-to-host copy of the gathered
buffer overlaps the next forward. Buffers used on a side stream are marked with `record_stream`, so the
caching allocator never hands their memory to another stream while that stream's work is pending.

Buffers (device and pinned host) are allocated once, at the largest batch seen so far, and reused.
On a CPU device the same code runs with no streams or events (everything is already ordered), which is
how the layout logic is tested on machines without a GPU. Every stream operation goes through one seam
(`StreamOps`), so a test can also replay the ordering on CPU and check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .pages import PageLayout


class _NoStream:
    """Stand-in for a CUDA stream/event on the CPU: work is synchronous there."""

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


class StreamOps:
    """The stream calls the mover makes. CUDA: torch.cuda's; elsewhere: no-ops (work is synchronous)."""

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


@dataclass
class PendingSave:
    """Pages on their way to host memory; `ready()` turns true once the copy finished (poll, never block)."""

    event: Any
    host: torch.Tensor  # [n, payload_bytes] uint8, pinned on CUDA
    block_ids: list[int]
    hashes: list[str]
    req_id: str
    nbytes: int = 0  # host bytes accounted for in the worker's staging bound
    discard: bool = False  # its step's verdict refused it: release the buffer once the copy finished

    def ready(self) -> bool:
        return self.event.query()


@dataclass
class PendingLoad:
    layer_events: dict[str, Any] = field(default_factory=dict)


class DevicePageMover:
    def __init__(self, layout: PageLayout, device: torch.device, ops: StreamOps | None = None):
        self.layout = layout
        self.device = device
        self.cuda = device.type == "cuda"
        self.ops = ops or StreamOps(device)
        self.save_stream = self.ops.new_stream()
        self.load_stream = self.ops.new_stream()
        # One device buffer per direction: a save's gather must never overwrite a load being scattered.
        self._dev: dict[str, torch.Tensor] = {}
        self._host_bufs: list[torch.Tensor] = []  # free pinned buffers of _cap payloads
        self._cap = 0

    # ------------------------------------------------------------------ buffers

    def _ensure(self, n: int) -> None:
        if n <= self._cap:
            return
        self._cap = max(n, 2 * self._cap, 8)
        self._dev = {}
        self._host_bufs = []  # sized for the old capacity; buffers in flight are simply not taken back

    def _device_buf(self, direction: str, n: int) -> torch.Tensor:
        buf = self._dev.get(direction)
        if buf is None:
            layers = len(self.layout.layer_names)
            buf = self._dev[direction] = torch.empty(
                (self._cap, layers, self.layout.page_elems), dtype=self.layout.dtype, device=self.device
            )
        return buf[:n]

    def host_buffer(self, n: int) -> torch.Tensor:
        """A (pinned, on CUDA) host buffer for n payloads, `[n * payload_bytes]` uint8, from the pool."""
        self._ensure(n)
        buf = self._host_bufs.pop() if self._host_bufs else torch.empty(
            self._cap * self.layout.payload_bytes, dtype=torch.uint8, pin_memory=self.cuda
        )
        return buf

    def release_host(self, buf: torch.Tensor) -> None:
        """Give a host buffer back once nothing reads it (any thread: list.append is atomic)."""
        if buf.numel() == self._cap * self.layout.payload_bytes:
            self._host_bufs.append(buf)

    # ------------------------------------------------------------------ saves

    def start_save(self, block_ids: list[int], hashes: list[str], req_id: str) -> PendingSave:
        """Queue gather + device-to-host copy of whole pages, after what the compute stream already has."""
        n = len(block_ids)
        host = self.host_buffer(n)
        dev = self._device_buf("save", n)
        ops, compute = self.ops, self.ops.current_stream()
        self.save_stream.wait_event(compute.record_event())  # after this step's forward wrote the pages
        with ops.on(self.save_stream):
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            for layer, kv in enumerate(self.layout.block_major):
                dev[:, layer].copy_(kv.index_select(0, idx).reshape(n, -1))
            gathered = self.save_stream.record_event()
            flat = dev.reshape(-1).view(torch.uint8)
            host[: flat.numel()].copy_(flat, non_blocking=self.cuda)
            event = self.save_stream.record_event()
        # Nothing on the compute stream (the next step's forward, vLLM's zeroing of reused blocks) runs
        # before the pages are gathered: the blocks may be freed and reused as soon as this step ends.
        compute.wait_event(gathered)
        ops.record_stream(dev, self.save_stream)
        return PendingSave(event, host, list(block_ids), list(hashes), req_id)

    def payload_of(self, pending: PendingSave, i: int) -> torch.Tensor:
        """Block i's payload bytes in the pending save's host buffer (valid once ready())."""
        size = self.layout.payload_bytes
        return pending.host[i * size : (i + 1) * size]

    # ------------------------------------------------------------------ loads

    def stage(self, payloads: list[torch.Tensor]) -> torch.Tensor:
        """Copy `[layers, *page]` payloads (views of fetched values) into one pooled host buffer."""
        host = self.host_buffer(len(payloads))
        size = self.layout.payload_bytes
        for i, p in enumerate(payloads):
            host[i * size : (i + 1) * size].copy_(p.reshape(-1).view(torch.uint8))
        return host

    def start_load(self, block_ids: list[int], host: torch.Tensor) -> PendingLoad:
        """Queue one host-to-device copy of `host` (n payloads back to back) and a per-layer scatter.

        Returns per-layer events for wait_layer(). Blocks the CPU only until the host buffer has been read.
        """
        n = len(block_ids)
        self._ensure(n)
        size = self.layout.payload_bytes
        dev = self._device_buf("load", n)
        pending = PendingLoad()
        ops = self.ops
        # After everything already queued on the compute stream: vLLM zeroes newly allocated blocks
        # there just before start_load_kv, and a scatter that ran first would be zeroed away.
        self.load_stream.wait_event(ops.current_stream().record_event())
        ops.record_stream(dev, self.load_stream)
        with ops.on(self.load_stream):
            dev.reshape(-1).view(torch.uint8).copy_(host[: n * size], non_blocking=self.cuda)
            copied = self.load_stream.record_event()
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            page_shape = self.layout.page_shape
            for layer, (name, kv) in enumerate(zip(self.layout.layer_names, self.layout.block_major)):
                kv.index_copy_(0, idx, dev[:, layer].reshape(n, *page_shape))
                pending.layer_events[name] = self.load_stream.record_event()
        copied.synchronize()  # the host buffer may be reused from here on; the scatters run on
        return pending

    def finish_load(self, block_ids: list[int], host: torch.Tensor) -> None:
        """An async load, on a worker thread: copy and scatter on the load stream, and wait for the end.

        vLLM skips zeroing the blocks of an async load and schedules nothing over them until the
        request is reported finished, so only the load's own completion needs waiting for.
        """
        pending = self.start_load(block_ids, host)
        for event in pending.layer_events.values():
            event.synchronize()

    def wait_layer(self, pending: PendingLoad, layer_name: str) -> None:
        """Order the compute stream after this layer's load (a GPU-side wait; the CPU does not block)."""
        event = pending.layer_events.get(layer_name)
        if event is not None:
            self.ops.current_stream().wait_event(event)

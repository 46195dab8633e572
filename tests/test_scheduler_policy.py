"""The scheduler half's load policy without an engine: what it answers vLLM, what it plans, what it counts.

vLLM's own `Request`, `KVCacheBlocks` and `KVConnectorOutput` objects, a real block store and server on
loopback (a fault proxy where the network must be slow); only vLLM's KV cache manager is a small stand-in
that records what the scheduler half evicts.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from membrain_async.cache import open_store  # noqa: E402
from membrain_async.config import ConnectorConfig  # noqa: E402
from membrain_async.testing.proxy import FaultProxy  # noqa: E402
from membrain_async.vllm.metadata import BlockTransfer  # noqa: E402
from membrain_async.vllm.scheduler import MembrainScheduler  # noqa: E402

BS = 32


class Manager:
    """vLLM's KV cache manager as the scheduler half uses it: block tables and eviction."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        self.evicted: set[int] = set()

    def get_block_ids(self, req_id):
        return (self.tables[req_id],)

    def evict_blocks(self, ids):
        self.evicted |= set(ids)


def make_scheduler(url: str, **overrides) -> MembrainScheduler:
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": url, "lookup_deadline": 5.0, **overrides})
    store = open_store(cfg)
    sched = MembrainScheduler(cfg, store, block_size=BS, fingerprint="fp", block_bytes=1 << 20, release=store.close)
    sched.bind_kv_cache_manager(Manager())
    return sched


def request(req_id: str, n_tokens: int = 5 * BS + 7) -> Request:
    return Request(req_id, list(range(1000, 1000 + n_tokens)), SamplingParams(max_tokens=4), None)


def store_leading(sched: MembrainScheduler, req: Request, n_blocks: int) -> list[str]:
    """Put the request's first n blocks on the server, under the keys the scheduler half looks up."""
    from membrain_async.vllm.blockhash import BlockHashes

    hashes = BlockHashes(BS).extend(req, (req.num_tokens - 1) // BS)
    for key in sched.keys_for(hashes[:n_blocks]):
        assert sched.store.save(key, [b"page"])
    assert sched.store.flush(10)
    return hashes


def answer(sched: MembrainScheduler, req: Request, local_tokens: int = 0, timeout: float = 10.0):
    """Ask as vLLM does, once per step (a pass ends with build_connector_meta), until the lookup is answered."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = sched.get_num_new_matched_tokens(req, local_tokens)
        if got[0] is not None:
            return got
        step(sched)
        time.sleep(0.01)
    raise AssertionError("the lookup was never answered")


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks((tuple(KVCacheBlock(i) for i in ids),))


def step(sched: MembrainScheduler):
    return sched.build_connector_meta(SimpleNamespace(kv_connector_block_state=None, num_scheduled_tokens={}, total_num_scheduled_tokens=0))


@pytest.fixture
def sched(server):
    s = make_scheduler(server.url)
    yield s
    s.shutdown()


def test_a_hit_loads_asynchronously_and_vllms_second_call_after_the_load_is_not_counted(sched):
    req = request("r1")
    hashes = store_leading(sched, req, 3)
    sched.on_new_request(req)
    assert answer(sched, req) == (3 * BS, True)  # vLLM parks it in WAITING_FOR_REMOTE_KVS
    ids = [7, 3, 9, 4, 5, 6]
    sched.update_state_after_alloc(req, blocks(ids), 3 * BS)
    meta = step(sched)
    assert meta.loads == [BlockTransfer("r1", [7, 3, 9], hashes[:3])]
    assert meta.idle  # nothing scheduled: workers may rest while the load is in flight
    counted = dict(sched.take_stats())
    # Back from WAITING_FOR_REMOTE_KVS, vLLM allocates again with no external tokens: nothing new to count.
    sched.update_state_after_alloc(req, blocks(ids), 0)
    assert step(sched).loads == [] and sched.take_stats() == {}
    assert counted["hit_blocks"] == 3 and counted["lookups"] == 1 and counted["query_tokens"] == req.num_tokens


def test_sync_mode_loads_in_the_step(server):
    sched = make_scheduler(server.url, load_mode="sync")
    try:
        req = request("r1")
        store_leading(sched, req, 2)
        sched.on_new_request(req)
        assert answer(sched, req) == (2 * BS, False)
    finally:
        sched.shutdown()


def test_a_local_hit_covering_the_stored_blocks_loads_nothing(sched):
    req = request("r1")
    store_leading(sched, req, 2)
    sched.on_new_request(req)
    assert answer(sched, req, local_tokens=2 * BS) == (0, False)  # load_async must be False with 0 tokens


def test_a_failed_async_load_is_not_loaded_again_when_vllm_readmits_the_request(sched):
    req = request("r1")
    store_leading(sched, req, 3)
    sched.on_new_request(req)
    assert answer(sched, req) == (3 * BS, True)
    ids = [7, 3, 9, 4, 5, 6]
    sched._kv_cache_manager.tables["r1"] = ids
    sched.update_state_after_alloc(req, blocks(ids), 3 * BS)
    step(sched)
    # Every rank reported its load; block 0 failed. vLLM frees the blocks (nothing valid) and re-admits it.
    sched.update_connector_output(KVConnectorOutput(finished_recving={"r1"}, invalid_block_ids={7}))
    assert {7, 3, 9, 4, 5, 6} <= sched._kv_cache_manager.evicted  # the failed block and all after it
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # recomputed, not loaded again
    assert sched.take_stats()["reloads_recomputed"] == 1


def test_a_lookup_past_its_deadline_is_a_miss_and_counted_as_late(server):
    with FaultProxy(server.port) as proxy:
        sched = make_scheduler(proxy.url, lookup_deadline=0.3, timeout=5.0)
        try:
            req = request("r1")
            store_leading(sched, req, 3)
            proxy.delay = 2.0
            sched.on_new_request(req)
            assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # pending: ask again next step
            assert answer(sched, req) == (0, False)
            stats = sched.take_stats()
            assert stats["lookup_timeouts"] == 1 and "lookup_unavailable" not in stats
        finally:
            sched.shutdown()


def test_an_unreachable_server_is_a_miss_counted_as_unavailable():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sched = make_scheduler(f"http://127.0.0.1:{port}", timeout=1.0)
    try:
        req = request("r1")
        sched.on_new_request(req)
        assert answer(sched, req) == (0, False)
        stats = sched.take_stats()
        assert stats["lookup_unavailable"] == 1 and "lookup_errors" not in stats
        # Two arriving together are looked up in one job: both unavailable, not "errors".
        a, b = request("a"), request("b", 3 * BS + 9)
        sched.on_new_request(a)
        sched.on_new_request(b)
        assert answer(sched, a) == (0, False) and answer(sched, b) == (0, False)
        stats = sched.take_stats()
        assert stats["lookup_unavailable"] == 2 and "lookup_errors" not in stats
    finally:
        sched.shutdown()


def test_requests_arriving_together_are_answered_together(sched):
    a, b = request("a"), request("b", 4 * BS + 3)
    store_leading(sched, a, 4)
    sched.on_new_request(a)
    sched.on_new_request(b)  # same tokens as a's first 4 blocks: both hit
    assert answer(sched, a) == (4 * BS, True)
    assert sched.get_num_new_matched_tokens(b, 0) == (4 * BS, True)  # its answer came in the same job


def test_an_answer_landing_between_two_requests_of_one_pass_waits_for_the_next_pass(server):
    """vLLM asks about each waiting request in turn. Requests looked up in one job must see their answers in
    the same pass, or one is scheduled a step before the other and no longer shares its blocks."""
    with FaultProxy(server.port) as proxy:
        sched = make_scheduler(proxy.url)
        try:
            a, b = request("a"), request("b", 4 * BS + 3)
            store_leading(sched, a, 4)
            proxy.delay = 0.3
            sched.on_new_request(a)
            sched.on_new_request(b)
            assert sched.get_num_new_matched_tokens(a, 0) == (None, False)  # sent, and pending
            deadline = time.monotonic() + 10
            while not len(sched.lookups.answers) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(sched.lookups.answers), "the lookup was never answered"
            assert sched.get_num_new_matched_tokens(b, 0) == (None, False)  # same pass: as a saw it
            step(sched)
            assert sched.get_num_new_matched_tokens(a, 0) == (4 * BS, True)
            assert sched.get_num_new_matched_tokens(b, 0) == (4 * BS, True)
        finally:
            sched.shutdown()


def test_a_lookup_sent_on_arrival_is_answered_in_the_requests_first_pass(sched):
    """arrival.py: the engine core's input thread sends the lookup while a step runs, before vLLM adds the
    request. Its answer, landed meanwhile (and drained by a pass for other requests), is in hand at once."""
    req = request("early")
    store_leading(sched, req, 3)
    t = threading.Thread(target=sched.on_request_arriving, args=(req,))
    t.start()
    t.join()
    deadline = time.monotonic() + 10
    while not len(sched.lookups.answers) and time.monotonic() < deadline:
        time.sleep(0.01)
    other = request("other", 2 * BS)
    sched.on_new_request(other)
    answer(sched, other)  # passes for another request drain the ring before vLLM adds ours
    drained = sched.take_stats()
    assert drained["lookup_jobs"] == 2  # both answers drained, ours kept for when vLLM adds the request
    assert drained["lookup_waits"] >= 1  # other's lookup went out at its first pass: it waited
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (3 * BS, True)  # no pass spent waiting
    stats = sched.take_stats()
    assert stats["lookups"] == 1 and "lookup_waits" not in stats


def test_a_lookup_sent_on_arrival_and_answered_after_the_request_was_added(server):
    with FaultProxy(server.port) as proxy:
        sched = make_scheduler(proxy.url)
        try:
            req = request("late")
            store_leading(sched, req, 2)
            proxy.delay = 0.3
            sched.on_request_arriving(req)
            sched.on_new_request(req)  # before the answer: not looked up a second time
            assert answer(sched, req) == (2 * BS, True)
            assert sched.take_stats()["lookup_jobs"] == 1
        finally:
            sched.shutdown()

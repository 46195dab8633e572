"""The scheduler half's load policy without an engine or a server: what it answers vLLM, plans and counts.

Like vLLM's tests of its OffloadingManager: vLLM's own `Request`, `KVCacheBlocks` and `KVConnectorOutput`
objects drive `MembrainScheduler` directly, over an in-memory store (`testing.fake_store`) whose lookups
are answered when a test says so, and a clock the test moves. Nothing sleeps and nothing depends on
timing. vLLM's KV cache manager is a small stand-in that records what the scheduler half evicts.
(tests/unit/test_fake_store.py holds the fake to the real store's answers.)
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from membrain_async.config import ConnectorConfig  # noqa: E402
from membrain_async.testing.fake_store import FakeSchedulerStore  # noqa: E402
from membrain_async.vllm.scheduler.blockhash import BlockHashes  # noqa: E402
from membrain_async.vllm.shared.metadata import BlockTransfer  # noqa: E402
from membrain_async.vllm.scheduler.scheduler import MembrainScheduler  # noqa: E402
from membrain_async.vllm.shared.stats import COUNTERS, TIMERS, MembrainConnectorStats  # noqa: E402
from membrain_async.vllm.shared.units import KVUnit  # noqa: E402

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


class Clock:
    """The scheduler half's clock (seconds), moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# What the connector makes of a plain model's one KV cache group (units.units_of).
PLAIN_UNIT = KVUnit(0, 0, "full", ("model.layers.0.self_attn.attn",), None, False, "spec")


def make_scheduler(clock: Clock | None = None, units: list[KVUnit] | None = None, **overrides) -> MembrainScheduler:
    """The scheduler half of a plain model (or of `units`) over an empty in-memory store (`sched.store`)."""
    cfg = ConnectorConfig.from_sources(env={}, overrides={"lookup_deadline": 5.0, **overrides})
    sched = MembrainScheduler(cfg, FakeSchedulerStore(), block_size=BS, fingerprint="fp", block_bytes=1 << 20,
                              units=units, clock=clock or Clock())
    sched.bind_kv_cache_manager(Manager())
    return sched


def request(req_id: str, n_tokens: int = 5 * BS + 7, first_token: int = 1000) -> Request:
    return Request(req_id, list(range(first_token, first_token + n_tokens)), SamplingParams(max_tokens=4), None)


def store_leading(sched: MembrainScheduler, req: Request, n_blocks: int) -> list[str]:
    """Put the request's first n blocks in the store, under the keys the scheduler half looks up."""
    hashes = BlockHashes(BS).extend(req, (req.num_tokens - 1) // BS)
    sched.store.put(sched.keys_for(hashes[:n_blocks]))
    return hashes


def answer(sched: MembrainScheduler, req: Request, local_tokens: int = 0, passes: int = 4):
    """Ask as vLLM does, once per pass (a pass ends with build_connector_meta); between passes the store
    answers every lookup sent so far."""
    for _ in range(passes):
        got = sched.get_num_new_matched_tokens(req, local_tokens)
        if got[0] is not None:
            return got
        sched.store.answer()
        step(sched)
    raise AssertionError("the lookup was never answered")


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks((tuple(KVCacheBlock(i) for i in ids),))


def step(sched: MembrainScheduler):
    return sched.build_connector_meta(SimpleNamespace(kv_connector_block_state=None, num_scheduled_tokens={}, total_num_scheduled_tokens=0))


@pytest.fixture
def sched():
    s = make_scheduler()
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


def test_sync_mode_loads_in_the_step():
    sched = make_scheduler(load_mode="sync")
    req = request("r1")
    store_leading(sched, req, 2)
    sched.on_new_request(req)
    assert answer(sched, req) == (2 * BS, False)


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
    stats = sched.take_stats()
    assert stats["reloads_recomputed"] == 1
    assert MembrainConnectorStats(data=stats).reduce()["reloads_recomputed"] == 1  # in vLLM's log and metrics


@pytest.mark.parametrize("late", ["past_the_schedulers_deadline", "the_stores_deadline"])
def test_a_lookup_past_its_deadline_is_a_miss_and_counted_as_late(late):
    clock = Clock()
    sched = make_scheduler(clock, lookup_deadline=0.3)
    req = request("r1")
    store_leading(sched, req, 3)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # pending: ask again next step
    step(sched)
    clock.advance(0.2)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # still within the deadline
    step(sched)
    if late == "past_the_schedulers_deadline":
        clock.advance(0.2)  # no answer yet, and the deadline has passed
    else:
        sched.store.answer(outcome="timeout")  # the store gave up on the job at its own deadline
        step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.store.answer()  # a late answer, found the 3 blocks: ignored
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    stats = sched.take_stats()
    assert stats["lookup_timeouts"] == 1 and "lookup_unavailable" not in stats and "lookup_errors" not in stats
    assert stats["lookups"] == 1 and "hit_blocks" not in stats


def test_an_unreachable_server_is_a_miss_counted_as_unavailable(sched):
    req = request("r1")
    store_leading(sched, req, 3)  # stored, but the server cannot be reached to say so
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    sched.store.answer(outcome="unavailable")
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    stats = sched.take_stats()
    assert stats["lookup_unavailable"] == 1 and "lookup_errors" not in stats
    # Two arriving together are looked up in one job: both unavailable, not "errors".
    a, b = request("a"), request("b", 3 * BS + 9)
    sched.on_new_request(a)
    sched.on_new_request(b)
    assert sched.get_num_new_matched_tokens(a, 0) == (None, False)
    (job,) = sched.store.answer(outcome="unavailable")
    assert job.many and job.tag == ("a", "b")
    step(sched)
    assert sched.get_num_new_matched_tokens(a, 0) == (0, False) and sched.get_num_new_matched_tokens(b, 0) == (0, False)
    stats = sched.take_stats()
    assert stats["lookup_unavailable"] == 2 and "lookup_errors" not in stats


def test_a_lookup_the_store_failed_otherwise_is_a_miss_counted_as_an_error(sched):
    req = request("r1")
    store_leading(sched, req, 3)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    sched.store.answer(outcome="error")
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    stats = sched.take_stats()
    assert stats["lookup_errors"] == 1 and "lookup_unavailable" not in stats and "lookup_timeouts" not in stats


def test_requests_arriving_together_are_answered_together(sched):
    a, b = request("a"), request("b", 4 * BS + 3)
    store_leading(sched, a, 4)
    sched.on_new_request(a)
    sched.on_new_request(b)  # same tokens as a's first 4 blocks: both hit
    assert answer(sched, a) == (4 * BS, True)
    assert sched.get_num_new_matched_tokens(b, 0) == (4 * BS, True)  # its answer came in the same job
    (job,) = sched.store.sent
    assert job.many and job.tag == ("a", "b")


def test_an_answer_landing_between_two_requests_of_one_pass_waits_for_the_next_pass(sched):
    """vLLM asks about each waiting request in turn. Requests looked up in one job must see their answers in
    the same pass, or one is scheduled a step before the other and no longer shares its blocks."""
    a, b = request("a"), request("b", 4 * BS + 3)
    store_leading(sched, a, 4)
    sched.on_new_request(a)
    sched.on_new_request(b)
    assert sched.get_num_new_matched_tokens(a, 0) == (None, False)  # sent, and pending
    sched.store.answer()  # lands between vLLM's questions about a and b
    assert len(sched.lookups.answers) == 1
    assert sched.get_num_new_matched_tokens(b, 0) == (None, False)  # same pass: as a saw it
    step(sched)
    assert sched.get_num_new_matched_tokens(a, 0) == (4 * BS, True)
    assert sched.get_num_new_matched_tokens(b, 0) == (4 * BS, True)


def test_a_lookup_sent_on_arrival_is_answered_in_the_requests_first_pass(sched):
    """arrival.py: the engine core's input thread sends the lookup while a step runs, before vLLM adds the
    request. Its answer, landed meanwhile (and drained by a pass for other requests), is in hand at once."""
    req = request("early")
    store_leading(sched, req, 3)
    t = threading.Thread(target=sched.on_request_arriving, args=(req,))
    t.start()
    t.join()
    assert sched.store.pending == 1
    sched.store.answer()  # answered while the step runs
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
    assert len(sched.store.sent) == 2  # not looked up again when vLLM added it


def test_a_lookup_sent_on_arrival_and_answered_after_the_request_was_added(sched):
    req = request("late")
    store_leading(sched, req, 2)
    sched.on_request_arriving(req)
    sched.on_new_request(req)  # before the answer: not looked up a second time
    assert answer(sched, req) == (2 * BS, True)
    assert sched.take_stats()["lookup_jobs"] == 1
    assert len(sched.store.sent) == 1


# ---------------------------------------------------------------------------- a plain model: one full unit


@pytest.fixture(params=["no_units_named", "one_full_unit"])
def plain(request):
    """A plain model's scheduler half, built as tests build it (no units) and as the connector does (its
    one full-attention unit): the two must behave the same."""
    s = make_scheduler(units=None if request.param == "no_units_named" else [PLAIN_UNIT],
                       local_cache_bytes=64 << 20)
    yield s
    s.shutdown()


def plan_saves(sched: MembrainScheduler, req: Request, ids: list[int]):
    state = SimpleNamespace(get_block_ids=lambda rid: (ids,))
    return sched.build_connector_meta(SimpleNamespace(
        kv_connector_block_state=state, num_scheduled_tokens={req.request_id: req.num_tokens},
        total_num_scheduled_tokens=req.num_tokens))


def test_a_plain_model_asks_for_a_leading_run_of_its_keys_and_plans_plain_transfers(plain):
    req = request("r1")
    hashes = store_leading(plain, req, 3)
    plain.on_new_request(req)
    assert answer(plain, req) == (3 * BS, True)
    # The store's prefix count over the one unit's keys (not a per-key PrefixQuery): one round trip that
    # stops at the first missing key.
    (job,) = plain.store.sent
    assert not job.many and job.queries == [plain.keys_for(hashes[:5])]
    ids = [7, 3, 9, 4, 5, 6]
    plain.update_state_after_alloc(req, blocks(ids), 3 * BS)
    assert step(plain).loads == [BlockTransfer("r1", [7, 3, 9], hashes[:3])]  # no per-entry units: all unit 0
    req.num_computed_tokens = 3 * BS
    (save,) = plan_saves(plain, req, ids).saves
    assert save == BlockTransfer("r1", [4, 5], hashes[3:5])  # the blocks after the stored ones


def test_a_plain_model_is_not_looked_up_when_this_instance_just_held_every_block(plain):
    """The hot-tier estimate (VLLM_MEMBRAIN_LOCAL_CACHE_BYTES): blocks this instance recently loaded or saved
    are in its workers' hot tier, so a request made only of them needs no lookup."""
    first = request("r1")
    plain.on_new_request(first)
    assert answer(plain, first) == (0, False)
    ids = [7, 3, 9, 4, 5, 6]
    plain.update_state_after_alloc(first, blocks(ids), 0)
    assert len(plan_saves(plain, first, ids).saves[0].hashes) == 5
    plain.take_stats()
    again = request("r2")  # the same prompt
    plain.on_new_request(again)
    assert plain.get_num_new_matched_tokens(again, 0) == (5 * BS, True)  # at once, from the estimate
    stats = plain.take_stats()
    assert len(plain.store.sent) == 1 and stats["hot_lookups"] == 1 and "lookups" not in stats
    assert MembrainConnectorStats(data=stats).reduce()["hot_lookups"] == 1  # in vLLM's log and metrics


def test_every_counter_the_scheduler_half_keeps_reaches_vllms_metrics():
    """A name counted but not in stats.COUNTERS/TIMERS would be shipped to the front end and dropped there."""
    import inspect
    import re

    from membrain_async.vllm.scheduler import lookups, scheduler

    counted = set()
    for module in (scheduler, lookups):
        counted |= set(re.findall(r'_(?:count|observe)\(\s*"(\w+)"', inspect.getsource(module)))
    assert {"lookups", "hot_lookups", "reloads_recomputed", "lookup_rtt_seconds"} <= counted  # the scan finds them
    assert counted <= set(COUNTERS) | set(TIMERS), counted - set(COUNTERS) - set(TIMERS)


# ---------------------------------------------------------------------------- what one step may load


def test_a_steps_loads_are_bounded_and_the_rest_wait_a_step_counted_as_deferred():
    sched = make_scheduler(step_load_bytes=4 << 20)  # 4 blocks of 1 MiB per step
    a, b = request("a"), request("b", first_token=5000)  # unrelated prompts
    store_leading(sched, a, 3)
    store_leading(sched, b, 3)
    sched.on_new_request(a)
    sched.on_new_request(b)
    assert answer(sched, a) == (3 * BS, True)
    sched.update_state_after_alloc(a, blocks([7, 3, 9, 4, 5, 6]), 3 * BS)
    assert sched.get_num_new_matched_tokens(b, 0) == (None, False)  # 3 + 3 > 4: next step
    assert sched.take_stats()["loads_deferred"] == 1
    assert len(step(sched).loads) == 1
    assert sched.get_num_new_matched_tokens(b, 0) == (3 * BS, True)


def test_a_hit_larger_than_a_steps_loads_alone_in_its_step_loads_what_the_limit_allows():
    sched = make_scheduler(step_load_bytes=2 << 20)
    req = request("r1")
    store_leading(sched, req, 5)
    sched.on_new_request(req)
    assert answer(sched, req) == (2 * BS, True)


def test_while_its_lookup_is_pending_the_workers_prefetch_what_the_local_cache_lacks_once():
    sched = make_scheduler(prefetch_bytes="64MiB")  # prefetch staging is off by default
    req = request("r1")
    hashes = store_leading(sched, req, 2)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, BS) == (None, False)  # block 0 is in vLLM's prefix cache
    assert step(sched).prefetch == [BlockTransfer("r1", [], hashes[1:5])]
    assert sched.get_num_new_matched_tokens(req, BS) == (None, False)
    assert step(sched).prefetch == []  # sent once
    sched.store.answer()
    step(sched)
    assert sched.get_num_new_matched_tokens(req, BS) == (BS, True)  # block 1 loads; 0 is local


def test_no_prefetch_is_planned_while_prefetch_staging_is_off(sched):
    req = request("r1")
    store_leading(sched, req, 2)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, BS) == (None, False)
    assert step(sched).prefetch == []


def test_timers_become_histograms_in_vllms_registry_and_counters_totals():
    """What vLLM's front end does with the halves' stats: aggregate (workers, scheduler), then observe."""
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from membrain_async.telemetry import LATENCY_BUCKETS_S
    from membrain_async.vllm.shared.stats import MembrainPromMetrics

    reg = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=reg) for cls in (Counter, Gauge, Histogram)}
    prom = MembrainPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["engine"], {0: ["0"]})
    assert reg.get_sample_value("vllm:membrain_load_seconds_count", {"engine": "0"}) == 0  # there before any load
    rank0 = MembrainConnectorStats(data={"load_seconds": [0.003], "loaded_blocks": 2})
    rank1 = MembrainConnectorStats(data={"load_seconds": [0.0004, 20.0], "loaded_blocks": 3})
    both = rank0.aggregate(rank1)
    assert rank0.data["load_seconds"] == [0.003]  # aggregate builds new lists
    prom.observe(both.data, engine_idx=0)

    def bucket(le):
        return reg.get_sample_value("vllm:membrain_load_seconds_bucket", {"engine": "0", "le": le})

    assert reg.get_sample_value("vllm:membrain_load_seconds_count", {"engine": "0"}) == 3
    assert reg.get_sample_value("vllm:membrain_load_seconds_sum", {"engine": "0"}) == pytest.approx(20.0034)
    assert bucket("0.0005") == 1 and bucket("0.005") == 2 and bucket(str(LATENCY_BUCKETS_S[-1])) == 2
    assert bucket("+Inf") == 3
    assert reg.get_sample_value("vllm:membrain_loaded_blocks_total", {"engine": "0"}) == 5
    assert both.reduce()["avg_load_ms"] == pytest.approx(1e3 * 20.0034 / 3, abs=1e-3)


# ------------------------------------------------------------------ an idle pass rests for its lookups' answers


def test_an_idle_pass_with_a_lookup_pending_rests_until_the_answer_lands_and_a_busy_one_never(monkeypatch):
    from membrain_async.runtime import Completion
    from membrain_async.vllm.scheduler import lookups as lookups_mod

    # Far longer than the test may take: only an answer landing can end the rest (pytest-timeout guards it).
    monkeypatch.setattr(lookups_mod, "IDLE_WAIT_S", 600.0)
    lk = lookups_mod.Lookups(FakeSchedulerStore(), count=lambda *a: None, observe=lambda *a: None)
    lk.end_pass(idle=True)  # nothing waits for an answer: no rest
    lk.waited()
    lk.end_pass(idle=False)  # something else ran this step: no rest either
    lk.waited()
    order = []

    def answer() -> None:
        order.append("answered")
        lk.answers.push(Completion("lookup", ("r1",), 3, "ok"))

    timer = threading.Timer(0.05, answer)
    timer.start()
    lk.end_pass(idle=True)  # nothing was scheduled and r1 waits: rest until its answer
    order.append("rested")
    timer.join()
    assert order == ["answered", "rested"]

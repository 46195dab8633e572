"""The hand-off wait's re-polls are spaced (scheduler/handoff.py): no engine, no server, no sleeps.

A decode request waiting for its prefill's uploads used to look up at every engine pass: an idle engine
passes every millisecond or so, and one wait cost thousands of lookups. The clock here is the test's
(Clock), the store an in-memory one that answers between passes, as a loopback server would.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

from membrain_async.vllm.scheduler.handoff import FIRST_POLL_S, MAX_POLL_S, Handoff  # noqa: E402
from membrain_async.vllm.shared.roles import CONSUMER  # noqa: E402

from .test_role_policy import announced, handed_off, one_pass, scheduler  # noqa: E402
from .test_scheduler_policy import BS, Clock, store_leading  # noqa: E402

PASS_S = 0.001  # an idle engine's pass


def test_the_interval_doubles_from_the_first_poll_to_the_cap():
    h = Handoff(blocks=5, wait_s=10.0, deadline=10.0)
    intervals = []
    for _ in range(12):
        at, h = h.next_poll(0.0)
        intervals.append(at)
    assert intervals[0] == FIRST_POLL_S
    assert all(b == min(2 * a, MAX_POLL_S) for a, b in zip(intervals, intervals[1:]))
    assert intervals[-1] == MAX_POLL_S


def test_the_next_poll_is_never_after_the_deadline():
    h = Handoff(blocks=5, wait_s=1.0, deadline=1.0, interval=MAX_POLL_S)
    at, _ = h.next_poll(0.95)
    assert at == 1.0  # the last look is taken when the wait would end anyway


def test_progress_restarts_the_deadline_not_the_interval():
    h = Handoff(blocks=5, wait_s=2.0, deadline=2.0, interval=0.064)
    moved = h.answered(3, now=1.5)
    assert (moved.seen, moved.deadline, moved.interval) == (3, 3.5, 0.064)
    assert moved.answered(3, now=3.0) is moved  # no progress: nothing changes
    assert moved.expired(3.5) and not moved.expired(3.49)


def passes_until_answered(sched, req, clock: Clock, limit: int) -> tuple[int, tuple]:
    for i in range(limit):
        got = one_pass(sched, req, clock, PASS_S)
        if got[0] is not None:
            return i, got
    raise AssertionError("still waiting")


def test_a_wait_that_times_out_sends_a_few_dozen_lookups_not_one_per_pass():
    clock = Clock()
    sched = scheduler(CONSUMER, clock, handoff_deadline=5.0)
    req = handed_off("d1", announced(5))
    store_leading(sched, req, 2)  # the prefill died after uploading 2 of 5
    sched.on_new_request(req)
    n, got = passes_until_answered(sched, req, clock, limit=10_000)
    assert got == (2 * BS, True)  # what is there is loaded, the rest computed
    assert n >= 5.0 / PASS_S  # about 5000 passes waited
    stats = sched.take_stats()
    assert stats["handoff_timeouts"] == 1
    # Doubling to the cap, then one per cap until the deadline (plus the one at the deadline itself).
    bound = math.ceil(math.log2(MAX_POLL_S / FIRST_POLL_S)) + 1 + math.ceil(5.0 / MAX_POLL_S) + 1
    assert stats["handoff_polls"] <= bound < 60
    assert len(sched.store.sent) == stats["handoff_polls"] + 1  # and the first lookup
    sched.shutdown()


def test_no_lookup_goes_out_before_the_next_poll_is_due():
    clock = Clock()
    sched = scheduler(CONSUMER, clock)
    req = handed_off("d1", announced(5))
    store_leading(sched, req, 2)
    sched.on_new_request(req)
    assert one_pass(sched, req) == (None, False)  # the first lookup: sent and answered (2 of 5)
    sent = len(sched.store.sent)
    # Each pass asks, then time moves on.
    assert one_pass(sched, req, clock, FIRST_POLL_S / 2) == (None, False)  # 2 of 5: a re-poll is planned
    assert one_pass(sched, req, clock, FIRST_POLL_S / 4) == (None, False)  # half the interval: not due
    assert one_pass(sched, req) == (None, False)  # 3/4 of it: not due
    assert len(sched.store.sent) == sent
    clock.advance(FIRST_POLL_S / 2)
    assert one_pass(sched, req) == (None, False)  # past the interval: it goes out
    assert len(sched.store.sent) == sent + 1
    sched.shutdown()


def test_blocks_that_land_while_waiting_are_loaded_at_the_next_poll():
    clock = Clock()
    sched = scheduler(CONSUMER, clock)
    req = handed_off("d1", announced(5))
    store_leading(sched, req, 2)
    sched.on_new_request(req)
    for _ in range(200):  # 0.2 s of idle passes: the interval reached the cap
        assert one_pass(sched, req, clock, PASS_S) == (None, False)
    store_leading(sched, req, 5)  # the rest lands
    n, got = passes_until_answered(sched, req, clock, limit=1000)
    assert got == (5 * BS, True)
    # Found within one capped interval (and the passes a lookup's answer takes to come back).
    assert n <= MAX_POLL_S / PASS_S + 3
    assert "handoff_timeouts" not in sched.take_stats()
    sched.shutdown()

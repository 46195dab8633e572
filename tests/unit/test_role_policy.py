"""vLLM's KV roles and the prefill-to-decode hand-off, on the scheduler half alone (no engine, no server).

A `kv_producer` (prefill instance) saves and never looks up or loads; a `kv_consumer` (decode instance)
loads and never saves; `kv_both` does both (tests/unit/test_scheduler_policy.py). A producer's finished request
announces its prompt's blocks in kv_transfer_params; a decode request carrying that announcement looks up
again until the store holds them, up to VLLM_MEMBRAIN_HANDOFF_DEADLINE. The store and the clock are the
test's (testing.fake_store, Clock): nothing sleeps.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from membrain_async.vllm.scheduler.handoff import FIRST_POLL_S, PARAM  # noqa: E402
from membrain_async.vllm.shared.roles import BOTH, CONSUMER, PRODUCER, Role, effective_role, parse_role  # noqa: E402

from .test_scheduler_policy import BS, Clock, answer, blocks, make_scheduler, plan_saves, request, step, store_leading  # noqa: E402


def scheduler(role: str, clock: Clock | None = None, **overrides):
    sched = make_scheduler(clock, **overrides)
    sched.role = Role(role)
    return sched


def handed_off(req_id: str, params: dict, n_tokens: int = 5 * BS + 7) -> Request:
    """A decode request as a proxy sends it: the prefill's kv_transfer_params in its sampling params."""
    sp = SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": params})
    return Request(req_id, list(range(1000, 1000 + n_tokens)), sp, None)


def test_role_names_and_what_each_role_does():
    assert parse_role("producer") == PRODUCER and parse_role("KV_CONSUMER") == CONSUMER and parse_role("") == ""
    with pytest.raises(ValueError):
        parse_role("prefill")
    assert (Role(BOTH).loads, Role(BOTH).saves) == (True, True)
    assert (Role(PRODUCER).loads, Role(PRODUCER).saves) == (False, True)
    assert (Role(CONSUMER).loads, Role(CONSUMER).saves) == (True, False)
    # Membrain's setting wins when set (the plugin writes it into kv_role); else vLLM's kv_role.
    assert effective_role("kv_consumer", "").name == CONSUMER
    assert effective_role("kv_both", PRODUCER).name == PRODUCER
    assert effective_role(None, "").name == BOTH


def test_a_producer_never_loads_and_saves_what_the_store_lacks():
    sched = scheduler(PRODUCER)
    req = request("r1")
    hashes = store_leading(sched, req, 3)  # the store already holds 3 of its blocks
    sched.on_new_request(req)
    assert answer(sched, req) == (0, False)  # a hit for kv_both: (3 * BS, True)
    sched.update_state_after_alloc(req, blocks([7, 3, 9, 4, 5, 6]), 0)
    meta = plan_saves(sched, req, [7, 3, 9, 4, 5, 6])
    assert meta.loads == []
    (save,) = meta.saves
    assert save.hashes == hashes[3:5]
    sched.shutdown()


def test_a_producer_saves_again_what_the_server_lost_since_it_saved_it():
    """Its decode instances wait for every block it announces: a block the server evicted must come back."""
    sched = scheduler(PRODUCER)
    first = request("r1")
    sched.on_new_request(first)
    assert answer(sched, first) == (0, False)
    sched.update_state_after_alloc(first, blocks([7, 3, 9, 4, 5, 6]), 0)
    hashes = plan_saves(sched, first, [7, 3, 9, 4, 5, 6]).saves[0].hashes
    sched.request_finished(first, [])
    sched.store.put(sched.keys_for(hashes[:2]))  # the server kept 2 of the 5 blocks
    again = request("r2")
    sched.on_new_request(again)
    assert answer(sched, again) == (0, False)
    sched.update_state_after_alloc(again, blocks([8, 1, 2, 10, 11, 12]), 0)
    assert plan_saves(sched, again, [8, 1, 2, 10, 11, 12]).saves[0].hashes == hashes[2:5]
    sched.shutdown()


def test_a_consumer_loads_and_never_saves():
    sched = scheduler(CONSUMER)
    req = request("r1")
    hashes = store_leading(sched, req, 3)
    sched.on_new_request(req)
    assert answer(sched, req) == (3 * BS, True)
    ids = [7, 3, 9, 4, 5, 6]
    sched.update_state_after_alloc(req, blocks(ids), 3 * BS)
    assert step(sched).loads[0].hashes == hashes[:3]
    req.num_computed_tokens = 3 * BS
    assert plan_saves(sched, req, ids).saves == []  # blocks 3 and 4 computed here: left to the producer
    assert sched.request_finished(req, ids) == (False, None)
    sched.shutdown()


def test_kv_both_saves_what_it_computed_and_announces_nothing():
    sched = scheduler(BOTH)
    req = request("r1")
    sched.on_new_request(req)
    assert answer(sched, req) == (0, False)
    sched.update_state_after_alloc(req, blocks([7, 3, 9, 4, 5, 6]), 0)
    assert len(plan_saves(sched, req, [7, 3, 9, 4, 5, 6]).saves[0].hashes) == 5
    assert sched.request_finished(req, [7, 3, 9, 4, 5, 6]) == (False, None)
    sched.shutdown()


def test_a_producer_announces_the_prompt_blocks_it_computed():
    sched = scheduler(PRODUCER)
    req = request("r1")  # 5 full blocks and 7 tokens
    sched.on_new_request(req)
    req.num_computed_tokens = req.num_tokens
    delay, params = sched.request_finished(req, [7, 3, 9, 4, 5, 6])
    assert delay is False  # pages are copied out in the step that plans them: nothing to hold
    assert params == {PARAM: {"blocks": 5, "fingerprint": "fp"}}
    sched.shutdown()


def announced(blocks_: int, fingerprint: str = "fp") -> dict:
    return {PARAM: {"blocks": blocks_, "fingerprint": fingerprint}}


def test_a_handed_off_request_waits_until_the_store_holds_every_announced_block():
    clock = Clock()
    sched = scheduler(CONSUMER, clock)
    req = handed_off("d1", announced(5))
    store_leading(sched, req, 2)  # the prefill's uploads are under way: 2 of 5 in
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    sched.store.answer()
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # 2 < 5: asked again, after a back-off
    step(sched)
    assert sched.store.pending == 0  # not at the very next pass (tests/unit/test_handoff_backoff.py)
    clock.advance(FIRST_POLL_S)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    step(sched)
    assert sched.store.pending == 1
    store_leading(sched, req, 5)  # the rest lands
    sched.store.answer()
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == (5 * BS, True)
    assert sched.take_stats()["handoff_polls"] == 1
    sched.shutdown()


def one_pass(sched, req, clock: Clock | None = None, advance: float = 0.0):
    """vLLM asks once; the store then answers what was sent; the pass ends; time moves on."""
    got = sched.get_num_new_matched_tokens(req, 0)
    sched.store.answer()
    step(sched)
    if clock is not None:
        clock.advance(advance)
    return got


def test_a_handed_off_request_stops_waiting_when_the_count_stands_still_and_loads_what_is_there():
    clock = Clock()
    sched = scheduler(CONSUMER, clock, handoff_deadline=2.0)
    req = handed_off("d1", announced(5))
    store_leading(sched, req, 2)  # the prefill died after uploading 2 of 5
    sched.on_new_request(req)
    started = clock.now
    got = [one_pass(sched, req, clock, 0.5) for _ in range(8)]
    first = next(i for i, g in enumerate(got) if g != (None, False))
    assert got[first] == (2 * BS, True)  # the rest is computed
    # The store first answered 2 at pass 1 (0.5 s): the request gave up 2 s after that, within a pass or two.
    gave_up_at = started + 0.5 * first
    assert 2.0 <= gave_up_at - (started + 0.5) <= 2.0 + 2 * 0.5
    stats = sched.take_stats()
    assert stats["handoff_timeouts"] == 1 and stats["handoff_polls"] >= 1
    sched.shutdown()


def test_each_block_that_lands_restarts_the_wait():
    """A prefill still uploading under load keeps its decode waiting; the wait ends when the count stands
    still for the deadline, not at a fixed time after arrival."""
    clock = Clock()
    sched = scheduler(CONSUMER, clock, handoff_deadline=2.0)
    req = handed_off("d1", announced(5))
    sched.on_new_request(req)
    for landed in (1, 2, 3, 4):  # one more block every 1.5 s: 6 s in all, past 2 s after arrival
        store_leading(sched, req, landed)
        for _ in range(15):  # passes 0.1 s apart
            assert one_pass(sched, req, clock, 0.1) == (None, False)
    store_leading(sched, req, 5)
    got = [one_pass(sched, req, clock, 0.1) for _ in range(5)]  # a re-poll is due within MAX_POLL_S
    assert (5 * BS, True) in got
    assert "handoff_timeouts" not in sched.take_stats()
    sched.shutdown()


def test_a_lookup_past_its_deadline_is_asked_again_while_a_handoff_is_pending():
    """An engine's first lookup may be slow (first connection, a busy host): with a prefill's word that the
    blocks are coming, that is no miss."""
    clock = Clock()
    sched = scheduler(CONSUMER, clock, lookup_deadline=1.0)
    req = handed_off("d1", announced(5))
    store_leading(sched, req, 5)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # sent; the store is slow to answer
    step(sched)
    clock.advance(1.5)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # past the lookup deadline: asked again
    step(sched)
    clock.advance(FIRST_POLL_S)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # the re-poll goes out
    step(sched)
    assert sched.store.pending == 2  # the slow lookup and the re-poll
    assert answer(sched, req) == (5 * BS, True)  # for a kv_both request without a hand-off: (0, False)
    assert sched.take_stats()["handoff_polls"] == 1
    sched.shutdown()


def test_a_handoff_this_instance_holds_in_its_own_prefix_cache_is_not_waited_for():
    sched = scheduler(CONSUMER)
    req = handed_off("d1", announced(5))
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 5 * BS) == (None, False)
    sched.store.answer()
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 5 * BS) == (0, False)  # the store holds none: no matter
    assert "handoff_polls" not in sched.take_stats()
    sched.shutdown()


@pytest.mark.parametrize("case", ["no_handoff", "other_kv", "server_down"])
def test_nothing_is_waited_for_without_a_handoff_for_this_kv_or_a_server_to_ask(case):
    sched = scheduler(CONSUMER)
    params = {"no_handoff": {}, "other_kv": announced(5, "another-fingerprint"), "server_down": announced(5)}[case]
    req = handed_off("d1", params)
    store_leading(sched, req, 2)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    sched.store.answer(outcome="unavailable" if case == "server_down" else "ok")
    step(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == ((0, False) if case == "server_down" else (2 * BS, True))
    assert "handoff_polls" not in sched.take_stats()
    sched.shutdown()


def test_a_handoff_asks_for_no_more_than_a_decode_request_may_load():
    """A prompt of exactly 5 blocks: the last token is always computed, so 4 blocks are all it can load."""
    sched = scheduler(CONSUMER)
    req = handed_off("d1", announced(5), n_tokens=5 * BS)
    store_leading(sched, req, 4)
    sched.on_new_request(req)
    assert answer(sched, req) == (4 * BS, True)
    assert "handoff_polls" not in sched.take_stats()
    sched.shutdown()

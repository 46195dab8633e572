"""The save and memory policies without an engine: what is saved once, what is never uploaded, what is held.

Like vLLM's tests of its OffloadingManager: the rules are driven directly, with made-up block ids and hashes.
"""

from __future__ import annotations

import pytest
import torch

from membrain_async.config import ConnectorConfig
from membrain_async.vllm import memory_budget as mb
from membrain_async import codec
from membrain_async.vllm.worker.movers import DevicePageMover, StreamOps
from membrain_async.vllm.worker.pages import PageLayout, SaveBudget
from membrain_async.vllm.scheduler.save_ledger import AWAIT_STEPS_MAX, SaveLedger

# ---------------------------------------------------------------------------------------- once per instance


def test_a_block_planned_by_one_request_is_not_planned_by_another_that_missed_in_the_same_window():
    ledger = SaveLedger()
    lookup_x = ledger.now()
    lookup_y = ledger.now()  # both lookups sent before either request saved anything
    assert ledger.wanted("h1", lookup_x)
    ledger.plan(1, "x", 0, ["h1", "h2"], [10, 11])
    # y's lookup also said "missing" for h1/h2, but it was answered before x's save: not a reason to copy again.
    assert not ledger.wanted("h1", lookup_y)
    assert not ledger.wanted("h2", None)


def test_a_lookup_sent_after_our_save_that_still_says_missing_earns_a_resave():
    ledger = SaveLedger()
    ledger.plan(1, "x", 0, ["h1"], [10])
    later_lookup = ledger.now()  # sent after x planned h1: "missing" now means the copy is gone
    assert ledger.wanted("h1", later_lookup)
    assert not ledger.wanted("h1", None)  # beyond what a lookup covered, our earlier save stands


def test_recent_saves_are_bounded():
    ledger = SaveLedger(recent_limit=4)
    for i in range(10):
        ledger.plan(i, "r", i, [f"h{i}"], list(range(i + 1)))
    assert ledger.wanted("h0", None) and not ledger.wanted("h9", None)


# ---------------------------------------------------------------------------------------- never over unfilled blocks


def test_saves_of_requests_whose_blocks_include_an_invalid_one_are_discarded_on_every_rank():
    ledger = SaveLedger()
    # x loaded blocks 10..13 and computed 14; y shares x's prefix blocks 10..13 (local prefix cache) and
    # computed 20, 21; z is unrelated.
    ledger.plan(5, "x", 4, ["hx4"], [10, 11, 12, 13, 14])
    ledger.plan(5, "y", 4, ["hy4", "hy5"], [10, 11, 12, 13, 20, 21])
    ledger.plan(5, "z", 2, ["hz2"], [30, 31, 32])
    discarded = ledger.settle(5, {12})  # block 12 failed on one rank
    assert {d.req_id for d in discarded} == {"x", "y"}
    (verdict,) = ledger.take_verdicts()
    assert verdict.step == 5 and verdict.discard == ["x", "y"]
    # Discarded hashes are forgotten, so the recompute saves them; z's stand.
    assert ledger.wanted("hy5", None) and ledger.wanted("hx4", None)
    assert not ledger.wanted("hz2", None)


def test_a_block_after_the_saved_ones_does_not_discard_them():
    ledger = SaveLedger()
    ledger.plan(3, "x", 0, ["h0", "h1"], [10, 11, 12, 13])
    assert ledger.settle(3, {13}) == []  # block 13 is not read by blocks 0 and 1
    assert ledger.take_verdicts()[0].discard == []


def test_a_clean_step_gets_an_empty_verdict_and_the_engine_steps_once_more_to_send_it():
    ledger = SaveLedger()
    ledger.plan(1, "x", 0, ["h0"], [7])
    assert not ledger.verdicts_pending()
    assert ledger.settle(1, set()) == []
    assert ledger.verdicts_pending()
    assert [v.step for v in ledger.take_verdicts()] == [1]
    assert not ledger.verdicts_pending()
    assert ledger.settle(2, set()) == [] and not ledger.verdicts_pending()  # nothing planned: nothing to say


def test_steps_whose_output_never_came_are_forgotten_not_confirmed():
    ledger = SaveLedger()
    ledger.plan(1, "x", 0, ["h0"], [7])
    ledger.plan(2 + AWAIT_STEPS_MAX, "y", 0, ["h1"], [8])
    assert ledger.awaiting_steps() == [2 + AWAIT_STEPS_MAX]
    assert ledger.wanted("h0", None)  # may be saved by a later request
    assert ledger.take_verdicts() == []  # and no verdict ever confirms step 1


# ---------------------------------------------------------------------------------------- memory held


def test_the_save_budget_bounds_what_saves_hold_and_refuses_past_it():
    budget = SaveBudget(10_000)
    assert budget.reserve(4000) and budget.reserve(4000)
    assert not budget.reserve(4000)  # 12,000 > 10,000: the save is dropped, never gathered
    assert budget.held == 8000  # a refusal holds nothing
    budget.release(4000)
    assert budget.reserve(6000) and not budget.reserve(1)
    assert budget.peak == 10_000


def test_worker_buffers_add_up_to_the_settings():
    cfg = ConnectorConfig.from_sources(env={}, overrides={
        "write_behind_bytes": 64 << 20, "prefetch_bytes": 32 << 20, "step_load_bytes": 16 << 20,
        "local_cache_bytes": 8 << 20})
    assert sum(mb.worker_buffers(cfg).values()) == 120 << 20
    assert "at most 120 MiB per rank" in mb.describe_buffers(cfg)


def test_kv_room_leaves_a_local_servers_capacity_and_the_buffers():
    total = 24 * mb.GiB
    room = mb.plan_kv_room(0.92, total, 2 * mb.GiB, 512 * mb.MiB, ranks=2)
    assert room.fits and room.reserved == 3 * mb.GiB
    assert room.fraction == pytest.approx(0.92 - 3 / 24, abs=1e-4)
    refused = mb.plan_kv_room(0.92, total, 23 * mb.GiB, 0, ranks=1)
    assert not refused.fits and refused.fraction == 0.92 and "CANNOT" in refused.message


def test_local_endpoints_are_told_from_remote_ones():
    assert mb.is_local_endpoint("http://127.0.0.1:9201")
    assert mb.is_local_endpoint("http://localhost:9201")
    assert not mb.is_local_endpoint("http://192.0.2.1:9201")  # TEST-NET: never this host
    assert not mb.is_local_endpoint("http://no-such-host.invalid:9201")


# ---------------------------------------------------------------------------------------- CUDA save ordering


class _Event:
    def __init__(self, log, stream, n):
        self.log, self.stream, self.n = log, stream, n

    def query(self):
        return True

    def synchronize(self):
        pass


class _Stream:
    def __init__(self, name, log):
        self.name, self.log, self.events = name, log, 0

    def record_event(self, event=None):
        self.events += 1
        ev = _Event(self.log, self.name, self.events)
        self.log.append(("record", self.name, self.events))
        return ev

    def wait_event(self, ev):
        self.log.append(("wait", self.name, ev.stream, ev.n))

    def __enter__(self):
        self.log.append(("enter", self.name))

    def __exit__(self, *exc):
        self.log.append(("exit", self.name))


class RecordingOps(StreamOps):
    """CUDA's stream calls, recorded and run synchronously on CPU."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.log: list = []
        self.compute = _Stream("compute", self.log)
        self.made = 0

    def new_stream(self):
        self.made += 1
        return _Stream(["save", "load"][self.made - 1], self.log)

    def current_stream(self):
        return self.compute

    def on(self, stream):
        return stream

    def record_stream(self, tensor, stream):
        self.log.append(("record_stream", stream.name))


def test_the_compute_stream_waits_for_the_save_gather_before_running_anything_else():
    kv = {f"l{i}": torch.randn(8, 2, 32, 64).to(torch.bfloat16) for i in range(2)}
    layout = PageLayout.from_kv_caches(kv, 8, "cuda-pages")
    ops = RecordingOps()
    mover = DevicePageMover(layout, torch.device("cpu"), ops)
    host, _ = mover.start_save([3, 5])
    log = ops.log
    # The save stream starts after the forward (an event the compute stream recorded) ...
    assert log[0] == ("record", "compute", 1) and log[1] == ("wait", "save", "compute", 1)
    # ... records "gathered" right after the gathers and before the host copy's event ...
    gathered, copied = [e for e in log if e[0] == "record" and e[1] == "save"]
    assert gathered[2] == 1 and copied[2] == 2
    # ... and the compute stream waits for the gather, not for the (slower) copy to host.
    assert ("wait", "compute", "save", 1) in log and ("wait", "compute", "save", 2) not in log
    assert log.index(("wait", "compute", "save", 1)) > log.index(("exit", "save"))
    assert ("record_stream", "save") in log  # the gather buffer is not recycled while the save stream uses it
    page = torch.frombuffer(mover.slot(host, 0), dtype=torch.uint8)[codec.HEADER_SIZE:]
    assert torch.equal(page.view(torch.bfloat16).view(2, 2, 32, 64)[1], kv["l1"][3])


def test_loads_wait_for_the_compute_stream_and_for_their_own_copy_only():
    kv = {f"l{i}": torch.zeros(8, 2, 32, 64, dtype=torch.bfloat16) for i in range(2)}
    layout = PageLayout.from_kv_caches(kv, 8, "cuda-pages")
    ops = RecordingOps()
    mover = DevicePageMover(layout, torch.device("cpu"), ops)
    host = mover.host_buffer(1)
    mover.load([2], host)
    assert ops.log[:2] == [("record", "compute", 1), ("wait", "load", "compute", 1)]
    assert ("record_stream", "load") in ops.log
    # The copy and the scatters run on the load stream; the compute stream is never made to wait.
    assert ("enter", "load") in ops.log and not [e for e in ops.log if e[:2] == ("wait", "compute")]

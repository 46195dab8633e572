"""Per-namespace quotas (a share of capacity, set with the namespace's token in the auth file): a namespace
past its share evicts its own values first, so one tenant's flood leaves the others' hits alone."""

import orjson
import pytest

from membrain_async.client import MembrainClient
from membrain_async.server import embedded_server
from membrain_async.server.auth import Authorizer
from membrain_async.server.store import Store

VALUE = bytes(64)
CAPACITY_VALUES = 800


def _auth_file(tmp_path, entries) -> str:
    path = tmp_path / "auth.json"
    path.write_bytes(orjson.dumps({"tokens": entries}))
    return str(path)


def test_quota_parsing(tmp_path):
    auth = Authorizer.from_file(_auth_file(tmp_path, [
        {"token": "tenant-a-secret", "namespaces": ["a"], "quota": "25%"},
        {"token": "tenant-b-secret", "namespaces": ["b", "c"], "quota": 0.5},
        {"token": "tenant-b-reader", "namespaces": ["b"], "scope": "read", "quota": 0.1},  # smallest wins
        {"token": "tenant-d-secret", "namespaces": ["d"]},
    ]))
    assert auth.quotas == {"a": 0.25, "b": 0.1, "c": 0.5}
    for bad in (0, 1.5, "-5%", "lots", True):
        with pytest.raises(ValueError, match="quota must be a share of capacity"):
            Authorizer.from_file(_auth_file(tmp_path, [{"token": "tenant-x-secret", "namespaces": ["x"], "quota": bad}]))
    with pytest.raises(ValueError, match="needs named namespaces"):
        Authorizer.from_file(_auth_file(tmp_path, [{"token": "ops-secret-x", "namespaces": ["*"], "quota": 0.5}]))


def _tenant_a_round(store: Store, r: int) -> tuple[int, int]:
    """Tenant a reads its working set (half the capacity) each round and adds a few new blocks."""
    hits = tries = 0
    for i in list(range(400)) + [1000 + r * 10 + j for j in range(10)]:
        tries += 1
        if store.prefix_count("a", [f"a-{i}"]):
            hits += 1
        else:
            store.put("a", f"a-{i}", VALUE)
    return hits, tries


def _run(policy: str, flood: bool) -> tuple[float, Store]:
    store = Store(CAPACITY_VALUES * len(VALUE), policy=policy)
    store.set_quota("b", CAPACITY_VALUES * len(VALUE) // 4)
    hits = tries = 0
    for r in range(20):
        h, t = _tenant_a_round(store, r)
        hits, tries = hits + h, tries + t
        if flood:  # tenant b writes 3x its quota of new blocks every round, each twice (past any admission filter)
            for i in range(3 * CAPACITY_VALUES // 4):
                for _ in range(2):
                    store.put("b", f"b-{r}-{i}", VALUE)
    return hits / tries, store


@pytest.mark.parametrize("policy", ["lru", "adaptive"])
def test_a_flood_at_three_times_its_quota_leaves_another_tenants_hit_ratio_unchanged(policy):
    quiet, _ = _run(policy, flood=False)
    flooded, store = _run(policy, flood=True)
    assert flooded == quiet
    b = store.namespaces["b"]
    assert b.bytes <= store.quotas["b"]
    assert b.evictions > 0 and store.namespaces["a"].evictions == 0


def test_without_a_quota_the_flood_evicts_the_other_tenant():
    """The same flood with no quota: the shared LRU gives tenant a's blocks away (what quotas prevent)."""
    store = Store(CAPACITY_VALUES * len(VALUE), policy="lru")
    _tenant_a_round(store, 0)
    for i in range(3 * CAPACITY_VALUES // 4):
        store.put("b", f"b-{i}", VALUE)
    assert store.namespaces["a"].evictions > 0


def test_a_namespace_under_its_quota_takes_free_room_and_global_lru_applies():
    store = Store(100 * len(VALUE), policy="lru")
    store.set_quota("b", 50 * len(VALUE))
    for i in range(50):
        store.put("b", f"b-{i}", VALUE)
    for i in range(80):  # a has no quota: fills up, and the global LRU evicts b's oldest for it
        store.put("a", f"a-{i}", VALUE)
    assert store.namespaces["a"].keys == 80 and store.namespaces["b"].keys == 20
    store.touch("b", "b-30")  # b's oldest becomes the newest of all
    store.put("b", "b-new", VALUE)  # b is under its quota: the global LRU victim is b-31, the oldest of all
    assert store.contains("b", "b-30") and not store.contains("b", "b-31")
    store.put("a", "a-new", VALUE)
    assert not store.contains("b", "b-32") and store.namespaces["a"].evictions == 0


@pytest.mark.anyio
async def test_server_quota_from_the_auth_file(tmp_path):
    auth = _auth_file(tmp_path, [
        {"token": "tenant-a-secret", "namespaces": ["a"]},
        {"token": "tenant-b-secret", "namespaces": ["b"], "quota": "25%"},
        {"token": "ops-secret-444", "namespaces": ["*"], "scope": "read"},
    ])
    value = bytes(4096)
    with embedded_server(capacity=400 * 4096, auth_file=auth, eviction="lru") as srv:
        async with MembrainClient(srv.url, namespace="a", token="tenant-a-secret") as a, \
                MembrainClient(srv.url, namespace="b", token="tenant-b-secret") as b, \
                MembrainClient(srv.url, namespace="a", token="ops-secret-444") as ops:
            keys_a = [f"a{i}" for i in range(200)]
            assert await a.put_many(keys_a, [value] * 200) == 200
            for r in range(3):  # 3x b's quota of 100 values
                assert await b.put_many([f"b{r}-{i}" for i in range(100)], [value] * 100) == 100
            assert await a.lookup(keys_a) == 200
            stats = await ops.server_stats()
    ns = stats["namespaces"]
    assert ns["b"]["quota"] == 100 * 4096 and ns["b"]["bytes"] <= 100 * 4096 and ns["b"]["evictions"] == 200
    assert ns["a"]["evictions"] == 0 and ns["a"]["hits"] == 200 and "quota" not in ns["a"]

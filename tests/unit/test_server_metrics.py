"""The server's /metrics against real `membrain serve` processes: histograms, build info, arena figures,
misses counted apart from errors."""

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from membrain_async import __version__
from membrain_async.client import MembrainClient
from membrain_async.server import embedded_server
from membrain_async.server.arena import SLAB_BYTES, size_class
from membrain_async.telemetry import LATENCY_BUCKETS_S

OPS_TOKEN = "ops-secret-metrics"
TENANT_TOKEN = "tenant-secret-metrics"
AUTH = {"tokens": [{"token": OPS_TOKEN, "namespaces": ["*"], "scope": "readwrite"},
                   {"token": TENANT_TOKEN, "namespaces": ["t"], "scope": "readwrite"}]}
VALUE = 65000  # 16 of them fill the smallest capacity allowed, 1 MiB


def scrape(url: str, token: str = OPS_TOKEN) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape: (sample name, sorted labels) -> value. Parsing it at all checks the format."""
    r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def served(tmp_path):
    """A `membrain serve` process with an auth file and a disk tier; RAM holds 16 values of VALUE bytes."""
    auth = tmp_path / "auth.json"
    auth.write_bytes(orjson.dumps(AUTH))
    with embedded_server(mode="subprocess", capacity=16 * size_class(VALUE), auth_file=str(auth),
                         disk_path=str(tmp_path / "disk"), disk_capacity="64MiB", eviction="lru") as srv:
        yield srv


def _h(token=OPS_TOKEN):
    return {"authorization": f"Bearer {token}"}


def test_metrics_keep_their_auth(served):
    assert httpx.get(f"{served.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{served.url}/metrics", headers=_h(TENANT_TOKEN), timeout=10).status_code == 403
    scrape(served.url)


def test_build_info_process_metrics_and_arena_figures(served):
    with httpx.Client(base_url=served.url, headers=_h()) as c:
        for i in range(3):
            assert c.put(f"/memory/t/k{i}", content=bytes(VALUE)).status_code == 201
    m = scrape(served.url)
    assert value(m, "membrain_build_info", version=__version__) == 1
    assert value(m, "process_resident_memory_bytes") > 0 and value(m, "process_cpu_seconds_total") > 0
    capacity = 16 * size_class(VALUE)
    assert value(m, "membrain_tier_capacity_bytes", tier="ram") == capacity
    assert value(m, "membrain_tier_bytes", tier="ram") == 3 * VALUE
    mapped = value(m, "membrain_arena_mapped_bytes")
    assert mapped == min(SLAB_BYTES, capacity) // size_class(VALUE) * size_class(VALUE)
    assert value(m, "membrain_arena_free_slot_bytes") == mapped - 3 * size_class(VALUE)
    assert value(m, "membrain_arena_slabs") == 1 and value(m, "membrain_arena_size_classes") == 1
    assert value(m, "membrain_arena_slabs_created_total") == 1
    # One figure, one series: the store's bytes are not repeated under other names.
    assert not [k for k in m if k[0] in ("membrain_used_bytes", "membrain_capacity_bytes")]


def test_a_miss_is_counted_as_a_miss_and_a_refusal_as_an_error(served):
    with httpx.Client(base_url=served.url, headers=_h()) as c:
        assert c.put("/memory/t/here", content=b"v").status_code == 201
        assert c.get("/memory/t/here").status_code == 200
        assert c.get("/memory/t/absent").status_code == 404
        assert c.head("/memory/t/absent").status_code == 404
        assert c.get("/no/such/route").status_code == 404
        assert c.get("/memory/t/here", headers=_h("not-a-token")).status_code == 401

    async def bulk():
        async with MembrainClient(served.url, namespace="t", token=OPS_TOKEN, timeout=10) as client:
            assert await client.get_many(["here", "absent"]) == [b"v", None]
            assert await client.lookup(["here", "absent", "also-absent"]) == 1

    anyio.run(bulk)
    m = scrape(served.url)
    keys = {(op, result): value(m, "membrain_requested_keys_total", op=op, result=result)
            for op, result in (("get", "hit"), ("get", "miss"), ("head", "miss"), ("lookup", "hit"),
                               ("lookup", "miss"))}
    assert keys == {("get", "hit"): 2, ("get", "miss"): 2, ("head", "miss"): 1, ("lookup", "hit"): 1,
                    ("lookup", "miss"): 2}
    errors = {k[1]: v for k, v in m.items() if k[0] == "membrain_request_errors_total"}
    assert errors == {(("op", "unknown"), ("protocol", "http"), ("status", "404")): 1,
                      (("op", "get"), ("protocol", "http"), ("status", "401")): 1}
    assert value(m, "membrain_requests_total", protocol="http", op="get") == 3
    assert value(m, "membrain_requests_total", protocol="bulk", op="lookup") == 1
    stats = httpx.get(f"{served.url}/v1/stats", headers=_h(), timeout=10).json()["server"]
    assert stats["errors"] == {"404": 1, "401": 1}


def test_latency_histograms_per_op_and_tier(served):
    with httpx.Client(base_url=served.url, headers=_h()) as c:
        for i in range(40):  # 2.5x RAM: the first ones end up on disk only
            assert c.put(f"/memory/t/v{i}", content=bytes([i]) * VALUE).status_code == 201
        stats = c.get("/v1/stats").json()
        assert stats["tiers"]["ram"]["evictions"] > 0
        got = c.get("/memory/t/v0")
        assert got.status_code == 200 and got.content == bytes([0]) * VALUE
        assert c.post("/v1/lookup/t", json={"keys": ["v39", "v38"]}).json() == {"count": 2}
    m = scrape(served.url)
    bounds = [*map(str, LATENCY_BUCKETS_S), "+Inf"]
    for op, tier in (("put", "ram"), ("get", "disk"), ("lookup", "ram")):
        buckets = [value(m, "membrain_request_duration_seconds_bucket", op=op, tier=tier, le=b) for b in bounds]
        count = value(m, "membrain_request_duration_seconds_count", op=op, tier=tier)
        assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf is every observation
        assert value(m, "membrain_request_duration_seconds_sum", op=op, tier=tier) > 0
    assert value(m, "membrain_request_duration_seconds_count", op="put", tier="ram") == 40
    assert value(m, "membrain_request_duration_seconds_count", op="get", tier="disk") == 1
    assert value(m, "membrain_request_duration_seconds_count", op="lookup", tier="ram") == 1
    assert value(m, "membrain_disk_io_seconds_count", op="write") >= 1
    assert value(m, "membrain_disk_io_seconds_count", op="read") >= 1
    assert value(m, "membrain_tier_hits_total", tier="disk") == 1
    assert value(m, "membrain_disk_degraded") == 0

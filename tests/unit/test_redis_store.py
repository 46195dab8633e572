"""The Redis transport against real redis-server processes (standalone and a 3+3 Redis Cluster), no engine.

Under asyncio and trio (the runtime's two loops): key mapping and namespaces, slot spreading and one round
trip per node for a lookup, MOVED, credentials and their redaction, a full store, an unreachable one,
and a master killed under the client.
"""

from __future__ import annotations

import shutil

import anyio
import pytest

from membrain_async import codec, scatter
from membrain_async.client import MembrainRequestError, MembrainUnavailable
from membrain_async.client.backends import backend_of, open_client
from membrain_async.client.redis_store import RedisTransport, parse_endpoint, redis_key
from membrain_async.config import ConfigError, ConnectorConfig
from membrain_async.protocol import resp
from membrain_async.testing.redis_servers import RedisCluster, RedisServer, unavailable_reason
from membrain_async.urls import redact_url

from ..harness import free_port

pytest.importorskip("hiredis", reason="the Redis backend needs hiredis (extra `redis`)")
pytestmark = pytest.mark.anyio


def client_for(endpoint: str, **settings):
    return open_client(ConnectorConfig.from_sources(env={}, overrides={"endpoint": endpoint, **settings}))


# ------------------------------------------------------------------ without a server


def test_keys_carry_the_namespace_and_no_hash_tag():
    assert redis_key("tenant-a", "fp-r0-abc") == b"mb:tenant-a:fp-r0-abc"
    assert b"{" not in redis_key("ns", "k")  # names cannot hold braces: the whole key is hashed


def test_slots_follow_redis_cluster_hashing_and_hash_tags():
    assert resp.key_slot(b"foo") == 12182 and resp.key_slot(b"123456789") == 0x31C3 % 16384
    assert resp.key_slot(b"{user1000}.following") == resp.key_slot(b"user1000")
    assert resp.key_slot(b"foo{}bar") == resp.crc16(b"foo{}bar") % 16384  # an empty tag is no tag


def test_commands_pass_big_values_through_uncopied():
    body = memoryview(bytearray(1 << 20))
    parts = resp.encode_value_command(("SET", b"k"), [b"head", body])
    assert parts[0] == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048580\r\nhead" and parts[1] is body and parts[2] == b"\r\n"


def test_redirects_are_parsed():
    assert resp.redirect(resp.ReplyError("MOVED 3999 127.0.0.1:6381")) == resp.Redirect(False, 3999, ("127.0.0.1", 6381))
    assert resp.redirect(resp.ReplyError("ASK 1 h:2")).ask
    assert resp.redirect(resp.ReplyError("ERR wrong")) is None


def test_endpoint_schemes_choose_the_backend_and_are_validated():
    def cfg(ep, **kw):
        return ConnectorConfig.from_sources(env={}, overrides={"endpoint": ep, **kw})

    assert backend_of(cfg("http://h:1")) == "membrain"
    assert backend_of(cfg("redis://h:1")) == backend_of(cfg("rediss+cluster://h:1,rediss+cluster://h:2")) == "redis"
    assert backend_of(cfg("mooncake://h:50051")) == "mooncake"
    with pytest.raises(ConfigError, match="mixes"):
        cfg("http://h:1,redis://h:2")
    with pytest.raises(ConfigError, match="REPLICAS"):
        cfg("redis+cluster://h:1", replicas=2)
    with pytest.raises(ConfigError) as e:
        cfg("memcached://u:hunter2@h:1")
    assert "hunter2" not in str(e.value)
    ep = parse_endpoint(["rediss://bob:s%40cret@h:7/2"])
    assert (ep.tls, ep.db, ep.username, ep.password, ep.cluster) == (True, 2, "bob", "s@cret", False)
    assert "s@cret" not in repr(ep)
    with pytest.raises(ValueError, match="one server"):
        parse_endpoint(["redis://a:1", "redis://b:1"])


def test_a_mooncake_endpoint_without_its_backend_names_the_extra():
    try:
        import membrain_async.client.mooncake_store  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="mooncake"):
            client_for("mooncake://127.0.0.1:50051")
    else:
        pytest.skip("the Mooncake backend is installed here")


def test_passwords_in_urls_are_redacted():
    assert redact_url("redis://bob:hunter2@h:6379/0") == "redis://bob:***@h:6379/0"
    assert redact_url("rediss://:hunter2@h:1") == "rediss://:***@h:1"
    assert redact_url("http://h:9201") == "http://h:9201"
    assert redact_url("redis://h/0?password=hunter2") == "redis://h/0?password=***"
    assert redact_url("rediss://bob:hunter2@h/0?hunter2") == "rediss://bob:***@h/0?***"
    assert redact_url("redis://[::1/0?password=hunter2") == "<unparseable endpoint>"
    assert "hunter2" not in client_for("redis://bob:hunter2@127.0.0.1:1").url


# ------------------------------------------------------------------ one server


async def test_a_standalone_server_stores_under_the_mapped_keys_and_namespaces_are_apart(redis_server):
    c = client_for(redis_server.url, namespace="tenant-a")
    other = client_for(redis_server.url, namespace="tenant-b")
    try:
        keys = [f"blk-{i}" for i in range(8)]
        assert await c.put_many(keys[:5], [[b"hdr", b"x" * 1000]] * 5) == 5  # a value in parts
        assert await c.lookup(keys) == 5 and await other.lookup(keys) == 0
        assert redis_server.cli("STRLEN", "mb:tenant-a:blk-0") == "1003"
        got = await c.get_many(["blk-0", "nope"])
        assert bytes(got[0]) == b"hdr" + b"x" * 1000 and got[1] is None
        bufs = [memoryview(bytearray(2000)), memoryview(bytearray(10))]
        assert await c.get_many_into(["blk-1", "blk-2"], bufs) == [1003, scatter.MISFIT]  # too big: skipped
        assert await c.exists(["blk-4", "blk-5"]) == [True, False]
        assert await c.delete("blk-0") and not await c.delete("blk-0")
        assert await c.health()
    finally:
        await c.aclose()
        await other.aclose()


async def test_payload_checks_apply_to_what_redis_returns(redis_server):
    """Checksum and key tag are checked above the client (vllm/worker/loads.py decodes every loaded block with its
    key): Redis returns the bytes as saved, so a payload copied under another key is refused there."""
    c = client_for(redis_server.url, namespace="tags")
    try:
        payload = codec.encode(b"\x01" * 512, dtype="uint8", shape=(512,), key="block-a")
        assert await c.put("block-a", payload)
        redis_server.cli("COPY", "mb:tags:block-a", "mb:tags:block-b")
        a, b = await c.get_many(["block-a", "block-b"])
        assert bytes(codec.decode(a, key="block-a").data) == b"\x01" * 512
        with pytest.raises(codec.PayloadError):
            codec.decode(b, key="block-b")
    finally:
        await c.aclose()


async def test_a_full_store_refuses_writes_which_are_counted_and_reads_go_on():
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    srv = RedisServer("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    c = client_for(srv.url)
    try:
        stored = await c.put_many([f"k{i}" for i in range(64)], [b"v" * (256 << 10)] * 64)
        assert 0 < stored < 64
        assert c._transport.stats.refused_full == 64 - stored
        assert await c.lookup(["k0"]) == 1 and (await c.get("k0")) is not None
    finally:
        await c.aclose()
        srv.stop()
        shutil.rmtree(srv.dir, ignore_errors=True)


async def test_an_unreachable_server_is_unavailable_then_fails_fast():
    c = client_for(f"redis://127.0.0.1:{free_port()}", breaker_threshold=1, breaker_cooldown=30)
    try:
        with pytest.raises(MembrainUnavailable):
            await c.lookup(["k"])
        with pytest.raises(MembrainUnavailable, match="circuit open"):
            await c.get_many(["k"])
        assert not await c.health()
    finally:
        await c.aclose()


async def test_acl_credentials_from_the_settings_and_refusals_that_never_echo_them():
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    srv = RedisServer("--user", "default", "off", "--user", "vllm", "on", ">s3cret-pw", "~mb:*", "+@all")
    try:
        ok = client_for(srv.url, redis_username="vllm", redis_password="s3cret-pw")
        assert await ok.put("k", b"v") and await ok.lookup(["k"]) == 1
        await ok.aclose()
        bad = client_for(f"redis://vllm:wrong-pw-123@127.0.0.1:{srv.port}")
        with pytest.raises(MembrainRequestError) as e:
            await bad.lookup(["k"])
        assert e.value.status == 401 and "wrong-pw-123" not in str(e.value) and "s3cret" not in str(e.value)
        assert bad.breaker.state == "closed"  # a live server that said no is not a dead one
        await bad.aclose()
    finally:
        srv.stop()
        shutil.rmtree(srv.dir, ignore_errors=True)


async def test_a_redis_url_pointed_at_a_cluster_node_says_so(redis_cluster):
    c = client_for(redis_cluster.url.replace("redis+cluster://", "redis://"))
    try:
        with pytest.raises(MembrainRequestError, match="redis\\+cluster"):
            await c.lookup([f"k{i}" for i in range(32)])
    finally:
        await c.aclose()


# ------------------------------------------------------------------ a Redis Cluster


async def test_one_namespace_spreads_over_every_master_and_a_lookup_is_one_round_trip_per_node(redis_cluster):
    c = client_for(redis_cluster.url, namespace="spread")
    t: RedisTransport = c._transport
    try:
        keys = [f"fp-r0-{i:04x}" for i in range(96)]
        assert await c.put_many(keys, [b"v" * 100] * 96) == 96
        ports = {redis_cluster.key_port(redis_key("spread", k)) for k in keys}
        assert len(ports) == 3  # no hash tag: the namespace is not pinned to one master
        assert all(resp.key_slot(redis_key("spread", k)) == int(redis_cluster.nodes[0].cli("CLUSTER", "KEYSLOT",
                   redis_key("spread", k).decode())) for k in keys[:8])
        calls: list = []
        real = t._node_call

        async def counted(addr, commands):
            calls.append(addr)
            return await real(addr, commands)

        t._node_call = counted
        assert await c.lookup(keys) == 96
        assert sorted(calls) == sorted(set(calls)) and len(calls) == 3  # one pipeline per master, at once
    finally:
        await c.aclose()


async def test_a_stale_slot_map_follows_moved(redis_cluster):
    c = client_for(redis_cluster.url, namespace="moved")
    t: RedisTransport = c._transport
    try:
        keys = [f"k{i}" for i in range(30)]
        assert await c.put_many(keys, [b"v"] * 30) == 30
        t._slot_addr = [redis_cluster.masters()[0].addr] * resp.SLOTS  # every slot wrongly on one master
        assert await c.lookup(keys) == 30 and t.stats.redirects > 0
        assert all(v is not None for v in await c.get_many(keys))
    finally:
        await c.aclose()


async def test_an_unreachable_cluster_is_unavailable():
    c = client_for(f"redis+cluster://127.0.0.1:{free_port()}", breaker_threshold=1)
    try:
        with pytest.raises(MembrainUnavailable):
            await c.lookup(["k"])
    finally:
        await c.aclose()


async def test_a_killed_master_costs_misses_then_its_replica_serves_what_was_replicated():
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    cluster = RedisCluster(3, 1, 1000)
    c = client_for(cluster.url, namespace="fo", timeout=2.0)
    try:
        keys = [f"k{i}" for i in range(120)]
        assert await c.put_many(keys, [b"v" * 64] * 120) == 120
        cluster.wait_replicated()
        victim = cluster.masters()[0]
        on_victim = [k for k in keys if cluster.key_port(redis_key("fo", k)) == victim.port]
        assert on_victim
        victim.kill()
        # During the failover window: no exception, the victim's keys miss, the others hit.
        present = await c.exists(keys)
        assert not any(p for k, p in zip(keys, present) if k in on_victim)
        assert all(p for k, p in zip(keys, present) if k not in on_victim)
        with anyio.fail_after(30):
            while not all(await c.exists(keys)):
                await anyio.sleep(0.2)
        assert await c.lookup(keys) == 120  # the promoted replica holds every replicated key
        assert c._transport.stats.unreachable_keys >= len(on_victim)
    finally:
        await c.aclose()
        cluster.stop()


async def test_rediss_verifies_the_server_and_moves_blocks_over_tls(tmp_path):
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    from membrain_async.testing.certs import make_certs

    certs = make_certs(tmp_path)
    try:
        srv = RedisServer("--port", "0", "--tls-port", str(free_port()), "--tls-cert-file", certs.cert_file,
                          "--tls-key-file", certs.key_file, "--tls-ca-cert-file", certs.ca_file,
                          "--tls-auth-clients", "no", tls=True)
    except RuntimeError as exc:  # a redis-server built without TLS
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    try:
        url = f"rediss://127.0.0.1:{srv.port}"
        good = client_for(url, tls_ca_file=certs.ca_file)
        assert await good.put("k", b"over tls") and bytes(await good.get("k")) == b"over tls"
        await good.aclose()
        untrusted = client_for(url)  # the system trust store does not know the throw-away CA
        with pytest.raises(MembrainUnavailable):
            await untrusted.lookup(["k"])
        await untrusted.aclose()
    finally:
        srv.stop()


# ------------------------------------------------------------------ the cache layer above it


def test_a_stalled_redis_bounds_the_write_behind_and_lookups_are_misses_in_time():
    """The write-behind bound, the deadlines and "unavailable is a miss" live in BlockStore, above the client,
    so they hold for Redis unchanged: a redis-server stopped with SIGSTOP (alive, silent) never blocks a save."""
    import signal

    from membrain_async.cache import BlockStore

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    srv = RedisServer("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    store = BlockStore(ConnectorConfig.from_sources(env={}, overrides={
        "endpoint": srv.url, "write_behind_bytes": "1MiB", "timeout": 0.5, "lookup_deadline": 1.0,
        "shutdown_drain": 0.5}))
    try:
        assert store.save("warm", [b"v" * 1024]) and store.flush(10) and store.stats.saves_uploaded == 1
        srv.proc.send_signal(signal.SIGSTOP)
        accepted = sum(store.save(f"k{i}", [b"x" * (128 << 10)]) for i in range(32))  # 4 MiB into a 1 MiB bound
        assert accepted < 32 and store.stats.saves_dropped == 32 - accepted
        f = store.lookup(["warm"])
        assert f.wait(5)
        assert f.result_or(0) == 0  # late or unavailable: served as a miss, in time
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        store.stop_now(drain=0.5)
        srv.stop()
